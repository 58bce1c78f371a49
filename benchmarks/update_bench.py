"""The pieces of bench.py's update section: the trainer's PPO update, run through
train_ppo.ppo_step itself on a synthetic step, and a plain transformers training loop on the same
rows to compare it with.

`ours_update` runs one whole train_ppo.ppo_step with the module `experience` replaced, for that
call, by a `SyntheticExperience`: its steps 1-4 (prompts, sampling, scoring, the reference and the
critic) hand out the rows of `update_batch`, and the trainer's own steps 5-7 (KL rewards, GAE
advantages, whitening, the PPO update) run on them unchanged. What is synthetic is listed in
update_batch's docstring. The time is the PhaseTimer's "update" phase: step 7 alone.
"""
import time

import torch
from torch.nn.functional import cross_entropy, mse_loss

import common
import experience
import train_ppo
from benchmarks.rollout_bench import sync


def update_batch(vocab, batch, prompt_len, response_len, seed=0, samples_per_prompt=1):
    """A step's experience on random tokens, as steps 1-4 of train_ppo.ppo_step would leave it.

    Synthetic: the tokens; the old log-probs (uniform in [-3, 0], so most ratios fall outside the
    clip range: the loss then takes the other branch of the same computation); the reference's (a
    little below them, so the KL rewards are not 0); the critic's values (normal, std 0.5); the
    verifier's scores (-1, 0 or +1 at random). From these ppo_step computes the KL rewards, GAE
    advantages and returns, whitened, as in training: non-zero, varied advantages.
    samples_per_prompt > 1: consecutive rows share their prompt and responses end at random lengths
    (between a third and all of response_len), as after sampling; else every response token counts
    (no padding: the plain baseline has none)."""
    g = torch.Generator().manual_seed(seed)
    L, T = prompt_len + response_len, response_len
    seq = torch.randint(0, vocab, (batch, L), generator=g)  # [B, L]
    mask = torch.ones(batch, T)  # [B, T]
    if samples_per_prompt > 1:
        shared = seq[::samples_per_prompt, :prompt_len]  # [B / n, P]
        seq[:, :prompt_len] = shared.repeat_interleave(samples_per_prompt, 0)
        lengths = torch.randint(T // 3, T + 1, (batch,), generator=g)  # [B]
        mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # [B, T]
    attn = torch.cat([torch.ones(batch, prompt_len, dtype=torch.long), mask.long()], 1)  # [B, L]
    old = -torch.rand(batch, T, generator=g) * 3 * mask  # [B, T]
    ref = old - 0.1 * torch.rand(batch, T, generator=g) * mask  # [B, T]
    values = 0.5 * torch.randn(batch, T, generator=g) * mask  # [B, T]
    scores = torch.randint(-1, 2, (batch,), generator=g).float()  # [B]
    return dict(seq=seq, attn=attn, mask=mask, old_logprobs=old, ref_logprobs=ref, values=values,
                scores=scores)


def sample_record(score: float) -> dict:
    """A sample's verdict as train_ppo.step_metrics and skip_reason read it, for a synthetic
    score."""
    return {"reward": score, "correct": score > 0, "format_ok": score >= 0,
            "pred": "A" if score >= 0 else None, "template_copy": False,
            "answer_in_think": False, "reasoning_outside_think": False, "response": "",
            "finish_reason": "length"}


class SyntheticExperience:
    """Stands in for the module `experience` inside train_ppo.ppo_step: steps 1-4 hand out the rows
    of update_batch instead of prompting, sampling, scoring and running the reference and the
    critic; the trainer's own steps 5-7 run on them unchanged."""

    def __init__(self, rows: dict):
        self.rows = rows

    def step_prompts(self, cfg, questions, step, rank, world):
        return None  # nothing to prompt: the rows are already there

    def sample_responses(self, cfg, models, prompts, step):
        r = self.rows
        return experience.Experience(sequences=r["seq"], attention_mask=r["attn"], mask=r["mask"],
                                     sampler_logprobs=r["old_logprobs"],
                                     finish_reason=["length"] * len(r["seq"]))

    def score_responses(self, cfg, tokenizer, prompts, exp, step):
        scores = self.rows["scores"]
        return scores, [sample_record(s) for s in scores.tolist()]

    def reference_and_critic(self, cfg, models, exp, timer):
        r = self.rows
        return r["old_logprobs"], r["ref_logprobs"], r["values"]


def update_config(args, device, group, pack) -> train_ppo.Config:
    """The demo preset with a critic (GAE: actor and critic both trained), sized to the rows."""
    B = args.update_batch
    return train_ppo.Config(**{
        **train_ppo.PRESETS["demo"], "model": args.model, "advantage": "gae",
        "rollout_batch_size": B // group, "n_samples_per_prompt": group, "train_batch_size": B,
        "micro_batch_size": args.micro_batch, "pack_samples": pack, "device": device.type,
        "dtype": args.dtype,
        # the models barely move between repeats: every run sees about the same weights
        "actor_lr": 1e-7, "critic_lr": 1e-7})


def ours_update(cfg, run, models, rows) -> float:
    """Seconds of the PPO update (step 7, the timer's "update" phase) of one train_ppo.ppo_step on
    the synthetic rows."""
    timer = common.PhaseTimer(run.device, train_ppo.PHASES)
    real = train_ppo.experience
    train_ppo.experience = SyntheticExperience(rows)
    try:
        metrics, _ = train_ppo.ppo_step(cfg, run, models, None, 1, cfg.kl_coef, timer)
    finally:
        train_ppo.experience = real
    if "skipped" in metrics:
        raise RuntimeError(f"the synthetic step skipped its update: {metrics['skipped']}")
    return timer.seconds["update"]


def plain_update(models, rows, micro_batch, device) -> float:
    """Seconds of what any transformers training loop does with the same rows, the same
    micro-batches and AdamW."""
    policy, critic = models.policy, models.critic
    seq = rows["seq"]
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, len(seq), micro_batch):
        ids = seq[s:s + micro_batch]  # [mb, L]
        with autocast_on(device):
            logits = policy(input_ids=ids).logits  # [mb, L, V]
            loss = cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        with autocast_on(device):
            v = critic(input_ids=ids).logits[..., 0]  # [mb, L]
            loss = mse_loss(v.float(), torch.zeros_like(v, dtype=torch.float32))
        loss.backward()
    for name, m in models.trained().items():
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        models.optimizers[name].step()
        models.optimizers[name].zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def autocast_on(device):
    """bf16 autocast on a GPU, as train_ppo does there; nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")



def paper_update(args, limits) -> list[str]:
    """bench.py's paper rows of the update: the packed PPO update of args.model (the paper-sized
    random model), the actor alone (--advantage grpo: no critic) and then actor + critic (GAE).
    MFU counts the tokens the packed forwards compute (padding of the packed rows included)
    against the measured peak. A configuration that does not fit in memory gets a row that says
    so."""
    from model import response_batch
    device = torch.device(args.device)
    B, mb, group = args.update_batch, args.micro_batch, args.update_group
    synthetic = update_batch(2 ** 10, B, args.prompt_len, args.response_len,
                             samples_per_prompt=group)
    rows = {k: v.to(device) for k, v in synthetic.items()}
    computed = sum(response_batch(rows["seq"][s:s + mb], rows["attn"][s:s + mb],
                                  rows["mask"][s:s + mb], True).input_ids.numel()
                   for s in range(0, B, mb))
    what = (f"{B // group} prompts x {group} samples x {args.prompt_len} + up to "
            f"{args.response_len} tokens, packed, micro-batch {mb}")
    out = []
    for with_critic in (False, True):
        label = "actor + critic" if with_critic else "actor alone"
        try:
            seconds, n_params = timed_update(args, device, rows, with_critic)
            mfu = 6 * n_params * computed / seconds / limits["peak_flops"]
            out.append(f"| update | {label}: {what}: {seconds:.2f} s | {computed} tokens "
                       f"computed, MFU {mfu:.0%} | target >= 35% |")
        except torch.OutOfMemoryError:
            out.append(f"| update | {label}: {what} | does not fit in memory | |")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the models of this run are gone: give their memory back
    return out


def timed_update(args, device, rows, with_critic) -> tuple[float, int]:
    """(best seconds of args.repeats timed updates after a warm-up, trained parameters)."""
    import dataclasses
    from pathlib import Path

    from model import count_parameters, load_critic, load_policy
    policy, tok = load_policy(args.model, device=device)  # fp32 master weights
    critic = load_critic(policy).to(device) if with_critic else None
    models = train_ppo.Models(policy, None, critic, tok, device)
    for m in models.trained().values():
        m.train()
    cfg = dataclasses.replace(update_config(args, device, args.update_group, True),
                              advantage="gae" if with_critic else "grpo",
                              gradient_checkpointing=True)
    train_ppo.add_optimizers(cfg, models, total_steps=1000)
    run = common.Run(cfg, rank=0, world=1, device=device, out=Path.cwd(), resume_from=None)
    seconds = [ours_update(cfg, run, models, rows) for _ in range(1 + args.repeats)]
    return min(seconds[1:]), sum(count_parameters(m) for m in models.trained().values())
