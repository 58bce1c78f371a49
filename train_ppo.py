"""Med-RLVR: PPO from verifiable rewards on medical multiple-choice questions, written out in full.

    python train_ppo.py                                  # the CPU demo (SmolLM2-135M, MedQA dev)
    python train_ppo.py --preset paper --out_dir runs/paper   # the study's setting (Qwen2.5-3B)
    torchrun --nproc_per_node=8 train_ppo.py --preset paper   # the same, FSDP2 over 8 GPUs

One step, top to bottom (the loop at the end of this file):
  1. take the step's prompts (a seeded pass over the training questions, the same for any number of ranks)
  2. sample responses with rollout.generate (hand-written KV-cache decoding), under the old policy
  3. score them with verifier.verify: -1 broken format, 0 wrong letter, +1 right letter
  4. reference log-probs and critic values on the same tokens
  5. token rewards r_t = -beta * KL_t, plus the verifier's score on the last token (Ouyang et al. 2022)
  6. advantages: GAE over the critic's values (or critic-free: GRPO, Dr. GRPO, RLOO), whitened
  7. PPO epochs over minibatches: clipped surrogate for the actor, clipped value loss for the critic

Every random choice is a function of (seed, step, row), so a run resumed from a checkpoint, or run on
a different number of processes, samples exactly what an uninterrupted run would have sampled.
"""
import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint as C
import data
import distributed as D
import model as M
import rollout
import verifier
from common import arg, autocast, fault, parse_flags, start_run  # flags, run setup, bf16 autocast, test hook
from ppo import (adaptive_kl, aggregate, gae, group_advantages, kl_penalty, lr_schedule,
                 policy_loss, value_loss)


@dataclass
class Config:
    """Every field is a command-line flag. Defaults are the study's setting; `--preset` overlays a named set.
    Where the study is silent the value is OpenRLHF's default of early 2025, which the study ran on."""
    preset: str = arg("demo", "named overlay of these defaults: paper | demo | smoke (see PRESETS)")
    # --- model and data
    model: str = arg("Qwen/Qwen2.5-3B", "policy and reference: HF name or folder, smollm2-135m, tiny-qwen2 (study: Qwen2.5-3B base)")
    critic_model: str = arg("", "critic backbone (default: the policy's; OpenRLHF initialises it from the policy)")
    train_data: str = arg("medqa_train", "dataset name or file (study: MedQA-USMLE train)")
    data_dir: str = arg("", "folder of the data files (default: $MEDRLVR_DATA)")
    prompt_style: str = arg("r1", "data.build_prompt style; r1 is the study's template, r1_chat the chat variant")
    prefill: str = arg("", "extra text forced at the start of every response, after the style's own prefill")
    shuffle_options: bool = arg(False, "shuffle the options of every question, seeded (the study did not)")
    max_prompt_tokens: int = arg(1024, "longer prompts are left out and counted (OpenRLHF prompt_max_len 1024)")
    num_epochs: int = arg(10, "passes over the training questions (study: 10 epochs)")
    # --- rollout
    rollout_batch_size: int = arg(1024, "prompts per step, over all ranks (OpenRLHF 1024; ~10 steps an epoch, ~100 in all, the study's ~108)")
    n_samples_per_prompt: int = arg(1, "responses sampled per prompt (OpenRLHF 1; GRPO/RLOO need >= 2)")
    max_new_tokens: int = arg(1024, "response length limit (OpenRLHF generate_max_len 1024)")
    temperature: float = arg(1.0, "sampling temperature (OpenRLHF 1.0)")
    top_p: float = arg(1.0, "nucleus sampling (OpenRLHF 1.0)")
    top_k: int = arg(0, "top-k sampling, 0 = off")
    generate_batch_size: int = arg(64, "rows per rollout.generate call on each rank (memory of the KV cache)")
    # --- reward (verifier.verify)
    format_reward: float = arg(-1.0, "reward for a broken <think></think><answer></answer> format (study: -1)")
    wrong_reward: float = arg(0.0, "reward for a well-formed wrong answer (study: 0; its ablation: -1)")
    correct_reward: float = arg(1.0, "reward for the right letter (study: +1)")
    strict_format: bool = arg(False, "refuse text before <think> (the study's validator allowed it)")
    penalize_template_copy: bool = arg(False, "score a copy of the prompt's placeholders ('reasoning process here') as a broken format")
    # --- advantages and KL
    advantage: str = arg("gae", "gae (PPO with a critic, the study) | grpo | drgrpo | rloo (critic-free)")
    gamma: float = arg(1.0, "discount (OpenRLHF 1.0)")
    lam: float = arg(0.95, "GAE lambda (OpenRLHF 0.95)")
    whiten_advantages: bool = arg(True, "normalise GAE advantages to mean 0, std 1 over the batch (OpenRLHF does)")
    kl_coef: float = arg(0.01, "beta, the KL coefficient (OpenRLHF init_kl_coef 0.01)")
    kl_estimator: str = arg("k1", "k1 | k2 | k3 (Schulman's estimators; OpenRLHF k1)")
    kl_in_reward: bool = arg(True, "True: -beta*KL in the token rewards (study); False: beta*k3 KL as a loss term (GRPO)")
    kl_target: float = arg(0.0, "> 0: adaptive beta towards this KL per sequence (Ziegler et al. 2019); 0: fixed (OpenRLHF)")
    kl_horizon: float = arg(10000, "horizon of the adaptive KL controller")
    # --- PPO update
    ppo_epochs: int = arg(1, "passes over each step's samples (OpenRLHF max_epochs 1)")
    train_batch_size: int = arg(128, "samples per optimizer step, over all ranks (OpenRLHF 128)")
    micro_batch_size: int = arg(4, "samples per forward/backward on each rank (gradient accumulation)")
    clip_eps: float = arg(0.2, "PPO clip range (OpenRLHF 0.2)")
    value_clip_eps: float = arg(0.2, "value clip range (OpenRLHF 0.2)")
    entropy_coef: float = arg(0.0, "entropy bonus (OpenRLHF 0)")
    loss_agg: str = arg("token-mean", "token-mean | seq-mean | seq-mean-token-sum-norm (Dr. GRPO)")
    actor_lr: float = arg(1e-6, "actor learning rate (OpenRLHF 1e-6)")
    critic_lr: float = arg(9e-6, "critic learning rate (OpenRLHF 9e-6)")
    warmup_ratio: float = arg(0.03, "linear warm-up share of the optimizer steps (OpenRLHF 0.03), then cosine to min_lr_ratio")
    min_lr_ratio: float = arg(0.1, "final learning rate as a share of the peak (OpenRLHF cosine_with_min_lr 0.1)")
    weight_decay: float = arg(0.0, "AdamW weight decay (OpenRLHF 0)")
    max_grad_norm: float = arg(1.0, "gradient clipping (OpenRLHF 1.0)")
    recompute_logprobs: bool = arg(False, "recompute old log-probs with a training forward instead of reusing the sampler's (exact in fp32; use with bf16)")
    # --- system
    out_dir: str = arg("runs/ppo", "metrics.jsonl, rollouts.jsonl and checkpoints/ go here")
    max_steps: int = arg(0, "stop after this many steps (0: num_epochs over the data)")
    save_every: int = arg(10, "checkpoint every N steps (and at the end)")
    keep_last: int = arg(3, "checkpoints kept (0: all)")
    resume: bool = arg(False, "continue from the newest sound checkpoint in out_dir")
    resume_fallback: bool = arg(False, "if the newest checkpoint fails its manifest check, use the one before")
    seed: int = arg(42, "seeds prompts order, option shuffling and sampling")
    device: str = arg("auto", "auto | cpu | cuda")
    dtype: str = arg("bfloat16", "compute dtype: bfloat16 (GPU) | float32; master weights and optimizer are fp32")
    cudnn_attention: bool = arg(False, "on a GPU, let the training forwards use cuDNN's SDPA kernel (it builds a graph per new shape: 62% of an H200 decode step, BENCHMARKS.md); off: flash / memory-efficient / math. Generation never uses it")
    gradient_checkpointing: bool = arg(True, "recompute activations in backward (less memory, ~30% more compute)")
    pack_samples: bool = arg(True, "compute each prompt once for all of its samples in the reference, critic and update forwards (one packed row, a tree attention mask; model.pack); false: padded rows")
    forward_token_budget: int = arg(16384, "tokens (rows x longest packed row) per no-grad forward of the reference and critic; 0: all at once")
    collective_timeout_s: float = arg(600.0, "a collective waiting longer than this fails the job instead of hanging")
    max_nonfinite_steps: int = arg(3, "stop after this many steps in a row skipped for a non-finite reward, loss or gradient")


PRESETS = {
    "paper": {},  # the defaults above
    # SmolLM2-135M-Instruct on CPU. The bare study prompt gets no tagged answer from it (every reward -1: nothing
    # to learn); the chat template with "<think>" prefilled gets a few, all copies of the placeholder text; after
    # one worked example 6-25% pass the format with a real letter. GRPO-style advantages (no critic): on 2 CPU
    # cores the critic doubles the update's cost, and with GAE (lambda 0.95, whitened) the early tokens of long
    # failed answers got positive advantages and the answers grew (81 -> 110 tokens in 3 steps, format flat).
    # `--advantage gae` runs the study's PPO with a critic. See README for the curve.
    "demo": dict(model="smollm2-135m", train_data="medqa_dev", prompt_style="r1_chat_1shot", shuffle_options=True,
                 max_prompt_tokens=360, rollout_batch_size=4, n_samples_per_prompt=4, max_new_tokens=128,
                 advantage="grpo", train_batch_size=16, micro_batch_size=4, generate_batch_size=16, actor_lr=2e-5,
                 warmup_ratio=0.0, kl_coef=0.01, penalize_template_copy=True, max_steps=12, save_every=4,
                 device="cpu", dtype="float32", gradient_checkpointing=False, out_dir="runs/demo"),
    # a tiny random model, a few steps, a checkpoint after each: the test suite's end-to-end run.
    "smoke": dict(model="tiny-qwen2", train_data="medqa_dev", prompt_style="r1", rollout_batch_size=4,
                  n_samples_per_prompt=2, max_new_tokens=16, max_prompt_tokens=4096, train_batch_size=4,
                  micro_batch_size=2, generate_batch_size=8, ppo_epochs=2, actor_lr=1e-4, critic_lr=1e-4,
                  warmup_ratio=0.0, max_steps=3, save_every=1, device="cpu", dtype="float32",
                  gradient_checkpointing=False, out_dir="runs/smoke"),
}


def parse_config(argv=None) -> Config:
    return parse_flags(Config, PRESETS, check_config, argv, __doc__.split("\n")[0])


def check_config(cfg: Config, world: int = 1) -> list:
    """Settings that cannot work, each with the flag to change and why."""
    bad = []
    n_rows = cfg.rollout_batch_size * cfg.n_samples_per_prompt
    if cfg.advantage not in ("gae", "grpo", "drgrpo", "rloo"):
        bad.append(f"--advantage {cfg.advantage!r}: choose gae, grpo, drgrpo or rloo")
    if cfg.advantage in ("grpo", "drgrpo", "rloo") and cfg.n_samples_per_prompt < 2:
        bad.append(f"--advantage {cfg.advantage} compares samples of one prompt: --n_samples_per_prompt must be >= 2")
    if cfg.kl_estimator not in ("k1", "k2", "k3"):
        bad.append(f"--kl_estimator {cfg.kl_estimator!r}: choose k1, k2 or k3")
    if cfg.loss_agg not in ("token-mean", "seq-mean", "seq-mean-token-sum-norm"):
        bad.append(f"--loss_agg {cfg.loss_agg!r}: choose token-mean, seq-mean or seq-mean-token-sum-norm")
    if n_rows % cfg.train_batch_size:
        bad.append(f"--train_batch_size {cfg.train_batch_size} must divide the samples of a step "
                   f"(rollout_batch_size x n_samples_per_prompt = {n_rows}) into whole minibatches")
    if cfg.train_batch_size % (cfg.n_samples_per_prompt * world):
        bad.append(f"--train_batch_size {cfg.train_batch_size} must be a multiple of n_samples_per_prompt x processes "
                   f"({cfg.n_samples_per_prompt} x {world}): a prompt's samples stay together on one rank")
    elif (cfg.train_batch_size // world) % cfg.micro_batch_size:
        bad.append(f"--micro_batch_size {cfg.micro_batch_size} must divide the per-rank minibatch "
                   f"(train_batch_size / processes = {cfg.train_batch_size // world})")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        bad.append("--temperature must be >= 0 and --top_p in (0, 1]")
    return bad


# ======================================================================================================
# Data: which prompts each rank gets at each step
# ======================================================================================================
def load_prompts(cfg, tokenizer, log):
    """The training questions as prompt records; prompts over max_prompt_tokens are left out, and counted."""
    records = data.load_dataset(cfg.train_data, cfg.data_dir or None)
    if cfg.shuffle_options:
        records = [data.shuffle_options(r, cfg.seed + i) for i, r in enumerate(records)]
    texts = [data.build_prompt(r, cfg.prompt_style, tokenizer) + cfg.prefill for r in records]
    _, _, kept, skipped = data.tokenize_prompts(tokenizer, texts, cfg.max_prompt_tokens)
    if skipped:
        log(f"left out {len(skipped)} of {len(records)} prompts longer than --max_prompt_tokens {cfg.max_prompt_tokens}")
    if not kept:
        raise SystemExit(f"no prompt of {cfg.train_data} fits in --max_prompt_tokens {cfg.max_prompt_tokens}")
    return [records[i] for i in kept], [texts[i] for i in kept]


def step_prompt_indices(cfg, n_questions, step, rank, world):
    """Indices (into the prompt list) of this rank's prompts at `step` (1-based), in its row order.

    The global batch of step s is the next rollout_batch_size questions of a seeded pass over the data
    (a new permutation each epoch). Minibatch k of the update is a fixed block of those prompts, and rank r
    holds the r-th slice of every block: so a minibatch holds the same samples whatever the number of ranks.
    """
    B, per_mb = cfg.rollout_batch_size, cfg.train_batch_size // cfg.n_samples_per_prompt
    start = (step - 1) * B
    stream = []
    epoch = start // n_questions
    while len(stream) < (start % n_questions) + B:
        stream += data.epoch_order(n_questions, cfg.seed, epoch)
        epoch += 1
    batch = stream[start % n_questions:start % n_questions + B]  # [B] global prompt order of this step
    per_rank = per_mb // world
    return [(k + r_off, batch[k + r_off]) for k in range(0, B, per_mb)
            for r_off in range(rank * per_rank, (rank + 1) * per_rank)]


def row_uniforms(cfg, step, positions):
    """Sampling noise [rows, max_new_tokens]: row (prompt position p, sample j) of step s draws from its own
    generator, so what it samples does not depend on which rank, batch or chunk it ends up in."""
    out = torch.empty(len(positions) * cfg.n_samples_per_prompt, cfg.max_new_tokens)
    for i, p in enumerate(positions):
        for j in range(cfg.n_samples_per_prompt):
            g = torch.Generator().manual_seed(hash((cfg.seed, step, p, j)) % (2 ** 63))
            out[i * cfg.n_samples_per_prompt + j] = torch.rand(cfg.max_new_tokens, generator=g)
    return out


# ======================================================================================================
# Phase 1: experience (generate, score, reference, critic)
# ======================================================================================================
def now(device) -> float:
    """Wall-clock seconds once the GPU's queued work is done, so a phase's time holds its own kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


@torch.no_grad()
def make_experience(cfg, step, recs, texts, positions, policy, ref, critic, tok, device, timer):
    """Sample, score and evaluate this rank's rows. Returns a dict of [N, ...] tensors and the per-row records."""
    n = cfg.n_samples_per_prompt
    ids, attn, _, _ = data.tokenize_prompts(tok, texts, None)  # [b, P] left padded
    ids, attn = ids.repeat_interleave(n, 0).to(device), attn.repeat_interleave(n, 0).to(device)  # [N, P]
    uniforms = row_uniforms(cfg, step, positions).to(device)  # [N, max_new]
    N, P = ids.shape
    eos = tok.eos_token_id if tok.eos_token_id is not None else []
    stop = ["</answer>"]  # the verifier refuses any text after it, so nothing after it can help

    t0 = now(device)
    chunks = []
    with D.gathered(policy), autocast(cfg, device):  # full weights once for the whole rollout, not per token
        for s in range(0, N, cfg.generate_batch_size):
            e = min(N, s + cfg.generate_batch_size)
            chunks.append(rollout.generate(policy, ids[s:e], attn[s:e], cfg.max_new_tokens, temperature=cfg.temperature,
                                           top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=eos, stop_strings=stop,
                                           tokenizer=tok, uniforms=uniforms[s:e]))
    T = max(c.response_mask.shape[1] for c in chunks)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
    resp = torch.cat([pad(c.sequences[:, P:], tok.pad_token_id) for c in chunks])  # [N, T]
    mask = torch.cat([pad(c.response_mask, 0) for c in chunks]).float()  # [N, T]
    old_logprobs = torch.cat([pad(c.logprobs, 0.0) for c in chunks]).float()  # [N, T]
    finish = [f for c in chunks for f in c.finish_reason]
    seq = torch.cat([ids, resp], 1)  # [N, P+T]
    seq_attn = torch.cat([attn, mask.long()], 1)  # [N, P+T]
    timer["generate"] = now(device) - t0

    # --- score: the verifier sees the prefilled text plus what the model wrote (EOS excluded)
    t0 = now(device)
    prefill = data.PROMPT_PREFILL.get(cfg.prompt_style, "") + cfg.prefill
    lengths = mask.sum(1).long().tolist()
    rows, scores = [], []
    for i in range(N):
        rec = recs[i // n]
        # the token that completed "</answer>" may carry more text ("></" is one SmolLM2 token): cut it off
        text = rollout.cut_after_stop(tok.decode(resp[i, :lengths[i]], skip_special_tokens=True), stop)
        v = verifier.verify(prefill + text, rec["answer"], rec["options"], strict=cfg.strict_format,
                            format_reward=cfg.format_reward, wrong_reward=cfg.wrong_reward,
                            correct_reward=cfg.correct_reward)
        if cfg.penalize_template_copy and v["template_copy"]:  # a small model's first hack: see README, demo
            v["reward"], v["format_ok"], v["correct"] = cfg.format_reward, False, False
        if fault("nan_reward", step) and i == 0:
            v["reward"] = float("nan")
        scores.append(v["reward"])
        rows.append({"step": step, "row": positions[i // n] * n + i % n, "id": rec["id"], "prompt": texts[i // n],
                     "response": cfg.prefill + text, "gold": rec["answer"], "options": rec["options"], "prompt_style": cfg.prompt_style,
                     "response_tokens": lengths[i], "finish_reason": finish[i],
                     **{k: v[k] for k in ("reward", "pred", "correct", "format_ok", "answer_in_think",
                                          "reasoning_outside_think", "template_copy", "think_chars", "answer_chars")}})
    scores = torch.tensor(scores, dtype=torch.float32, device=device)  # [N]
    timer["score"] = now(device) - t0

    # --- reference log-probs and critic values on the same tokens (each prompt once for all its samples)
    t0 = now(device)
    batches = no_grad_batches(cfg, seq, seq_attn, mask)  # built once, run through each model
    if cfg.recompute_logprobs:
        old_logprobs = forward_in_chunks(cfg, lambda b: M.response_logprobs(policy, b, cfg.temperature), batches, mask)
    ref_logprobs = forward_in_chunks(cfg, lambda b: M.response_logprobs(ref, b, cfg.temperature), batches, mask)
    timer["reference"] = now(device) - t0
    t0 = now(device)
    values = torch.zeros_like(mask)  # [N, T]
    if critic is not None:
        values = forward_in_chunks(cfg, lambda b: M.response_values(critic, b), batches, mask)
    timer["critic"] = now(device) - t0
    exp = dict(seq=seq, attn=seq_attn, mask=mask, old_logprobs=old_logprobs * mask, ref_logprobs=ref_logprobs * mask,
               values=values * mask, scores=scores)
    return exp, rows


def no_grad_batches(cfg, seq, attn, mask):
    """The batches of the reference and critic forwards, as (rows, batch) pairs: packed batches of at most
    --forward_token_budget tokens, each prompt once for its samples (rows: all, a Packed unpacks to [N, T_all]);
    or (--pack_samples false) micro_batch_size padded rows at a time, each trimmed."""
    if cfg.pack_samples:
        return [(slice(None), packed) for packed in M.pack(seq, attn, mask, cfg.forward_token_budget)]
    mb = cfg.micro_batch_size
    return [(slice(s, s + mb), M.response_batch(seq[s:s + mb], attn[s:s + mb], mask[s:s + mb], packed=False)) for s in range(0, len(seq), mb)]


def forward_in_chunks(cfg, fn, batches, mask):
    """fn(batch) -> [b, T] over no_grad_batches, reassembled as [N, T_all] (0 past each row's response)."""
    out = torch.zeros_like(mask)  # [N, T_all]
    with autocast(cfg, mask.device):
        for rows, batch in batches:
            y = fn(batch).float()  # [b, T]; a packed batch: [N, T_all], 0 outside its own tokens
            out[rows, :y.shape[1]] += y
    return out


# ======================================================================================================
# Phase 2: advantages
# ======================================================================================================
def compute_advantages(cfg, exp, kl_coef):
    """Token rewards, advantages and returns for this rank's rows (whitening statistics are global)."""
    mask, scores = exp["mask"], exp["scores"]  # [N, T], [N]
    kl = kl_penalty(exp["old_logprobs"], exp["ref_logprobs"], cfg.kl_estimator) * mask  # [N, T]
    last = mask.sum(1).long() - 1  # [N] index of each row's final token
    rows = torch.arange(len(scores), device=scores.device)
    kl_rewards = -kl_coef * kl if cfg.kl_in_reward else torch.zeros_like(kl)  # [N, T]  r_t = -beta KL_t
    if cfg.advantage == "gae":
        rewards = kl_rewards.clone()
        rewards[rows, last] += scores  # the verifier's score arrives on the last token
        adv, returns = gae(rewards, exp["values"], mask, cfg.gamma, cfg.lam)  # [N, T]
        if cfg.whiten_advantages:  # over every token of every rank: A <- (A - mean) / std
            s = D.all_reduce_dict({"n": mask.sum().item(), "sum": (adv * mask).sum().item(),
                                   "sq": (adv ** 2 * mask).sum().item()})
            mean = s["sum"] / s["n"]
            std = math.sqrt(max(s["sq"] / s["n"] - mean ** 2, 0.0))
            adv = (adv - mean) / (std + 1e-8) * mask
    else:  # critic-free: the sequence's group-relative score on every token, plus the KL returns-to-go
        adv = group_advantages(scores, cfg.n_samples_per_prompt, cfg.advantage)[:, None] * mask  # [N, T]
        adv = adv + torch.flip(torch.cumsum(torch.flip(kl_rewards, [1]), 1), [1]) * mask  # sum_{t'>=t} -beta KL
        returns = torch.zeros_like(adv)
    exp.update(advantages=adv, returns=returns, kl=kl)
    return exp


# ======================================================================================================
# Phase 3: the PPO update
# ======================================================================================================
def ppo_update(cfg, step, exp, policy, critic, opts, scheds, world, rank):
    """ppo_epochs passes over this rank's rows in minibatches; one optimizer step per minibatch.

    Loss normalisation: every micro-batch divides by the token (or sequence) count of the whole global
    minibatch, and is multiplied by the number of ranks because FSDP averages gradients over ranks;
    so the gradient is exactly that of the minibatch's mean loss, whatever the micro-batching and N.
    """
    mb = cfg.train_batch_size // world  # rows per minibatch on this rank
    n_mb = exp["mask"].shape[0] // mb
    tok = D.all_reduce_dict({k: exp["mask"][k * mb:(k + 1) * mb].sum().item() for k in range(n_mb)})
    tok_per_mb = [tok[k] for k in range(n_mb)]  # global response tokens of each minibatch
    stats = {k: 0.0 for k in ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "vf_clipfrac", "tokens")}
    norms, skipped = {"actor_grad_norm": [], "critic_grad_norm": []}, 0
    models = [("policy", policy)] + ([("critic", critic)] if critic is not None else [])
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n_mb, generator=torch.Generator().manual_seed(hash((cfg.seed, step, epoch)) % 2 ** 63))
        for k in order.tolist():
            denom = tok_per_mb[k] if cfg.loss_agg == "token-mean" else cfg.train_batch_size
            for s in range(k * mb, (k + 1) * mb, cfg.micro_batch_size):
                e = s + cfg.micro_batch_size
                batch = M.response_batch(exp["seq"][s:e], exp["attn"][s:e], exp["mask"][s:e], cfg.pack_samples)
                T = int(exp["mask"][s:e].sum(1).max())
                b = {key: exp[key][s:e, :T] for key in ("mask", "old_logprobs", "ref_logprobs", "advantages", "returns", "values")}
                with autocast(cfg, exp["seq"].device):
                    # the entropy is logged always, back-propagated only when it is in the loss
                    logprobs, entropy = M.response_logprobs(policy, batch, cfg.temperature, return_entropy=True,
                                                            entropy_grad=cfg.entropy_coef != 0)  # [b, T] x2
                    loss, st = policy_loss(logprobs, b["old_logprobs"], b["advantages"], b["mask"], cfg.clip_eps,
                                           cfg.loss_agg, denom)
                    ent = aggregate(entropy, b["mask"], cfg.loss_agg, denom)
                    total = loss - cfg.entropy_coef * ent
                    if not cfg.kl_in_reward:  # GRPO-style: beta * k3 KL to the reference as a loss term
                        total = total + cfg.kl_coef * aggregate(kl_penalty(logprobs, b["ref_logprobs"], "k3"),
                                                                b["mask"], cfg.loss_agg, denom)
                    if fault("nan_loss", step):
                        total = total * float("nan")
                (total * world).backward()
                n_tok = b["mask"].sum().item()
                stats["policy_loss"] += loss.item()  # summed over micro-batches and ranks: the minibatch mean
                stats["entropy"] += ent.item()
                stats["clipfrac"] += st["clipfrac"] * n_tok
                stats["approx_kl"] += st["approx_kl"] * n_tok
                stats["tokens"] += n_tok
                if critic is not None:
                    with autocast(cfg, exp["seq"].device):
                        v = M.response_values(critic, batch)  # [b, T]
                        vloss, vst = value_loss(v, b["values"], b["returns"], b["mask"], cfg.value_clip_eps,
                                                cfg.loss_agg, denom)
                    (vloss * world).backward()
                    stats["value_loss"] += vloss.item()
                    stats["vf_clipfrac"] += vst["vf_clipfrac"] * n_tok
            # one optimizer step per minibatch, for the actor and the critic; never step on non-finite gradients
            step_norms = {name: D.grad_norm_and_clip(m, cfg.max_grad_norm) for name, m in models}
            finite = all(math.isfinite(x) for x in step_norms.values())
            for name, m in models:
                if finite:
                    opts[name].step()
                    norms["actor_grad_norm" if name == "policy" else "critic_grad_norm"].append(step_norms[name])
                opts[name].zero_grad(set_to_none=True)
                scheds[name].step()
            skipped += not finite
    total = D.all_reduce_dict(stats)
    n_updates = n_mb * cfg.ppo_epochs
    out = {"policy_loss": total["policy_loss"] / n_updates, "entropy": total["entropy"] / n_updates,
           "clipfrac": total["clipfrac"] / max(total["tokens"], 1), "approx_kl": total["approx_kl"] / max(total["tokens"], 1),
           "nonfinite_updates": skipped}
    if critic is not None:
        out.update(value_loss=total["value_loss"] / n_updates, vf_clipfrac=total["vf_clipfrac"] / max(total["tokens"], 1))
    for k, v in norms.items():
        if v:
            out[k] = sum(v) / len(v)
    return out


# ======================================================================================================
# Metrics, checkpoints, and the loop
# ======================================================================================================
def step_metrics(exp, rows):
    """Means over every sample of every rank of what the verifier and the models said."""
    mask, values, returns = exp["mask"], exp["values"], exp["returns"]
    sums = {"n": len(rows), "reward": sum(r["reward"] for r in rows), "accuracy": sum(r["correct"] for r in rows),
            "format_rate": sum(r["format_ok"] for r in rows),
            "no_letter_rate": sum(r["format_ok"] and r["pred"] is None for r in rows),
            "template_copy_rate": sum(r["template_copy"] for r in rows),
            "answer_in_think_rate": sum(r["answer_in_think"] for r in rows),
            "reasoning_outside_think_rate": sum(r["reasoning_outside_think"] for r in rows),
            "response_tokens": mask.sum().item(), "response_chars": sum(len(r["response"]) for r in rows),
            "truncated_rate": sum(r["finish_reason"] == "length" for r in rows),
            "kl": exp["kl"].sum().item(),  # summed over tokens: the KL of a whole response
            "ev_n": mask.sum().item(), "ev_r": (returns * mask).sum().item(), "ev_r2": (returns ** 2 * mask).sum().item(),
            "ev_d": ((returns - values) * mask).sum().item(), "ev_d2": ((returns - values) ** 2 * mask).sum().item()}
    s = D.all_reduce_dict(sums)
    m = {k: s[k] / s["n"] for k in sums if not k.startswith("ev_") and k != "n"}
    m["samples"] = int(s["n"])
    var_r = s["ev_r2"] / s["ev_n"] - (s["ev_r"] / s["ev_n"]) ** 2
    var_d = s["ev_d2"] / s["ev_n"] - (s["ev_d"] / s["ev_n"]) ** 2
    m["explained_variance"] = 1 - var_d / var_r if var_r > 1e-12 else float("nan")  # 1 - Var[R - V] / Var[R]
    return m


def main(argv=None):
    cfg = parse_config(argv)
    rank, world, device, log, out, resume_from = start_run(cfg, check_config)

    # --- models: the trained policy, the frozen reference (the same base), the critic (PPO with GAE only)
    amp = cfg.dtype == "bfloat16" and device.type == "cuda"
    policy, tok = M.load_policy(str(resume_from / "policy") if resume_from else cfg.model, dtype="float32",
                                device=device, gradient_checkpointing=cfg.gradient_checkpointing)
    ref, _ = M.load_policy(cfg.model, dtype="bfloat16" if amp and not D.is_distributed() else "float32", device=device)
    ref.requires_grad_(False)
    critic = None
    if cfg.advantage == "gae":
        critic = M.load_critic(str(resume_from / "critic") if resume_from else (cfg.critic_model or cfg.model),
                               dtype="float32", device=device, gradient_checkpointing=cfg.gradient_checkpointing)
    for m in (policy, ref, critic):
        if m is not None:
            D.shard(m, M.layer_modules(m), mixed_precision=amp)

    records, texts = load_prompts(cfg, tok, log)
    total_steps = cfg.max_steps or cfg.num_epochs * len(records) // cfg.rollout_batch_size
    updates_per_step = (cfg.rollout_batch_size * cfg.n_samples_per_prompt // cfg.train_batch_size) * cfg.ppo_epochs
    opts, scheds = {}, {}
    for name, m, lr in (("policy", policy, cfg.actor_lr), ("critic", critic, cfg.critic_lr)):
        if m is not None:
            opts[name] = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
            scheds[name] = torch.optim.lr_scheduler.LambdaLR(
                opts[name], lr_schedule(total_steps * updates_per_step, cfg.warmup_ratio, cfg.min_lr_ratio))
    start, kl_coef = 1, cfg.kl_coef
    models = {"policy": policy, **({"critic": critic} if critic is not None else {})}  # same keys as opts, scheds
    if resume_from:
        state = C.load_training(resume_from, models, opts, scheds)
        start, kl_coef = state["step"] + 1, state["kl_coef"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        for f in ("metrics.jsonl", "rollouts.jsonl"):
            C.keep_steps_upto(out / f, start - 1) if resume_from else (out / f).unlink(missing_ok=True)
    log(f"{cfg.preset}: {M.count_parameters(policy) / 1e6:.1f}M-parameter policy on {world} x {device.type}, "
        f"{len(records)} questions, {total_steps} steps of {cfg.rollout_batch_size} x {cfg.n_samples_per_prompt} samples")

    stop = {}  # SIGTERM / Ctrl-C: finish the current step, save, exit; a second signal stops at once
    def on_signal(signum, _frame):
        if stop:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
    signal.signal(signal.SIGTERM, on_signal), signal.signal(signal.SIGINT, on_signal)

    bar = tqdm(range(start, total_steps + 1), initial=start - 1, total=total_steps, disable=rank != 0, dynamic_ncols=True)
    bad_in_a_row, saved = 0, 0
    for step in bar:
        t_step, timer = time.time(), {}
        if fault("raise", step, rank):
            raise RuntimeError(f"injected fault at step {step} on rank {rank}")
        picked = step_prompt_indices(cfg, len(records), step, rank, world)
        exp, rows = make_experience(cfg, step, [records[i] for _, i in picked], [texts[i] for _, i in picked],
                                    [p for p, _ in picked], policy, ref, critic, tok, device, timer)
        nonfinite = D.all_reduce_dict({"x": float(not torch.isfinite(exp["scores"]).all())})["x"] > 0
        exp["scores"] = torch.nan_to_num(exp["scores"], nan=0.0)  # keeps the metrics readable; the step is skipped
        exp = compute_advantages(cfg, exp, kl_coef)
        metrics = {"step": step, **step_metrics(exp, rows)}
        t0 = time.time()
        if nonfinite:
            metrics["skipped"] = "non-finite reward"
        elif cfg.advantage != "gae" and D.all_reduce_dict({"a": exp["advantages"].abs().sum().item()})["a"] == 0:
            metrics["skipped"] = "all advantages zero"  # every sample of every group scored the same: no signal
        else:
            for m in (policy, critic):
                if m is not None:
                    m.train()
            metrics.update(ppo_update(cfg, step, exp, policy, critic, opts, scheds, world, rank))
            if metrics["nonfinite_updates"]:
                metrics["skipped"] = f"{metrics['nonfinite_updates']} non-finite gradient(s)"
        timer["update"] = now(device) - t0
        bad_in_a_row = bad_in_a_row + 1 if "skipped" in metrics and "non-finite" in metrics["skipped"] else 0
        if "skipped" in metrics and rank == 0:
            log(f"step {step}: update skipped ({metrics['skipped']})")
        if cfg.kl_target > 0:
            kl_coef = adaptive_kl(kl_coef, metrics["kl"], cfg.kl_target, cfg.kl_horizon, metrics["samples"])
        metrics.update(kl_coef=kl_coef, actor_lr=scheds["policy"].get_last_lr()[0],
                       **({"critic_lr": scheds["critic"].get_last_lr()[0]} if critic is not None else {}),
                       **{f"time_{k}": v for k, v in timer.items()}, time_step=time.time() - t_step,
                       tokens_per_s=metrics["response_tokens"] * metrics["samples"] / (time.time() - t_step))
        all_rows = D.all_gather_objects(rows)
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            with open(out / "rollouts.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in sorted(sum(all_rows, []), key=lambda r: r["row"]))
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                            fmt=f"{metrics['format_rate']:.2f}", tmpl=f"{metrics['template_copy_rate']:.2f}",
                            len=f"{metrics['response_tokens']:.0f}")
        if bad_in_a_row >= cfg.max_nonfinite_steps:  # after the logs: the step that stops the run is logged too
            raise SystemExit(f"step {step}: {bad_in_a_row} steps in a row skipped for non-finite rewards, losses or "
                             f"gradients (--max_nonfinite_steps {cfg.max_nonfinite_steps}); stopping. The last checkpoint "
                             f"holds finite weights: inspect {out}/rollouts.jsonl, lower the learning rate, --resume.")
        stopping = D.all_reduce_dict({"s": float(bool(stop))})["s"] > 0
        if step % cfg.save_every == 0 or step == total_steps or stopping:
            C.save_training(Path(cfg.out_dir) / "checkpoints", step, models, opts, scheds, tok, asdict(cfg),
                            {"kl_coef": kl_coef, "data_position": step * cfg.rollout_batch_size},
                            keep_last=cfg.keep_last, slow=fault("slow_save", step))
            saved = step
        if stopping:
            log(f"stopped by {stop.get('signal', 'a signal on another rank')} after step {step}; checkpoint "
                f"{out}/checkpoints/step_{saved:06d} written; continue with --resume")
            break
    bar.close()
    D.cleanup()


def cli(argv=None):
    """The command line: what the user can fix (a malformed data file, a checkpoint that fails its manifest
    check, a disk that cannot be written) ends the run with its message and exit code 1, not a traceback
    from deep inside. main() itself raises, for callers that want the exception."""
    try:
        main(argv)
    except (data.DataError, C.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli()
