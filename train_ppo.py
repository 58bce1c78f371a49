"""Med-RLVR: PPO from verifiable rewards on medical multiple-choice questions, written out in full.

    python train_ppo.py                                        # the CPU demo (SmolLM2-135M)
    python train_ppo.py --preset paper --out_dir runs/paper    # the study's setting (Qwen2.5-3B)
    torchrun --nproc_per_node=8 train_ppo.py --preset paper    # the same, FSDP2 over 8 GPUs
    python train_ppo.py --preset paper_lora                    # the study on one GPU: LoRA

One step (`ppo_step`, below the config), line by line:
  1. take the step's prompts: a seeded pass over the training questions, the same for any number
     of ranks
  2. sample responses from the current policy: the run's sampler (--engine: the teaching core
     rollout.generate, or the fast engine.Engine) reads the policy's weights, copied in first
  3. score them with verifier.verify: -1 broken format, 0 wrong letter, +1 right letter
  4. log-probs of the same tokens by a training forward and under the frozen reference, and the
     critic's values
  5. token rewards r_t = -beta * KL_t, plus the verifier's score on the last token (Ouyang et al.)
  6. advantages: GAE over the critic's values, whitened; or critic-free: GRPO, Dr. GRPO, RLOO (the
     group's scores), REINFORCE++ (whitened returns)
  7. PPO epochs over minibatches: the clipped surrogate for the actor, the clipped value loss for
     the critic, one optimizer step per minibatch

Every random choice is a function of (seed, step, row), so a run resumed from a checkpoint, or run
on another number of processes, samples exactly what an uninterrupted run would have sampled.
"""
import math
from dataclasses import dataclass

import torch

import checkpoint
import common
import data
import distributed
import eval as evaluation  # `eval` itself would hide the builtin
import experience
import flex
import ppo
import roles
import samplers
import update
import verifier
from common import arg
from model import count_parameters, response_logprobs, response_values


@dataclass
class Config(common.RunFlags):
    """Every field is a flag. The field defaults are the study's setting (preset `paper`); where
    the study is silent they are OpenRLHF's defaults of early 2025, which it ran on. --preset
    overlays a named set; `demo`, the CPU demo, is the preset a bare `python train_ppo.py` runs."""
    preset: str = arg("demo", "named overlay of these defaults: paper | paper_lora | demo | "
                              "demo_lora | smoke (PRESETS)")
    # --- model and data
    model: str = arg("Qwen/Qwen2.5-3B", "policy and reference: HF name, folder or model_zoo name")
    critic_model: str = arg("", "critic backbone (default: the policy's, as OpenRLHF)")
    train_data: str = arg("medqa_train", "dataset name or file (study: MedQA-USMLE train)")
    data_dir: str = arg("", "folder of the data files (default: $MEDRLVR_DATA)")
    prompt_style: str = arg("r1", "data.build_prompt style (study: r1)")
    prefill: str = arg("", "text forced at the start of every response, after the style's own")
    shuffle_options: bool = arg(False, "shuffle each question's options, seeded (study: no)")
    max_prompt_tokens: int = arg(1024, "longer prompts are left out, and counted (OpenRLHF 1024)")
    num_epochs: int = arg(10, "passes over the training questions (study: 10)")
    # --- rollout
    rollout_batch_size: int = arg(1024, "prompts per step, over all ranks (OpenRLHF 1024)")
    n_samples_per_prompt: int = arg(1, "responses per prompt (OpenRLHF 1; GRPO, RLOO: >= 2)")
    max_new_tokens: int = arg(1024, "response length limit (OpenRLHF generate_max_len 1024)")
    temperature: float = arg(1.0, "sampling temperature (OpenRLHF 1.0)")
    top_p: float = arg(1.0, "nucleus sampling (OpenRLHF 1.0)")
    top_k: int = arg(0, "top-k sampling, 0 = off (OpenRLHF off)")
    generate_batch_size: int = arg(64, "rows per generate call on each rank (KV cache memory)")
    engine: str = arg("auto", "the sampler (samplers.py): plain (rollout.generate, the teaching "
                              "core) | dynamic (engine.Engine, the CPU's paths) | static (the "
                              "GPU's: static shapes, CUDA graphs on CUDA) | auto: static on CUDA, "
                              "dynamic elsewhere")
    compile_decode: bool = arg(False, "--engine static: compile its decode step with Inductor "
                                      "before capturing it (off until a GPU shows it pays)")
    attention: str = arg("sdpa", "packed training forwards: sdpa (the dense tree mask) | flex "
                         "(FlexAttention block masks; backward on CUDA only) | auto: flex on CUDA")
    compile: bool = arg(False, "torch.compile each decoder layer for the training forwards")
    stop_at_answer: bool = arg(False, "end responses at </answer>; false: EOS or length (OpenRLHF)")
    filter_groups: bool = arg(False, "drop groups that all scored alike, sample others (DAPO)")
    max_sample_rounds: int = arg(10, "--filter_groups: sampling rounds a step may take at most")
    # --- reward (verifier.verify)
    format_reward: float = arg(-1.0, "reward for a broken format (study: -1)")
    wrong_reward: float = arg(0.0, "reward for a well-formed wrong answer (study: 0)")
    correct_reward: float = arg(1.0, "reward for the right letter (study: +1)")
    strict_format: bool = arg(False, "refuse text before <think> (the study's validator allows it)")
    penalize_template_copy: bool = arg(False, "score a copy of the prompt's placeholders as broken")
    overlong_buffer: int = arg(0, "> 0: the budget's last N tokens cost up to --overlong_penalty "
                                  "(DAPO eq. 13)")
    overlong_penalty: float = arg(1.0, "the largest overlong penalty (DAPO 1.0)")
    # --- advantages and KL
    advantage: str = arg("gae", "gae (PPO with a critic, the study) | grpo | drgrpo | rloo | "
                                "reinforce_pp")
    gamma: float = arg(1.0, "discount (OpenRLHF 1.0)")
    lam: float = arg(1.0, "GAE lambda (OpenRLHF 1.0 from v0.5.7; 0.95 before: README)")
    whiten_advantages: bool = arg(True, "GAE advantages to mean 0, std 1 (OpenRLHF does)")
    kl_coef: float = arg(0.01, "beta, the KL coefficient (OpenRLHF init_kl_coef 0.01)")
    kl_estimator: str = arg("k1", "k1 | k2 | k3 (Schulman 2020; OpenRLHF k1)")
    kl_in_reward: bool = arg(True, "-beta KL in the rewards (study); false: a k3 loss term (GRPO)")
    kl_target: float = arg(0.0, "> 0: adapt beta towards this KL, each response's mean over its "
                                "tokens (OpenRLHF's unit; Ziegler et al. 2019); 0: fixed")
    kl_horizon: float = arg(10000, "horizon of the adaptive KL controller (Ziegler et al. 2019)")
    # --- PPO update
    ppo_epochs: int = arg(1, "passes over each step's samples (OpenRLHF max_epochs 1)")
    train_batch_size: int = arg(128, "samples per optimizer step, over all ranks (OpenRLHF 128)")
    micro_batch_size: int = arg(4, "samples per forward and backward on each rank")
    clip_eps: float = arg(0.2, "PPO clip range (OpenRLHF 0.2)")
    clip_eps_high: float = arg(0.0, "> 0: upper clip range, clip-higher (DAPO 0.28); 0: clip_eps")
    ratio_level: str = arg("token", "token (PPO) | sequence (GSPO: the sequence's ratio)")
    value_clip_eps: float = arg(0.2, "value clip range (OpenRLHF 0.2)")
    entropy_coef: float = arg(0.0, "entropy bonus (OpenRLHF 0)")
    loss_agg: str = arg("seq-mean", "seq-mean (OpenRLHF v0.5.7-0.6) | token-mean | "
                                    "seq-mean-token-sum-norm (Dr. GRPO)")
    actor_lr: float = arg(1e-6, "actor learning rate (OpenRLHF 1e-6); 0: frozen")
    critic_lr: float = arg(9e-6, "critic learning rate (OpenRLHF 9e-6); 0: frozen")
    warmup_ratio: float = arg(0.03, "linear warm-up share of the updates (OpenRLHF 0.03)")
    min_lr_ratio: float = arg(0.1, "cosine decay to this share of the peak (OpenRLHF 0.1)")
    weight_decay: float = arg(0.0, "AdamW weight decay (OpenRLHF 0)")
    max_grad_norm: float = arg(1.0, "gradient clipping (OpenRLHF 1.0); 0: off")
    recompute_logprobs: str = arg("auto", "old log-probs from a training forward: true | false | "
                                          "auto (when not fp32, as OpenRLHF)")
    tis_cap: float = arg(0.0, "> 0: weight token losses by min(pi_old / pi_sampler, cap) (TIS)")
    pack_samples: bool = arg(True, "each prompt once for its samples in the forwards (model.pack)")
    forward_token_budget: int = arg(16384, "tokens per reference / critic forward; 0: all at once")
    # --- held-out evaluation (eval.py's decoding and scoring)
    eval_every: int = arg(4, "evaluate at step 0 and every N steps (the study: 4); 0: never")
    eval_data: str = arg("medqa_test,mmlu_pro_health", "comma-separated eval.py data sets")
    eval_limit: int = arg(0, "the first N questions of each set (0: all)")
    eval_max_new_tokens: int = arg(0, "greedy response limit (0: eval.py's for the prompt style)")
    # --- the run (common.RunFlags holds the rest)
    out_dir: str = arg("runs/ppo", "metrics.jsonl, rollouts.jsonl and checkpoints/ go here")


PRESETS = {
    "paper": {},  # the defaults above
    # The study on one GPU: rank-1 adapters on all seven linears of every layer, alpha 32, learning
    # rates 10x full fine-tuning's (LoRA Without Regret, Schulman et al. 2025: rank 1 matches full
    # fine-tuning in policy-gradient RL; the critic's 10x is the same rule, which the paper did not
    # test on a critic). The README's one-GPU table has the memory arithmetic.
    "paper_lora": dict(lora_rank=1, lora_alpha=32.0, actor_lr=1e-5, critic_lr=9e-5,
                       out_dir="runs/paper_lora"),
    # SmolLM2-135M-Instruct on CPU. Its bare study prompt gets no tagged answer (nothing to learn);
    # one worked example in the chat template gets some, and copies of the placeholder text score
    # as broken. Critic-free advantages: on 2 CPU cores the critic doubles the update's cost. The
    # README's demo section has the measurements behind each choice.
    "demo": dict(model="smollm2-135m", train_data="medqa_dev", prompt_style="r1_chat_1shot",
                 shuffle_options=True, max_prompt_tokens=360, rollout_batch_size=4,
                 n_samples_per_prompt=4, max_new_tokens=128, advantage="grpo", train_batch_size=16,
                 micro_batch_size=4, generate_batch_size=16, actor_lr=2e-5,
                 warmup_ratio=0.0, kl_coef=0.01, penalize_template_copy=True, max_steps=12,
                 save_every=4, loss_agg="token-mean", stop_at_answer=True, eval_every=4,
                 eval_data="medqa_test", eval_limit=16, eval_max_new_tokens=128, device="cpu",
                 dtype="float32", gradient_checkpointing=False, out_dir="runs/demo"),
    # a tiny random model, a few steps, a checkpoint after each: the test suite's end-to-end run
    "smoke": dict(model="tiny-qwen2", train_data="medqa_dev", prompt_style="r1",
                  rollout_batch_size=4, n_samples_per_prompt=2, max_new_tokens=16,
                  max_prompt_tokens=4096, train_batch_size=4, micro_batch_size=2,
                  generate_batch_size=8, ppo_epochs=2, actor_lr=1e-4, critic_lr=1e-4,
                  warmup_ratio=0.0, max_steps=3, save_every=1, stop_at_answer=True, eval_every=0,
                  device="cpu", dtype="float32", gradient_checkpointing=False,
                  out_dir="runs/smoke"),
}
# The demo with LoRA: rank-1 adapters, the learning rate 10x the full demo's (LoRA Without Regret)
PRESETS["demo_lora"] = {**PRESETS["demo"], "lora_rank": 1, "lora_alpha": 32.0, "actor_lr": 2e-4,
                        "out_dir": "runs/demo_lora"}


def parse_config(argv=None) -> Config:
    return common.parse_flags(Config, PRESETS, check_config, argv, __doc__.split("\n")[0])


def check_config(cfg: Config, world: int = 1) -> list:
    """Settings that cannot work, each with the flag to change and why."""
    bad = common.value_problems(cfg, common.own_fields(cfg), positive=(
        "max_prompt_tokens num_epochs rollout_batch_size n_samples_per_prompt max_new_tokens top_p "
        "generate_batch_size max_sample_rounds kl_horizon ppo_epochs train_batch_size "
        "micro_batch_size clip_eps").split(), non_negative=(
        "actor_lr critic_lr temperature top_k overlong_buffer overlong_penalty kl_coef kl_target "
        "clip_eps_high value_clip_eps entropy_coef weight_decay max_grad_norm tis_cap "
        "forward_token_budget eval_every eval_limit eval_max_new_tokens").split(),
        fractions="gamma lam warmup_ratio min_lr_ratio".split(), named=("model", "train_data"),
        choices={"prompt_style": data.PROMPT_STYLES, "engine": samplers.ENGINES})
    if bad:  # the checks below divide by these sizes
        return bad
    n_rows = cfg.rollout_batch_size * cfg.n_samples_per_prompt
    groups = cfg.advantage in ("grpo", "drgrpo", "rloo")  # advantages relative to a group
    if cfg.advantage not in ("gae", "grpo", "drgrpo", "rloo", "reinforce_pp"):
        bad.append(f"--advantage {cfg.advantage!r}: choose gae, grpo, drgrpo, rloo or "
                   f"reinforce_pp")
    if (groups or cfg.filter_groups) and cfg.n_samples_per_prompt < 2:
        bad.append(f"--advantage {cfg.advantage} or --filter_groups compares samples of one "
                   f"prompt: --n_samples_per_prompt must be >= 2")
    if cfg.recompute_logprobs not in ("auto", "true", "false"):
        bad.append(f"--recompute_logprobs {cfg.recompute_logprobs!r}: choose auto, true or false")
    if cfg.tis_cap > 0 and cfg.recompute_logprobs == "false":
        bad.append("--tis_cap weights by pi_old / pi_sampler: it needs the old log-probs of a "
                   "training forward (--recompute_logprobs true or auto)")
    if cfg.ratio_level not in ("token", "sequence"):
        bad.append(f"--ratio_level {cfg.ratio_level!r}: choose token or sequence")
    if cfg.overlong_buffer >= cfg.max_new_tokens:
        bad.append(f"--overlong_buffer {cfg.overlong_buffer} must be smaller than "
                   f"--max_new_tokens {cfg.max_new_tokens}")
    if cfg.eval_every and not cfg.eval_data:
        bad.append("--eval_every needs --eval_data (comma-separated eval.py set names or files)")
    if cfg.kl_estimator not in ("k1", "k2", "k3"):
        bad.append(f"--kl_estimator {cfg.kl_estimator!r}: choose k1, k2 or k3")
    if cfg.loss_agg not in ("token-mean", "seq-mean", "seq-mean-token-sum-norm"):
        bad.append(f"--loss_agg {cfg.loss_agg!r}: choose token-mean, seq-mean or "
                   f"seq-mean-token-sum-norm")
    if cfg.attention not in flex.ATTENTION_CHOICES:
        bad.append(f"--attention {cfg.attention!r}: choose one of {flex.ATTENTION_CHOICES}")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.attention == "flex" and on_cpu:
        bad.append("--attention flex: torch's FlexAttention has no backward on the CPU; use sdpa "
                   "(or auto) there")
    if cfg.compile_decode and cfg.engine not in ("static", "auto"):
        bad.append(f"--compile_decode compiles the static decode step: --engine {cfg.engine} "
                   f"has none (use static or auto)")
    if n_rows % cfg.train_batch_size:
        bad.append(f"--train_batch_size {cfg.train_batch_size} must divide the samples of a step "
                   f"(rollout_batch_size x n_samples_per_prompt = {n_rows}) into whole minibatches")
    if cfg.train_batch_size % (cfg.n_samples_per_prompt * world):
        bad.append(f"--train_batch_size {cfg.train_batch_size} must be a multiple of "
                   f"n_samples_per_prompt x processes ({cfg.n_samples_per_prompt} x {world}): a "
                   f"prompt's samples stay together on one rank")
    elif (cfg.train_batch_size // world) % cfg.micro_batch_size:
        bad.append(f"--micro_batch_size {cfg.micro_batch_size} must divide the per-rank minibatch "
                   f"(train_batch_size / processes = {cfg.train_batch_size // world})")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        bad.append("--temperature must be >= 0 and --top_p in (0, 1]")
    return bad


# ==================================================================================================
# One step of the loop: the module docstring's seven steps
# ==================================================================================================
def ppo_step(cfg: Config, run, models: roles.Models, questions, step: int, kl_coef: float, timer):
    """One step of PPO from verifiable rewards. Returns the step's metrics and the samples' records
    (the responses with their verifier verdicts, for rollouts.jsonl)."""
    # 1. This rank's prompts: its slice of the step's questions, a seeded pass over the data.
    prompts = experience.step_prompts(questions, batching(cfg), step, run.rank, run.world)
    # 2. Sample n responses per prompt from the current policy: PPO's "old" policy. The sampler
    #    reads the policy's weights (copied into its own first, where it keeps its own).
    with timer("generate"):
        models.sampler.load_weights(roles.sampler_weights(models))
        rolled = experience.sample_responses(models.sampler, models.tokenizer, prompts,
                                             sampling(cfg), step)
    # 3. Score each response with the verifier: -1 broken format, 0 wrong letter, +1 right letter.
    with timer("score"):
        samples = experience.score_responses(rolled, prompts, sampling(cfg), scoring(cfg),
                                             models.tokenizer, step)
    sampled = {}
    if cfg.filter_groups:  # DAPO: groups that all scored alike make way for other prompts' groups
        samples, sampled = keep_varied_groups(cfg, run, models, questions, step, samples, timer)
    # DAPO's soft overlong punishment (0 unless --overlong_buffer): the score trained on
    scores = samples.scores + ppo.overlong_penalty(samples.mask.sum(1), cfg.max_new_tokens,
                                                   cfg.overlong_buffer, cfg.overlong_penalty)
    # 4. The same tokens' log-probs by a training forward of the policy and by the frozen
    #    reference, and the critic's values. PPO's old log-probs are the training forward's where
    #    the sampler's differ from them (bf16: --recompute_logprobs auto), else the sampler's.
    forwards = experience.reference_and_critic(models, samples, forwarding(cfg), timer)
    old_logprobs = forwards.train if recompute_logprobs(cfg) else samples.sampler_logprobs
    # --kl_coef 0 loads no reference: no KL
    ref_logprobs = old_logprobs if forwards.reference is None else forwards.reference
    # 5. Token rewards: r_t = -beta * KL_t on every token, plus the (shaped) score on the last.
    mask = samples.mask  # [N, T]
    kl = ppo.kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask  # [N, T]
    beta = kl_coef if cfg.kl_in_reward else 0.0  # else beta * KL is a loss term (step 7, GRPO)
    rewards = ppo.token_rewards(kl, scores, mask, beta)  # [N, T]
    # 6. Advantages: GAE over the critic's values, whitened over every rank's tokens; without a
    #    critic, the whitened returns (REINFORCE++), or the score relative to the prompt's group
    #    plus the KL rewards still to come (GRPO, Dr. GRPO, RLOO).
    if models.critic is not None:
        advantages, returns = ppo.gae(rewards, forwards.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = ppo.whiten(advantages, mask, distributed.all_reduce_dict)
    else:
        returns = torch.zeros_like(mask)  # no critic to fit
        if cfg.advantage == "reinforce_pp":
            advantages = ppo.reinforce_pp_advantages(rewards, mask, cfg.gamma,
                                                     distributed.all_reduce_dict)
        else:
            advantages = ppo.critic_free_advantages(scores, kl, mask, cfg.n_samples_per_prompt,
                                                    cfg.advantage, beta)
    exp = experience.Experience(samples, old_logprobs, ref_logprobs, forwards.values, kl,
                                advantages, returns)  # what the update learns from
    metrics = {"step": step, **step_metrics(exp, scores), **sampler_gap(samples, forwards.train),
               **sampled}
    if skipped := skip_reason(cfg, exp):  # a non-finite reward, or no signal at all
        return {**metrics, "skipped": skipped}, samples.records
    # 7. PPO epochs over minibatches: the clipped surrogate for the actor, the clipped value loss
    #    for the critic. Gradients add up over micro-batches; one optimizer step per minibatch.
    with timer("update"):
        stats = update.UpdateStats()
        for minibatch in update.minibatches(cfg, step, exp, run.world):
            for micro in minibatch:
                with distributed.autocast(cfg.dtype, run.device):  # entropy: logged, or trained on
                    logprobs, entropy = response_logprobs(models.policy, micro.batch,
                                                          cfg.temperature, return_entropy=True,
                                                          entropy_grad=cfg.entropy_coef != 0)
                actor_loss, clip_stats = ppo.policy_loss(
                    logprobs, micro.old_logprobs, micro.advantages, micro.reduce,
                    (cfg.clip_eps, cfg.clip_eps_high or cfg.clip_eps), cfg.ratio_level,
                    micro.tis_weights)
                mean_entropy = micro.reduce(entropy)
                loss = actor_loss - cfg.entropy_coef * mean_entropy
                if not cfg.kl_in_reward:  # GRPO: beta * k3 KL to the reference as a loss term
                    k3 = ppo.kl_penalty(logprobs, micro.ref_logprobs, "k3")  # [b, T]
                    loss = loss + kl_coef * micro.reduce(k3)
                (loss * run.world).backward()  # x world: FSDP averages the ranks' gradients
                stats.add_actor(micro.reduce.mask, actor_loss, mean_entropy, clip_stats)
                if models.critic is not None:
                    with distributed.autocast(cfg.dtype, run.device):
                        values = response_values(models.critic, micro.batch)  # [b, T]
                    critic_loss, value_stats = ppo.value_loss(
                        values, micro.values, micro.returns, micro.reduce, cfg.value_clip_eps)
                    (critic_loss * run.world).backward()
                    stats.add_critic(micro.reduce.mask, critic_loss, value_stats)
            update.optimizer_step(cfg, models, stats)  # never on a non-finite gradient
    return {**metrics, **stats.summary(models.critic is not None)}, samples.records


def recompute_logprobs(cfg: Config) -> bool:
    """Whether PPO's old log-probs are a training forward's: always with --tis_cap (its weights are
    pi_old / pi_sampler); with auto, whenever the compute dtype is not fp32."""
    if cfg.recompute_logprobs == "auto":
        return cfg.dtype != "float32" or cfg.tis_cap > 0
    return cfg.recompute_logprobs == "true"


# The flags each of steps 1-4 reads, as the small records experience.py takes
def batching(cfg: Config) -> experience.Batching:
    return experience.Batching(cfg.rollout_batch_size, cfg.n_samples_per_prompt,
                               cfg.train_batch_size, cfg.seed)


def sampling(cfg: Config) -> experience.Sampling:
    return experience.Sampling(cfg.n_samples_per_prompt, cfg.max_new_tokens, cfg.temperature,
                               cfg.top_p, cfg.top_k, cfg.stop_at_answer, cfg.generate_batch_size,
                               cfg.seed)


def scoring(cfg: Config) -> experience.Scoring:
    rules = verifier.Rules(strict_format=cfg.strict_format,
                           penalize_template_copy=cfg.penalize_template_copy,
                           format_reward=cfg.format_reward, wrong_reward=cfg.wrong_reward,
                           correct_reward=cfg.correct_reward)
    return experience.Scoring(rules, cfg.prompt_style, cfg.prefill)


def forwarding(cfg: Config) -> experience.Forwarding:
    return experience.Forwarding(cfg.temperature, cfg.pack_samples, cfg.forward_token_budget,
                                 cfg.micro_batch_size, cfg.dtype)


def keep_varied_groups(cfg: Config, run, models, questions, step: int, samples, timer):
    """DAPO's dynamic sampling (experience.keep_varied_groups): further rounds of prompts, each
    sampled and scored as steps 2 and 3 sample and score the step's own."""
    def another_round(round_: int) -> experience.Samples:
        prompts = experience.refill_prompts(questions, batching(cfg), step, round_, run.rank,
                                            run.world)
        with timer("generate"):
            rolled = experience.sample_responses(models.sampler, models.tokenizer, prompts,
                                                 sampling(cfg), step)
        with timer("score"):
            return experience.score_responses(rolled, prompts, sampling(cfg), scoring(cfg),
                                              models.tokenizer, step)
    return experience.keep_varied_groups(samples, cfg.n_samples_per_prompt, cfg.max_sample_rounds,
                                         another_round, models.tokenizer.pad_token_id)


# ==================================================================================================
# Metrics and skips
# ==================================================================================================
def step_metrics(exp: experience.Experience, scores: torch.Tensor) -> dict:
    """Means over every sample of every rank of what the verifier and the models said. `kl` is
    OpenRLHF's and veRL's unit (each response's mean KL over its tokens, averaged over responses:
    what --kl_target means); `kl_sum`, a whole response's KL."""
    records, mask = exp.samples.records, exp.samples.mask
    values, returns = exp.values, exp.returns
    sums = {"n": len(records), "reward": sum(r["reward"] for r in records),
            "score": scores.sum().item(),  # the reward trained on (with DAPO's shaping)
            "accuracy": sum(r["correct"] for r in records),
            "format_rate": sum(r["format_ok"] for r in records),
            "no_letter_rate": sum(r["format_ok"] and r["pred"] is None for r in records),
            "template_copy_rate": sum(r["template_copy"] for r in records),
            "answer_in_think_rate": sum(r["answer_in_think"] for r in records),
            "reasoning_outside_think_rate": sum(r["reasoning_outside_think"] for r in records),
            "response_tokens": mask.sum().item(),
            "response_chars": sum(len(r["response"]) for r in records),
            "truncated_rate": sum(r["finish_reason"] == "length" for r in records),
            "kl": ppo.mean_token_kl(exp.kl, mask).sum().item(),
            "kl_sum": exp.kl.sum().item(),
            # for the explained variance 1 - Var[R - V] / Var[R], over every token
            "ev_n": mask.sum().item(), "ev_r": (returns * mask).sum().item(),
            "ev_r2": (returns ** 2 * mask).sum().item(),
            "ev_d": ((returns - values) * mask).sum().item(),
            "ev_d2": ((returns - values) ** 2 * mask).sum().item()}
    total = distributed.all_reduce_dict(sums)
    metrics = {k: total[k] / total["n"] for k in sums if not k.startswith("ev_") and k != "n"}
    metrics["samples"] = int(total["n"])
    var_r = total["ev_r2"] / total["ev_n"] - (total["ev_r"] / total["ev_n"]) ** 2
    var_d = total["ev_d2"] / total["ev_n"] - (total["ev_d"] / total["ev_n"]) ** 2
    # undefined when the returns do not vary (no critic, say): null in metrics.jsonl
    metrics["explained_variance"] = 1 - var_d / var_r if var_r > 1e-12 else None
    return metrics


def sampler_gap(samples: experience.Samples, train_logprobs: torch.Tensor) -> dict:
    """How far the sampler's log-probs are from a training forward's on the same tokens, over every
    token of every rank: the mean and largest |log p_sampler - log p_train|, and the share of tokens
    whose ratio p_train / p_sampler is outside [0.5, 2]. Numerics alone (fp32: about 1e-6); in bf16
    the gap that --recompute_logprobs and --tis_cap are for."""
    mask = samples.mask
    gap = (samples.sampler_logprobs - train_logprobs).abs() * mask  # [N, T]
    sums = distributed.all_reduce_dict({"gap": gap.sum().item(), "tokens": mask.sum().item(),
                                        "far": ((gap > math.log(2)) * mask).sum().item()})
    largest = distributed.all_reduce_dict({"max": gap.max().item()}, op="max")["max"]
    tokens = max(sums["tokens"], 1)
    return {"sampler_gap_mean": sums["gap"] / tokens, "sampler_gap_max": largest,
            "sampler_ratio_outside_half_to_2": sums["far"] / tokens}


def skip_reason(cfg: Config, exp: experience.Experience) -> str:
    """Why this step's update is skipped on every rank ("" when it is not): a non-finite reward on
    any rank, or (critic-free) every group of every rank scored alike, so no advantage to follow."""
    rewards = [r["reward"] for r in exp.samples.records]
    nonfinite = float(not all(math.isfinite(reward) for reward in rewards))
    if distributed.all_reduce_dict({"x": nonfinite})["x"] > 0:
        return "non-finite reward"
    if cfg.advantage != "gae":
        signal = distributed.all_reduce_dict({"a": exp.advantages.abs().sum().item()})["a"]
        if signal == 0:
            return "all advantages zero"
    return ""


# ==================================================================================================
# The run: models, sampler and optimizers, the loop, the command line
# ==================================================================================================
def add_optimizers(cfg: Config, models: roles.Models, total_steps: int):
    updates_per_step = cfg.rollout_batch_size * cfg.n_samples_per_prompt // cfg.train_batch_size
    total_updates = total_steps * updates_per_step * cfg.ppo_epochs
    for name, item in models.trained.items():
        lr = cfg.actor_lr if name == "policy" else cfg.critic_lr
        models.optimizers[name], models.schedulers[name] = common.adamw(item.params, lr, cfg,
                                                                        total_updates)


def add_sampler(cfg: Config, models: roles.Models, longest: int):
    """The run's sampler (--engine), sized for its longest generate call: `longest` tokens."""
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    # with LoRA the shared base: outside a role's forward its active adapter is the policy's
    # (lora.add_adapters makes the first name active), which the plain sampler runs token by token
    policy = models.base if models.base is not None else models.policy
    models.sampler = samplers.make_sampler(cfg.engine, policy, dtype,
                                           roles.sampler_owns_weights(cfg),
                                           cfg.generate_batch_size, longest, cfg.compile_decode)


# the metrics' time_* fields
PHASES = ("generate", "score", "train_logprobs", "reference", "critic", "update", "eval")


def main(argv=None):
    cfg = parse_config(argv)
    run = common.start_run(cfg, check_config)
    models = roles.load(cfg, run)
    questions = experience.load_questions(cfg, models.tokenizer, run.log)
    held_out = evaluation.HeldOutEval(run, cfg, models.tokenizer)
    add_sampler(cfg, models, max(questions.longest + cfg.max_new_tokens, held_out.longest))
    total_steps = cfg.max_steps or cfg.num_epochs * len(questions.records) // cfg.rollout_batch_size
    add_optimizers(cfg, models, total_steps)
    start, kl_coef = 1, cfg.kl_coef
    if run.resume_from:
        state = checkpoint.load_training(run.resume_from, models.trained, models.optimizers,
                                         models.schedulers)
        start, kl_coef = state["step"] + 1, state["kl_coef"]
    common.prepare_out_dir(run, start, ["metrics.jsonl", "rollouts.jsonl", "eval.jsonl"])
    last_eval = {}  # the latest held-out accuracy of each set, for the progress bar
    if start == 1 and held_out.due(0):  # the base model's accuracy, as the study's step 0
        last_eval = held_out(0, sampler_now(models))
    run.log(f"{cfg.preset}: {count_parameters(models.policy) / 1e6:.1f}M-parameter policy "
            f"({sum(p.numel() for p in models.trained['policy'].params) / 1e6:.2f}M trained) on "
            f"{run.world} x {run.device.type}, {len(questions.records)} questions, {total_steps} "
            f"steps of {cfg.rollout_batch_size} x {cfg.n_samples_per_prompt} samples")
    loop = common.StepLoop(run, start, total_steps, models.trained, models.optimizers,
                           models.schedulers, models.tokenizer, "rewards, losses or gradients",
                           f"inspect {run.out}/rollouts.jsonl, lower the learning rate, --resume.")
    for step in loop:
        timer = common.PhaseTimer(run.device, PHASES)
        metrics, records = ppo_step(cfg, run, models, questions, step, kl_coef, timer)
        if cfg.kl_target > 0:  # the adaptive KL controller (Ziegler et al. 2019)
            kl_coef = ppo.adaptive_kl(kl_coef, metrics["kl"], cfg.kl_target, cfg.kl_horizon,
                                      metrics["samples"])
        if held_out.due(step):
            with timer("eval"):
                last_eval = held_out(step, sampler_now(models))
        metrics.update(kl_coef=kl_coef, **learning_rates(models), **timer.metrics())
        every_record = sum(distributed.all_gather_objects(records), [])  # collective: every rank
        stop = loop.end_step(step, metrics, {"kl_coef": kl_coef,
                                             "data_position": step * cfg.rollout_batch_size},
                             tokens=metrics["response_tokens"] * metrics["samples"],
                             postfix=progress(metrics, last_eval),
                             logs={"rollouts.jsonl": sorted(every_record, key=row_of)})
        if stop:
            break
    loop.close()


def sampler_now(models: roles.Models):
    """The run's sampler holding the policy's current weights (for a held-out evaluation)."""
    models.sampler.load_weights(roles.sampler_weights(models))
    return models.sampler


def learning_rates(models: roles.Models) -> dict:
    names = {"policy": "actor_lr", "critic": "critic_lr"}
    return {names[name]: s.get_last_lr()[0] for name, s in models.schedulers.items()}


def progress(metrics: dict, last_eval: dict) -> dict:
    """What the progress bar shows after each step (eval: the latest held-out accuracy)."""
    shown = {"reward": f"{metrics['reward']:.2f}", "acc": f"{metrics['accuracy']:.2f}",
             "fmt": f"{metrics['format_rate']:.2f}", "tmpl": f"{metrics['template_copy_rate']:.2f}",
             "len": f"{metrics['response_tokens']:.0f}"}
    for name, accuracy in last_eval.items():
        shown[f"eval {name}"] = f"{accuracy:.2f}"
    return shown


def row_of(record: dict) -> int:
    return record["row"]


def cli(argv=None):
    """The command line: an error the user can fix ends with its message (common.cli)."""
    common.cli(main, argv)


if __name__ == "__main__":
    cli()
