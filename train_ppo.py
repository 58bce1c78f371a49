"""Med-RLVR: PPO from verifiable rewards on medical multiple-choice questions, written out in full.

    python train_ppo.py                                        # the CPU demo (SmolLM2-135M)
    python train_ppo.py --preset paper --out_dir runs/paper    # the study's setting (Qwen2.5-3B)
    torchrun --nproc_per_node=8 train_ppo.py --preset paper    # the same, FSDP2 over 8 GPUs

One step (`ppo_step`, below the config), line by line:
  1. take the step's prompts: a seeded pass over the training questions, the same for any number
     of ranks
  2. sample responses from the current policy (rollout.generate: a hand-written KV-cache decoder)
  3. score them with verifier.verify: -1 broken format, 0 wrong letter, +1 right letter
  4. log-probs of the same tokens under the frozen reference, and the critic's values
  5. token rewards r_t = -beta * KL_t, plus the verifier's score on the last token (Ouyang et al.)
  6. advantages: GAE over the critic's values, whitened (or critic-free: GRPO, Dr. GRPO, RLOO)
  7. PPO epochs over minibatches: the clipped surrogate for the actor, the clipped value loss for
     the critic, one optimizer step per minibatch

Every random choice is a function of (seed, step, row), so a run resumed from a checkpoint, or run
on another number of processes, samples exactly what an uninterrupted run would have sampled.
"""
import math
from dataclasses import dataclass, field

import torch

import checkpoint
import common
import distributed
import experience
import flex
import ppo
from common import arg, autocast
from model import (
    count_parameters,
    layer_modules,
    load_critic,
    load_policy,
    response_batch,
    response_logprobs,
    response_values,
)


@dataclass
class Config(common.RunFlags):
    """Every field is a flag. The defaults are the study's setting; --preset overlays a named set.
    Where the study is silent the value is OpenRLHF's default of early 2025, which it ran on."""
    preset: str = arg("demo", "named overlay of these defaults: paper | demo | smoke (PRESETS)")
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
    engine: str = arg("fast", "fast: engine.generate | plain: rollout.generate (same samples)")
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
    kl_target: float = arg(0.0, "> 0: adapt beta towards this KL (Ziegler et al. 2019); 0: fixed")
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
    # SmolLM2-135M-Instruct on CPU. Its bare study prompt gets no tagged answer (nothing to learn);
    # one worked example in the chat template gets some, and copies of the placeholder text score
    # as broken. Critic-free advantages: on 2 CPU cores the critic doubles the update's cost.
    # The README's demo section has the measurements behind each choice.
    "demo": dict(model="smollm2-135m", train_data="medqa_dev", prompt_style="r1_chat_1shot",
                 shuffle_options=True, max_prompt_tokens=360, rollout_batch_size=4,
                 n_samples_per_prompt=4, max_new_tokens=128, advantage="grpo", train_batch_size=16,
                 micro_batch_size=4, generate_batch_size=16, actor_lr=2e-5, warmup_ratio=0.0,
                 kl_coef=0.01, penalize_template_copy=True, max_steps=12, save_every=4,
                 loss_agg="token-mean", stop_at_answer=True, eval_every=4, eval_data="medqa_test",
                 eval_limit=16, eval_max_new_tokens=128, device="cpu", dtype="float32",
                 gradient_checkpointing=False, out_dir="runs/demo"),
    # a tiny random model, a few steps, a checkpoint after each: the test suite's end-to-end run
    "smoke": dict(model="tiny-qwen2", train_data="medqa_dev", prompt_style="r1",
                  rollout_batch_size=4, n_samples_per_prompt=2, max_new_tokens=16,
                  max_prompt_tokens=4096, train_batch_size=4, micro_batch_size=2,
                  generate_batch_size=8, ppo_epochs=2, actor_lr=1e-4, critic_lr=1e-4,
                  warmup_ratio=0.0, max_steps=3, save_every=1, stop_at_answer=True, eval_every=0,
                  device="cpu", dtype="float32", gradient_checkpointing=False,
                  out_dir="runs/smoke"),
}


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
        choices={"prompt_style": common.data.PROMPT_STYLES})
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
    if cfg.engine not in ("fast", "plain"):
        bad.append(f"--engine {cfg.engine!r}: choose fast or plain")
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
def ppo_step(cfg: Config, run, models, questions, step: int, kl_coef: float, timer):
    """One step of PPO from verifiable rewards. Returns the step's metrics and its samples (the
    responses with their verifier verdicts, for rollouts.jsonl)."""
    # 1. This rank's prompts: its slice of the step's questions, a seeded pass over the data.
    prompts = experience.step_prompts(cfg, questions, step, run.rank, run.world)
    # 2. Sample n responses per prompt from the current policy: PPO's "old" policy.
    with timer("generate"):
        exp = experience.sample_responses(cfg, models, prompts, step)
    # 3. Score each response with the verifier: -1 broken format, 0 wrong letter, +1 right letter.
    with timer("score"):
        exp.scores, samples = experience.score_responses(cfg, models.tokenizer, prompts, exp, step)
    sampling = {}
    if cfg.filter_groups:  # DAPO: groups that all scored alike make way for other prompts' groups
        exp, samples, sampling = experience.keep_varied_groups(cfg, run, models, questions, step,
                                                               exp, samples, timer)
    if cfg.overlong_buffer:  # DAPO: the last tokens of the budget cost a little, then more
        exp.scores = exp.scores + ppo.overlong_penalty(exp.mask.sum(1), cfg.max_new_tokens,
                                                       cfg.overlong_buffer, cfg.overlong_penalty)
    # 4. The same tokens' log-probs by a training forward of the policy and by the frozen
    #    reference, and the critic's values. PPO's old log-probs are the training forward's where
    #    the sampler's differ from them (bf16: --recompute_logprobs auto), else the sampler's.
    exp.train_logprobs, exp.ref_logprobs, exp.values = experience.reference_and_critic(
        cfg, models, exp, timer)
    exp.old_logprobs = exp.train_logprobs if recompute_logprobs(cfg) else exp.sampler_logprobs
    # 5. Token rewards: r_t = -beta * KL_t on every token, plus the verifier's score on the last.
    exp.kl = ppo.kl_penalty(exp.old_logprobs, exp.ref_logprobs, cfg.kl_estimator) * exp.mask
    beta = kl_coef if cfg.kl_in_reward else 0.0  # else beta * KL is a loss term (step 7, GRPO)
    rewards = ppo.token_rewards(exp.kl, exp.scores, exp.mask, beta)  # [N, T]
    # 6. Advantages: GAE over the critic's values, whitened over every rank's tokens; without a
    #    critic, the whitened returns (REINFORCE++), or the score relative to the prompt's group
    #    plus the KL rewards still to come (GRPO, Dr. GRPO, RLOO).
    exp.returns = torch.zeros_like(exp.mask)
    if models.critic is not None:
        exp.advantages, exp.returns = ppo.gae(rewards, exp.values, exp.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            exp.advantages = ppo.whiten(exp.advantages, exp.mask, distributed.all_reduce_dict)
    elif cfg.advantage == "reinforce_pp":
        exp.advantages = ppo.reinforce_pp_advantages(rewards, exp.mask, cfg.gamma,
                                                     distributed.all_reduce_dict)
    else:
        exp.advantages = ppo.critic_free_advantages(exp.scores, exp.kl, exp.mask,
                                                    cfg.n_samples_per_prompt, cfg.advantage, beta)
    metrics = {"step": step, **step_metrics(exp, samples), **sampling}
    if skipped := skip_reason(cfg, exp, samples):  # a non-finite reward, or no signal at all
        return {**metrics, "skipped": skipped}, samples
    # 7. PPO epochs over minibatches: the clipped surrogate for the actor, the clipped value loss
    #    for the critic. Gradients add up over micro-batches; one optimizer step per minibatch.
    with timer("update"):
        update = UpdateStats()
        for minibatch in minibatches(cfg, step, exp, run.world):
            for micro in minibatch:
                with autocast(cfg, run.device):  # the entropy is logged; trained on if in the loss
                    logprobs, entropy = response_logprobs(models.policy, micro.batch,
                                                          cfg.temperature, return_entropy=True,
                                                          entropy_grad=cfg.entropy_coef != 0)
                actor_loss, clip_stats = ppo.policy_loss(
                    logprobs, micro.old_logprobs, micro.advantages, micro.reduction(),
                    (cfg.clip_eps, cfg.clip_eps_high or cfg.clip_eps), cfg.ratio_level,
                    micro.tis_weights)
                mean_entropy = micro.mean(entropy)
                loss = actor_loss - cfg.entropy_coef * mean_entropy
                if not cfg.kl_in_reward:  # GRPO: beta * k3 KL to the reference as a loss term
                    k3 = ppo.kl_penalty(logprobs, micro.ref_logprobs, "k3")  # [b, T]
                    loss = loss + kl_coef * micro.mean(k3)
                (loss * run.world).backward()  # x world: FSDP averages the ranks' gradients
                update.add_actor(micro.mask, actor_loss, mean_entropy, clip_stats)
                if models.critic is not None:
                    with autocast(cfg, run.device):
                        values = response_values(models.critic, micro.batch)  # [b, T]
                    critic_loss, value_stats = ppo.value_loss(
                        values, micro.values, micro.returns, micro.reduction(),
                        cfg.value_clip_eps)
                    (critic_loss * run.world).backward()
                    update.add_critic(micro.mask, critic_loss, value_stats)
            optimizer_step(cfg, models, update)  # never steps on a non-finite gradient
    return {**metrics, **update.summary(models.critic is not None)}, samples


def recompute_logprobs(cfg: Config) -> bool:
    """Whether PPO's old log-probs are a training forward's: always with --tis_cap (its weights are
    pi_old / pi_sampler); with auto, whenever the compute dtype is not fp32."""
    if cfg.recompute_logprobs == "auto":
        return cfg.dtype != "float32" or cfg.tis_cap > 0
    return cfg.recompute_logprobs == "true"


# ==================================================================================================
# Step 7's pieces: minibatches, the statistics of the update, the optimizer step
# ==================================================================================================
@dataclass
class MicroBatch:
    """micro_batch_size rows of the experience, trimmed to their longest response T."""
    batch: object  # model.ResponseBatch: what the forward takes (packed trees or padded rows)
    mask: torch.Tensor  # [b, T]
    old_logprobs: torch.Tensor  # [b, T]
    ref_logprobs: torch.Tensor  # [b, T]
    advantages: torch.Tensor  # [b, T]
    returns: torch.Tensor  # [b, T]
    values: torch.Tensor  # [b, T] the critic's values at sampling time (the value clip's anchor)
    tis_weights: torch.Tensor | None  # [b, T] min(pi_old / pi_sampler, --tis_cap), or None
    denom: float  # what every loss term divides by: the whole global minibatch's tokens or rows
    agg: str  # --loss_agg
    token_norm: int  # Dr. GRPO's constant: the generation budget, --max_new_tokens

    def reduction(self) -> ppo.LossReduction:
        """This micro-batch's share of the minibatch's mean, as a function of a per-token loss."""
        return ppo.LossReduction(self.agg, self.mask, self.denom, self.token_norm)

    def mean(self, per_token: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the minibatch's mean of a per-token loss [b, T]."""
        return self.reduction()(per_token)


def minibatches(cfg: Config, step: int, exp: experience.Experience, world: int):
    """ppo_epochs passes over this rank's rows in minibatches of train_batch_size / world rows, in
    a seeded order; each minibatch yields its micro-batches.

    Loss normalisation: every micro-batch divides by the token (token-mean) or sequence count of
    the whole GLOBAL minibatch, and its loss is multiplied by the number of ranks because FSDP
    averages gradients over ranks; so the gradient is exactly that of the minibatch's mean loss,
    whatever the micro-batching and the number of ranks."""
    size = cfg.train_batch_size // world  # rows of a minibatch on this rank
    n_minibatches = exp.mask.shape[0] // size
    tokens = distributed.all_reduce_dict({k: exp.mask[k * size:(k + 1) * size].sum().item()
                                          for k in range(n_minibatches)})  # over all ranks
    for epoch in range(cfg.ppo_epochs):
        seed = hash((cfg.seed, step, epoch)) % 2 ** 63
        order = torch.randperm(n_minibatches, generator=torch.Generator().manual_seed(seed))
        for k in order.tolist():
            denom = tokens[k] if cfg.loss_agg == "token-mean" else cfg.train_batch_size
            yield (micro_batch(cfg, exp, s, denom)
                   for s in range(k * size, (k + 1) * size, cfg.micro_batch_size))


def micro_batch(cfg: Config, exp: experience.Experience, start: int, denom: float) -> MicroBatch:
    rows = slice(start, start + cfg.micro_batch_size)
    T = int(exp.mask[rows].sum(1).max())
    batch = response_batch(exp.sequences[rows], exp.attention_mask[rows], exp.mask[rows],
                           cfg.pack_samples)
    tis_weights = None
    if cfg.tis_cap > 0:
        tis_weights = ppo.truncated_is_weights(exp.old_logprobs[rows, :T],
                                               exp.sampler_logprobs[rows, :T], cfg.tis_cap)
    return MicroBatch(batch, exp.mask[rows, :T], exp.old_logprobs[rows, :T],
                      exp.ref_logprobs[rows, :T], exp.advantages[rows, :T], exp.returns[rows, :T],
                      exp.values[rows, :T], tis_weights, denom, cfg.loss_agg, cfg.max_new_tokens)


UPDATE_SUMS = ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "vf_clipfrac",
               "tokens")


@dataclass
class UpdateStats:
    """What step 7 logs, summed over micro-batches (and, once all-reduced, ranks)."""
    sums: dict = field(default_factory=lambda: dict.fromkeys(UPDATE_SUMS, 0.0))
    grad_norms: dict = field(default_factory=lambda: {"policy": [], "critic": []})  # per update
    updates: int = 0
    nonfinite_updates: int = 0

    def add_actor(self, mask, actor_loss, mean_entropy, clip_stats):
        tokens = mask.sum().item()
        self.sums["policy_loss"] += actor_loss.item()  # over micro-batches, ranks: the mean
        self.sums["entropy"] += mean_entropy.item()
        self.sums["clipfrac"] += clip_stats["clipfrac"] * tokens
        self.sums["approx_kl"] += clip_stats["approx_kl"] * tokens
        self.sums["tokens"] += tokens

    def add_critic(self, mask, critic_loss, value_stats):
        self.sums["value_loss"] += critic_loss.item()
        self.sums["vf_clipfrac"] += value_stats["vf_clipfrac"] * mask.sum().item()

    def summary(self, with_critic: bool) -> dict:
        total = distributed.all_reduce_dict(self.sums)
        tokens = max(total["tokens"], 1)
        out = {"policy_loss": total["policy_loss"] / self.updates,
               "entropy": total["entropy"] / self.updates, "clipfrac": total["clipfrac"] / tokens,
               "approx_kl": total["approx_kl"] / tokens,
               "nonfinite_updates": self.nonfinite_updates}
        if with_critic:
            out.update(value_loss=total["value_loss"] / self.updates,
                       vf_clipfrac=total["vf_clipfrac"] / tokens)
        for name, metric in (("policy", "actor_grad_norm"), ("critic", "critic_grad_norm")):
            if self.grad_norms[name]:
                out[metric] = sum(self.grad_norms[name]) / len(self.grad_norms[name])
        if self.nonfinite_updates:  # the step counts as skipped (common.StepLoop counts it)
            out["skipped"] = f"{self.nonfinite_updates} non-finite gradient(s)"
        return out


def optimizer_step(cfg: Config, models, update: UpdateStats):
    """The end of a minibatch, for the actor and the critic: clip the gradient norm, step AdamW
    (unless a gradient is non-finite: then neither steps, and the update is counted), zero the
    gradients, step the learning-rate schedule."""
    trained = models.trained()
    norms = {name: distributed.grad_norm_and_clip(m, cfg.max_grad_norm)
             for name, m in trained.items()}
    finite = all(math.isfinite(norm) for norm in norms.values())
    for name in trained:
        if finite:
            models.optimizers[name].step()
            update.grad_norms[name].append(norms[name])
        models.optimizers[name].zero_grad(set_to_none=True)
        models.schedulers[name].step()
    update.updates += 1
    update.nonfinite_updates += not finite


# ==================================================================================================
# Metrics and skips
# ==================================================================================================
def step_metrics(exp: experience.Experience, samples: list[dict]) -> dict:
    """Means over every sample of every rank of what the verifier and the models said."""
    mask, values, returns = exp.mask, exp.values, exp.returns
    sums = {"n": len(samples), "reward": sum(s["reward"] for s in samples),
            "score": exp.scores.sum().item(),  # the reward trained on (with DAPO's shaping)
            "accuracy": sum(s["correct"] for s in samples),
            "format_rate": sum(s["format_ok"] for s in samples),
            "no_letter_rate": sum(s["format_ok"] and s["pred"] is None for s in samples),
            "template_copy_rate": sum(s["template_copy"] for s in samples),
            "answer_in_think_rate": sum(s["answer_in_think"] for s in samples),
            "reasoning_outside_think_rate": sum(s["reasoning_outside_think"] for s in samples),
            "response_tokens": mask.sum().item(),
            "response_chars": sum(len(s["response"]) for s in samples),
            "truncated_rate": sum(s["finish_reason"] == "length" for s in samples),
            "kl": exp.kl.sum().item(),  # summed over tokens: the KL of a whole response
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
    metrics["explained_variance"] = 1 - var_d / var_r if var_r > 1e-12 else float("nan")
    return {**metrics, **sampler_gap(exp)}


def sampler_gap(exp: experience.Experience) -> dict:
    """How far the sampler's log-probs are from a training forward's on the same tokens, over every
    token of every rank: the mean and largest |log p_sampler - log p_train|, and the share of tokens
    whose ratio p_train / p_sampler is outside [0.5, 2]. Numerics alone (fp32: about 1e-6); in bf16
    the gap that --recompute_logprobs and --tis_cap are for."""
    gap = (exp.sampler_logprobs - exp.train_logprobs).abs() * exp.mask  # [N, T]
    sums = distributed.all_reduce_dict({"gap": gap.sum().item(), "tokens": exp.mask.sum().item(),
                                        "far": ((gap > math.log(2)) * exp.mask).sum().item()})
    largest = distributed.all_reduce_dict({"max": gap.max().item()}, op="max")["max"]
    tokens = max(sums["tokens"], 1)
    return {"sampler_gap_mean": sums["gap"] / tokens, "sampler_gap_max": largest,
            "sampler_ratio_outside_half_to_2": sums["far"] / tokens}


def skip_reason(cfg: Config, exp: experience.Experience, samples: list[dict]) -> str:
    """Why this step's update is skipped on every rank ("" when it is not): a non-finite reward on
    any rank, or (critic-free) every group of every rank scored alike, so no advantage to follow."""
    nonfinite = float(not all(math.isfinite(s["reward"]) for s in samples))
    if distributed.all_reduce_dict({"x": nonfinite})["x"] > 0:
        return "non-finite reward"
    if cfg.advantage != "gae":
        signal = distributed.all_reduce_dict({"a": exp.advantages.abs().sum().item()})["a"]
        if signal == 0:
            return "all advantages zero"
    return ""


# ==================================================================================================
# The run: models and optimizers, the loop, the command line
# ==================================================================================================
@dataclass
class Models:
    """What a run trains and reads: the actor, the frozen reference, the critic (GAE only)."""
    policy: torch.nn.Module
    reference: torch.nn.Module
    critic: torch.nn.Module | None
    tokenizer: object
    device: torch.device
    optimizers: dict = field(default_factory=dict)  # "policy" / "critic" -> AdamW
    schedulers: dict = field(default_factory=dict)  # the same names -> its LambdaLR

    def trained(self) -> dict:
        """The trained models by checkpoint folder name."""
        if self.critic is None:
            return {"policy": self.policy}
        return {"policy": self.policy, "critic": self.critic}


def load_models(cfg: Config, run) -> Models:
    """The policy and critic (fp32 master weights; from the checkpoint when resuming) and the
    reference (the same base as the policy), each sharded with FSDP2 under torchrun. The reference
    holds fp32 weights and runs as the policy runs (autocast, or FSDP's bf16 policy), so that on the
    same weights the two give the same log-probs and the KL starts at exactly 0."""
    amp = cfg.dtype == "bfloat16" and run.device.type == "cuda"
    resumed = run.resume_from
    policy, tokenizer = load_policy(str(resumed / "policy") if resumed else cfg.model,
                                    dtype="float32", device=run.device,
                                    gradient_checkpointing=cfg.gradient_checkpointing)
    reference, _ = load_policy(cfg.model, dtype="float32", device=run.device)
    reference.requires_grad_(False)
    critic = None
    if cfg.advantage == "gae":
        source = str(resumed / "critic") if resumed else (cfg.critic_model or cfg.model)
        critic = load_critic(source, dtype="float32", device=run.device,
                             gradient_checkpointing=cfg.gradient_checkpointing)
    for m in (policy, reference, critic):
        if m is not None:
            flex.prepare_for_training(m, cfg.attention, cfg.compile, run.device)  # the engine's
            distributed.shard(m, layer_modules(m), mixed_precision=amp)
    models = Models(policy, reference, critic, tokenizer, run.device)
    for m in models.trained().values():
        m.train()  # no dropout in these models: train() only turns gradient checkpointing on
    return models


def add_optimizers(cfg: Config, models: Models, total_steps: int):
    updates_per_step = cfg.rollout_batch_size * cfg.n_samples_per_prompt // cfg.train_batch_size
    total_updates = total_steps * updates_per_step * cfg.ppo_epochs
    for name, m in models.trained().items():
        lr = cfg.actor_lr if name == "policy" else cfg.critic_lr
        models.optimizers[name], models.schedulers[name] = common.adamw(m, lr, cfg, total_updates)


# the metrics' time_* fields
PHASES = ("generate", "score", "train_logprobs", "reference", "critic", "update", "eval")


def main(argv=None):
    cfg = parse_config(argv)
    run = common.start_run(cfg, check_config)
    models = load_models(cfg, run)
    questions = experience.load_questions(cfg, models.tokenizer, run.log)
    total_steps = cfg.max_steps or cfg.num_epochs * len(questions.records) // cfg.rollout_batch_size
    add_optimizers(cfg, models, total_steps)
    start, kl_coef = 1, cfg.kl_coef
    if run.resume_from:
        state = checkpoint.load_training(run.resume_from, models.trained(), models.optimizers,
                                         models.schedulers)
        start, kl_coef = state["step"] + 1, state["kl_coef"]
    common.prepare_out_dir(run, start, ["metrics.jsonl", "rollouts.jsonl", "eval.jsonl"])
    held_out = common.HeldOutEval(run, cfg, models.tokenizer)
    last_eval = {}  # the latest held-out accuracy of each set, for the progress bar
    if start == 1 and held_out.due(0):  # the base model's accuracy, as the study's step 0
        last_eval = held_out(0, models.policy)
    run.log(f"{cfg.preset}: {count_parameters(models.policy) / 1e6:.1f}M-parameter policy on "
            f"{run.world} x {run.device.type}, {len(questions.records)} questions, {total_steps} "
            f"steps of {cfg.rollout_batch_size} x {cfg.n_samples_per_prompt} samples")
    loop = common.StepLoop(run, start, total_steps, models.trained(), models.optimizers,
                           models.schedulers, models.tokenizer, "rewards, losses or gradients",
                           f"inspect {run.out}/rollouts.jsonl, lower the learning rate, --resume.")
    for step in loop:
        timer = common.PhaseTimer(run.device, PHASES)
        metrics, samples = ppo_step(cfg, run, models, questions, step, kl_coef, timer)
        if cfg.kl_target > 0:  # the adaptive KL controller (Ziegler et al. 2019)
            kl_coef = ppo.adaptive_kl(kl_coef, metrics["kl"], cfg.kl_target, cfg.kl_horizon,
                                      metrics["samples"])
        if held_out.due(step):
            with timer("eval"):
                last_eval = held_out(step, models.policy)
        metrics.update(kl_coef=kl_coef, **learning_rates(models), **timer.metrics())
        every_sample = sum(distributed.all_gather_objects(samples), [])  # collective: every rank
        stop = loop.end_step(step, metrics, {"kl_coef": kl_coef,
                                             "data_position": step * cfg.rollout_batch_size},
                             tokens=metrics["response_tokens"] * metrics["samples"],
                             postfix=progress(metrics, last_eval),
                             logs={"rollouts.jsonl": sorted(every_sample, key=row_of)})
        if stop:
            break
    loop.close()


def learning_rates(models: Models) -> dict:
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


def row_of(sample: dict) -> int:
    return sample["row"]


def cli(argv=None):
    """The command line: an error the user can fix ends with its message (common.cli)."""
    common.cli(main, argv)


if __name__ == "__main__":
    cli()
