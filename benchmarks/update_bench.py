"""bench.py's update rows: the trainer's PPO update, run through train_ppo.ppo_step itself on a
synthetic step, against a plain transformers training loop on the same rows.

`ours_update` runs one whole train_ppo.ppo_step with experience.py's functions of steps 1-4
(prompts, sampling, scoring, the reference and the critic) replaced, for that call, by a
`SyntheticExperience`'s, which hand out the rows of `synthetic_rows`; the trainer's own steps 5-7
(KL rewards, advantages, whitening, the PPO update) run on them unchanged. What is synthetic is
listed in synthetic_rows's docstring. The time is the PhaseTimer's "update" phase: step 7 alone.
The models are the trainer's own (roles.load: gradient checkpointing, LoRA and the compute dtype
as the flags say); no reference is loaded, as step 7 only reads its log-probs.

The update section (the --model, smollm2-135m by default): unique prompts (ours' own overhead
against the plain loop), prompts shared by --update_group samples (padded and packed), and the
update with and without LoRA adapters (time and peak memory). The paper section's update rows
(`paper_parts`): the packed update of Qwen2.5-3B's shape, actor alone, actor + critic, and actor +
critic with LoRA, each only where benchmarks/memory_plan.py says it fits the GPU.
"""
import contextlib
import functools
import time
from dataclasses import dataclass

import torch
from torch.nn.functional import cross_entropy, mse_loss

import common
import experience
import roles
import samplers
import train_ppo
from benchmarks import machine, memory_plan
from benchmarks.measure import (
    GB,
    ROOT,
    Part,
    current_bytes,
    device_memory,
    peak_bytes,
    reset_peak,
    return_freed_blocks,
    row,
    sync,
)
from model import response_batch


@dataclass(frozen=True)
class Rows:
    """The synthetic step's shape."""
    batch: int  # samples
    group: int  # samples per prompt (1: unique prompts)
    prompt_len: int
    response_len: int
    micro_batch: int


def synthetic_rows(vocab: int, rows: Rows, device, seed: int = 0) -> dict:
    """A step's experience on random tokens, as steps 1-4 of train_ppo.ppo_step would leave it.

    Synthetic: the tokens; the old log-probs (uniform in [-3, 0], so most ratios fall outside the
    clip range: the loss then takes the other branch of the same computation); the reference's (a
    little below them); the critic's values (normal, std 0.5); the verifier's scores (-1, 0 or +1
    at random). From these ppo_step computes the rewards, advantages and returns, whitened, as in
    training: non-zero, varied advantages. rows.group > 1: consecutive rows share their prompt and
    responses end at random lengths (between a third and all of response_len), as after sampling;
    else every response token counts (no padding: the plain baseline has none)."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = rows.batch, rows.prompt_len, rows.response_len
    seq = torch.randint(0, vocab, (B, P + T), generator=g)  # [B, P+T]
    mask = torch.ones(B, T)  # [B, T]
    if rows.group > 1:
        shared = seq[::rows.group, :P]  # [B / n, P]
        seq[:, :P] = shared.repeat_interleave(rows.group, 0)
        lengths = torch.randint(T // 3, T + 1, (B,), generator=g)  # [B]
        mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # [B, T]
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1)  # [B, P+T]
    old = -torch.rand(B, T, generator=g) * 3 * mask  # [B, T]
    ref = old - 0.1 * torch.rand(B, T, generator=g) * mask  # [B, T]
    values = 0.5 * torch.randn(B, T, generator=g) * mask  # [B, T]
    scores = torch.randint(-1, 2, (B,), generator=g).float()  # [B]
    out = dict(seq=seq, attn=attn, mask=mask, old_logprobs=old, ref_logprobs=ref, values=values,
               scores=scores)
    return {k: v.to(device) for k, v in out.items()}


def sample_record(score: float) -> dict:
    """A sample's verdict as train_ppo.step_metrics and skip_reason read it, for a synthetic
    score."""
    return {"reward": score, "correct": score > 0, "format_ok": score >= 0,
            "pred": "A" if score >= 0 else None, "template_copy": False,
            "answer_in_think": False, "reasoning_outside_think": False, "response": "",
            "finish_reason": "length"}


class SyntheticExperience:
    """Steps 1-4 of train_ppo.ppo_step on synthetic rows: they hand out the rows instead of
    prompting, sampling, scoring and running the reference and the critic; the trainer's own
    steps 5-7 run on them unchanged."""
    STEPS = ("step_prompts", "sample_responses", "score_responses", "reference_and_critic")

    def __init__(self, rows: dict):
        self.rows = rows

    def step_prompts(self, questions, batching, step, rank, world):
        return None  # nothing to prompt: the rows are already there

    def sample_responses(self, sampler, tokenizer, prompts, sampling, step):
        return None  # nothing to sample: the rows are already there

    def score_responses(self, rolled, prompts, sampling, scoring, tokenizer, step):
        r = self.rows
        return experience.Samples(r["seq"], r["attn"], r["mask"], r["old_logprobs"], r["scores"],
                                  [sample_record(s) for s in r["scores"].tolist()])

    def reference_and_critic(self, models, samples, forwarding, timer):
        r = self.rows
        return experience.Forwards(r["old_logprobs"], r["ref_logprobs"], r["values"])


@contextlib.contextmanager
def synthetic_steps_1_to_4(rows: dict):
    """Within the block, experience.py's functions of steps 1-4 are SyntheticExperience's (ppo_step
    calls them through the module)."""
    synthetic = SyntheticExperience(rows)
    real = {name: getattr(experience, name) for name in SyntheticExperience.STEPS}
    for name in real:
        setattr(experience, name, getattr(synthetic, name))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(experience, name, fn)


def update_config(model: str, device, dtype: str, rows: Rows, **flags) -> train_ppo.Config:
    """The demo preset sized to the rows, with train_ppo's `flags` on top (default: GAE, actor and
    critic both trained). kl_coef 0: no reference is loaded (its log-probs are synthetic inputs).
    The learning rates are tiny: every repeat sees about the same weights."""
    cfg = train_ppo.Config(**{
        **train_ppo.PRESETS["demo"], "model": model, "advantage": "gae",
        "rollout_batch_size": rows.batch // rows.group, "n_samples_per_prompt": rows.group,
        "train_batch_size": rows.batch, "micro_batch_size": rows.micro_batch,
        "max_prompt_tokens": rows.prompt_len, "max_new_tokens": rows.response_len,
        "device": torch.device(device).type, "dtype": dtype, "kl_coef": 0.0, "actor_lr": 1e-7,
        "critic_lr": 1e-7, **flags})
    if problems := train_ppo.check_config(cfg):
        raise ValueError("update_bench.update_config: " + "; ".join(problems))
    return cfg


def load_models(cfg: train_ppo.Config):
    """(roles.Models with AdamW, common.Run) of `cfg`, as the trainer loads them. The sampler is
    the teaching core's, which takes no weights: steps 1-4 are synthetic, nothing is sampled."""
    device = torch.device(cfg.device)
    run = common.Run(cfg, rank=0, world=1, device=device, out=ROOT, resume_from=None)
    models = roles.load(cfg, run)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    models.sampler = samplers.Plain(models.base if models.base is not None else models.policy,
                                    dtype)
    train_ppo.add_optimizers(cfg, models, total_steps=1000)
    return models, run


def ours_update(cfg, run, models, rows: dict) -> float:
    """Seconds of the PPO update (step 7, the timer's "update" phase) of one train_ppo.ppo_step on
    the synthetic rows."""
    timer = common.PhaseTimer(run.device, train_ppo.PHASES)
    with synthetic_steps_1_to_4(rows):
        metrics, _ = train_ppo.ppo_step(cfg, run, models, None, 1, cfg.kl_coef, timer)
    if "skipped" in metrics:
        raise RuntimeError(f"the synthetic step skipped its update: {metrics['skipped']}")
    return timer.seconds["update"]


def plain_update(models, rows: dict, micro_batch: int, device) -> float:
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
    for name, item in models.trained.items():
        torch.nn.utils.clip_grad_norm_(item.params, 1.0)
        models.optimizers[name].step()
        models.optimizers[name].zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def autocast_on(device):
    """bf16 autocast on a GPU, as train_ppo does there; nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def flops_per_token(models) -> float:
    """Model FLOPs of one token through the update: 6N for a model trained whole (forward 2N,
    backward 4N: Kaplan et al. 2020, section 2.1), 4N for a LoRA role (its frozen base has no weight
    gradients: forward 2N, input gradients 2N). Checkpointing's recomputation is not counted (MFU's
    convention, Chowdhery et al. 2022, appendix B)."""
    total = 0.0
    for role in (models.policy, models.critic):
        if role is not None:
            n = sum(p.numel() for p in role.parameters())
            whole = all(p.requires_grad for p in role.parameters())
            total += (6 if whole else 4) * n
    return total


def computed_tokens(rows: dict, micro_batch: int, packed: bool) -> int:
    """Tokens the trainer's forwards compute: its micro-batches trimmed, or packed."""
    return sum(response_batch(rows["seq"][s:s + micro_batch], rows["attn"][s:s + micro_batch],
                              rows["mask"][s:s + micro_batch], packed).input_ids.numel()
               for s in range(0, len(rows["seq"]), micro_batch))


def alternate(runs: dict, repeats: int) -> dict:
    """{name: best seconds} of `repeats` rounds of every run, alternating so that all see the same
    background load, after one untimed round at the same shapes (kernels, allocator, AdamW's
    state)."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(fn())
    return {name: min(t) for name, t in times.items()}


def describe(rows: Rows, response_tokens: int | None = None) -> str:
    if rows.group == 1:
        return (f"{rows.batch} x {rows.prompt_len + rows.response_len} tokens, unique prompts, "
                f"{rows.response_len} response tokens each, micro-batch {rows.micro_batch}")
    counted = f" ({response_tokens} response tokens)" if response_tokens is not None else ""
    return (f"{rows.batch // rows.group} prompts x {rows.group} samples, {rows.prompt_len} + up "
            f"to {rows.response_len} tokens{counted}, micro-batch {rows.micro_batch}")


# ==================================================================================================
# The update section
# ==================================================================================================
def parts(args, limits: dict) -> list[Part]:
    shared = Rows(args.update_batch, args.update_group, args.prompt_len, args.response_len,
                  args.micro_batch)
    unique = Rows(args.update_batch, 1, args.prompt_len, args.response_len, args.micro_batch)
    return [Part("update", "unique prompts, ours vs plain",
                 lambda: against_plain(args, limits, unique)),
            Part("update", "shared prompts, ours padded and packed vs plain",
                 lambda: against_plain(args, limits, shared)),
            Part("update", "shared prompts, packed, without and with LoRA",
                 lambda: with_and_without_lora(args, shared))]


def against_plain(args, limits: dict, rows: Rows) -> list[str]:
    """The trainer's update against the plain loop on the same rows; MFU counts the tokens each
    one actually computes."""
    device = torch.device(args.device)
    cfg = update_config(args.model, device, args.dtype, rows)
    models, run = load_models(cfg)
    batch = synthetic_rows(models.policy.config.vocab_size, rows, device)
    runs = {"plain": functools.partial(plain_update, models, batch, rows.micro_batch, device)}
    # tokens each one computes: the plain loop every column of every row; ours trims
    # micro-batches or packs them
    computed = {"plain": batch["seq"].numel()}
    for name, pack in (("padded", False), ("packed", True)):
        if pack and rows.group == 1:
            continue  # nothing shared: nothing to pack
        packed_cfg = update_config(args.model, device, args.dtype, rows, pack_samples=pack)
        runs[name] = functools.partial(ours_update, packed_cfg, run, models, batch)
        computed[name] = computed_tokens(batch, rows.micro_batch, pack)
    seconds = alternate(runs, args.repeats)
    labels = {"plain": "plain transformers forward + backward + AdamW",
              "padded": "train_ppo.ppo_step's update, padded rows" if rows.group > 1
              else "train_ppo.ppo_step's update (actor + critic)",
              "packed": "train_ppo.ppo_step's update, packed (each prompt once)"}
    what = describe(rows, int(batch["mask"].sum()))
    peak = machine.limit(limits, "peak_flops")
    out = []
    for name, sec in seconds.items():
        mfu = flops_per_token(models) * computed[name] / sec / peak
        out.append(row("update", f"{labels[name]}, {what}: {sec:.2f} s",
                       f"{computed[name]} tokens computed, MFU {mfu:.0%}",
                       f"{seconds['plain'] / sec:.2f}x plain"))
    return out


def with_and_without_lora(args, rows: Rows) -> list[str]:
    """The packed update of actor + critic, every weight trained against rank-1 LoRA adapters
    (the demo_lora preset's) on one frozen base: seconds, then (one more update each, on the CPU
    with glibc giving freed blocks back: measure.return_freed_blocks) the update's peak memory
    above what was held before it (activations and gradients; AdamW's state exists from the
    warm-up)."""
    device = torch.device(args.device)
    adapters = {k: train_ppo.PRESETS["demo_lora"][k] for k in ("lora_rank", "lora_alpha")}
    settings = {"full fine-tuning": {}, f"LoRA rank {adapters['lora_rank']}": adapters}
    loaded, runs = {}, {}
    for label, flags in settings.items():
        cfg = update_config(args.model, device, args.dtype, rows, pack_samples=True, **flags)
        models, run = load_models(cfg)
        batch = synthetic_rows(models.policy.config.vocab_size, rows, device)
        loaded[label] = models
        runs[label] = functools.partial(ours_update, cfg, run, models, batch)
    seconds = alternate(runs, args.repeats)
    if device.type == "cpu":
        return_freed_blocks()  # after this part, only --quick times anything in this process
    growth = {}
    for label, update in runs.items():
        before = current_bytes(device)
        reset_peak(device)
        update()
        growth[label] = peak_bytes(device) - before
    full = seconds["full fine-tuning"]
    what = "peak RSS" if device.type == "cpu" else "peak GPU memory"
    out = []
    for label, sec in seconds.items():
        trained = sum(p.numel() for item in loaded[label].trained.values() for p in item.params)
        out.append(row("update", f"train_ppo.ppo_step's update, actor + critic, {label}, packed, "
                                 f"{describe(rows)}: {sec:.2f} s",
                       f"{trained:,} trained parameters; {what} above the models "
                       f"{growth[label] / GB:.3f} GB", f"{full / sec:.2f}x full fine-tuning"))
    return out


# ==================================================================================================
# The paper section's update rows
# ==================================================================================================
PAPER_UPDATES = {"actor alone": dict(advantage="grpo"),
                 "actor + critic": dict(advantage="gae"),
                 "actor + critic, LoRA rank 1 (paper_lora)": dict(
                     advantage="gae", lora_rank=train_ppo.PRESETS["paper_lora"]["lora_rank"],
                     lora_alpha=train_ppo.PRESETS["paper_lora"]["lora_alpha"])}


def paper_parts(args, limits: dict, model: str) -> list[Part]:
    """One part a setting of PAPER_UPDATES, on `model` (the paper-sized random model)."""
    return [Part("paper", f"update, {label}",
                 lambda label=label: paper_update(args, limits, model, label))
            for label in PAPER_UPDATES]


def paper_update(args, limits: dict, model: str, label: str) -> list[str]:
    """The packed update with gradient checkpointing, best of args.repeats after a warm-up, its
    MFU against the measured peak, and its peak memory against memory_plan's arithmetic. A setting
    the arithmetic says does not fit the GPU is not tried."""
    device = torch.device(args.device)
    rows = Rows(args.update_batch, args.update_group, args.prompt_len, args.response_len,
                args.micro_batch)
    cfg = update_config(model, device, args.dtype, rows, pack_samples=True,
                        gradient_checkpointing=True, **PAPER_UPDATES[label])
    shape = memory_plan.shape_of(memory_plan.config_for(model))
    need = memory_plan.plan(cfg, shape, with_sampler=False).peak
    what = (f"update, {label}: {rows.batch // rows.group} prompts x {rows.group} samples x "
            f"{rows.prompt_len} + up to {rows.response_len} tokens, packed, micro-batch "
            f"{rows.micro_batch}, gradient checkpointing")
    capacity = device_memory(device)
    if capacity is not None and need > capacity:
        return [row("paper", what, "not run", f"memory_plan: needs {need / GB:.1f} GB, the GPU "
                                              f"holds {capacity / GB:.1f} GB")]
    models, run = load_models(cfg)
    batch = synthetic_rows(shape.vocab, rows, device)
    computed = computed_tokens(batch, rows.micro_batch, True)
    reset_peak(device)
    seconds = alternate({label: lambda: ours_update(cfg, run, models, batch)}, args.repeats)
    peak = peak_bytes(device)
    mfu = flops_per_token(models) * computed / seconds[label] / machine.limit(limits, "peak_flops")
    held = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS of the process"
    return [row("paper", f"{what}: {seconds[label]:.2f} s", f"{computed} tokens computed, MFU "
                                                             f"{mfu:.0%}", "target >= 35%"),
            row("paper", f"{what}: {held}", f"{peak / GB:.2f} GB",
                f"memory_plan {need / GB:.2f} GB")]
