"""bench.py's sections that run whole programs in child processes, for a clean peak memory each:

  step  one PPO step of the demo preset (benchmarks/ppo_step.py runs train_ppo.main), padded rows
        then packed (the default), same samples, phase by phase; then the demo_lora preset (rank-1
        adapters on one frozen base): time and peak memory with and without LoRA
  grpo  a GRPO-mode step on TRL's settings, and TRL's GRPOTrainer with --trl_python
  fsdp  bytes per rank of actor and critic under FSDP2 at 1 and 2 processes
        (benchmarks/fsdp_memory.py under torchrun)
"""
import sys
import tempfile

import torch

import train_ppo
from benchmarks.measure import FREED_BLOCKS_RETURNED, GB, Part, row, run_child


def ppo_steps(train_args: list, timeout: float, env: dict | None = None) -> dict:
    """benchmarks/ppo_step.py's report of a run of train_ppo.py with these flags."""
    with tempfile.TemporaryDirectory(prefix="bench_step_") as out:
        cmd = [sys.executable, "-m", "benchmarks.ppo_step", *train_args, "--out_dir", out]
        return run_child(cmd, "BENCH_STEP", timeout, env)


def held(device: str) -> str:
    return "peak GPU memory allocated" if device == "cuda" else "peak RSS"


def budget_text(budget: dict) -> str:
    """The budget of ppo_step.memory_budget as 'weights a + ... = total GB'."""
    names = {"weights": "weights", "gradients": "gradients", "adamw": "AdamW",
             "sampler_weights": "the sampler's copy", "kv_cache": "KV cache"}
    parts = " + ".join(f"{names[k]} {v / GB:.2f}" for k, v in budget.items() if v)
    return f"{parts} = {sum(budget.values()) / GB:.2f} GB"


def peak_of(report: dict) -> float:
    return next(iter(report["peak"].values()), float("nan"))


# ==================================================================================================
# step
# ==================================================================================================
def parts(args) -> list[Part]:
    reports = {}  # the children's reports by name, shared: the LoRA part reuses the packed run
    return [Part("step", "demo step, padded and packed", lambda: padded_and_packed(args, reports)),
            Part("step", "demo step without and with LoRA",
                 lambda: without_and_with_lora(args, reports))]


# demo_lora's adapters, as flags (the smoke preset takes them in --quick)
LORA_FLAGS = ["--lora_rank", str(train_ppo.PRESETS["demo_lora"]["lora_rank"]),
              "--lora_alpha", str(train_ppo.PRESETS["demo_lora"]["lora_alpha"])]


def step_flags(args, lora: bool = False) -> list[str]:
    """The step section's run: one step of the demo preset (demo_lora with LoRA); --quick: of the
    smoke preset (with demo_lora's adapters)."""
    if args.quick:
        preset = ["--preset", "smoke", *(LORA_FLAGS if lora else [])]
    else:
        preset = ["--preset", "demo_lora" if lora else "demo"]
    # no held-out evaluation: it is not part of a training step
    return [*preset, "--max_steps", "1", "--eval_every", "0", *args.train_device]


def padded_and_packed(args, reports: dict) -> list[str]:
    """One demo step twice: padded rows (--pack_samples false, as a plain training loop would)
    then packed (each prompt once for its samples), same samples, phase by phase."""
    flags = step_flags(args)
    for name, pack in (("padded", "false"), ("packed", "true")):
        reports[name] = ppo_steps(flags + ["--pack_samples", pack], 1200)
    m = {name: reports[name]["metrics"][0] for name in ("padded", "packed")}

    def time_of(name, phase):
        return m[name].get(f"time_{phase}", 0.0)

    packed_step, padded_step = time_of("packed", "step"), time_of("padded", "step")
    rows = [row("step", f"{' '.join(flags)}: whole step ({m['packed']['samples']} samples, "
                        f"{m['packed']['response_tokens']:.0f} response tokens each on average), "
                        f"packed (padded)", f"{packed_step:.1f} s ({padded_step:.1f} s)",
                f"100%; {padded_step / packed_step:.2f}x faster than padded")]
    for phase in (*train_ppo.PHASES, "other"):
        if phase == "eval":
            continue
        if phase == "other":
            t = {n: time_of(n, "step") - sum(time_of(n, x) for x in train_ppo.PHASES) for n in m}
            label = "other (advantages, metrics, logs)"
        else:
            t = {n: time_of(n, phase) for n in m}
            label = phase
        speed = f"; {t['padded'] / t['packed']:.2f}x" if t["packed"] > 0.5 else ""
        rows.append(row("step", f"{label}, packed (padded)",
                        f"{t['packed']:.1f} s ({t['padded']:.1f} s)",
                        f"{t['packed'] / packed_step:.0%}{speed}"))
    for name in ("packed", "padded"):
        b = reports[name]["budget"]
        peak = peak_of(reports[name])
        rows.append(row("step", f"{name}: {held(args.device)} of the step vs {budget_text(b)}",
                        f"{peak / GB:.2f} GB",
                        f"{peak / sum(b.values()):.2f}x (target <= 2x)"))
    a, b = (m[n].get("policy_loss", float("nan")) for n in ("packed", "padded"))
    if args.device == "cuda":  # bf16: packing changes the matmuls' shapes, so their rounding
        rows.append(row("step", f"same samples: policy_loss packed {a:.7f}, padded {b:.7f}",
                        f"differ by {abs(a - b) / max(abs(b), 1e-12):.1%}",
                        "bf16 autocast: rows packed or padded round differently"))
        return rows
    same = abs(a - b) <= 1e-6 * max(1.0, abs(b))  # the same samples and loss, up to float rounding
    rows.append(row("step", f"same samples, same loss: policy_loss packed {a:.7f}, padded "
                            f"{b:.7f}", "equal to 1e-6" if same else "DIFFERENT"))
    return rows


def without_and_with_lora(args, reports: dict) -> list[str]:
    """The packed step (its report from padded_and_packed when that ran) against the same step
    with the demo_lora preset's adapters: the whole step, its update, its peak memory."""
    flags = step_flags(args)
    if "packed" not in reports:
        reports["packed"] = ppo_steps(flags, 1200)
    lora_flags = step_flags(args, lora=True)
    reports["lora"] = ppo_steps(lora_flags, 1200)
    full, lora = reports["packed"], reports["lora"]
    rows = []
    for report, what in ((full, f"{' '.join(flags)} (every weight trained)"),
                         (lora, f"{' '.join(lora_flags)} (LoRA)")):
        m = report["metrics"][0]
        faster = full["metrics"][0]["time_step"] / m["time_step"]
        smaller = peak_of(report) / peak_of(full)
        rows.append(row("step", f"{what}: whole step; update",
                        f"{m['time_step']:.1f} s; {m.get('time_update', 0.0):.1f} s",
                        f"{faster:.2f}x the full step's speed" if report is lora else ""))
        rows.append(row("step", f"{what}: {held(args.device)} of the step vs "
                                f"{budget_text(report['budget'])}",
                        f"{peak_of(report) / GB:.2f} GB",
                        f"{smaller:.2f}x the full step's" if report is lora else ""))
    if args.device == "cuda":  # PyTorch's allocator counts live tensors only
        return rows
    peaks = [peak_of(ppo_steps(f, 1200, FREED_BLOCKS_RETURNED)) for f in (flags, lora_flags)]
    rows.append(row("step", "the same two steps, full fine-tuning / LoRA, glibc giving freed "
                            "blocks back (MALLOC_MMAP_THRESHOLD_=131072): peak RSS (time not "
                            "compared: slower)", f"{peaks[0] / GB:.2f} / {peaks[1] / GB:.2f} GB",
                    f"{peaks[1] / peaks[0]:.2f}x the full step's"))
    return rows


# ==================================================================================================
# grpo
# ==================================================================================================
def grpo_parts(args) -> list[Part]:
    ours = {}  # our mean step, for TRL's row

    def trl_rows():
        if not args.trl_python or args.quick:
            return [row("grpo", "TRL GRPOTrainer", "not run",
                        "pass --trl_python PATH (a venv with trl, see benchmarks/trl_grpo.py)")]
        cmd = [args.trl_python, "-m", "benchmarks.trl_grpo", "--steps", str(args.trl_steps),
               "--device", args.device]
        t = run_child(cmd, "BENCH_TRL", 3000)
        mean_trl = sum(t["seconds"]) / len(t["seconds"])
        versus = f"; ours {ours['mean'] / mean_trl:.2f}x TRL's time (target <= 0.5x)" \
            if "mean" in ours else ""
        return [row("grpo", f"TRL {t['trl']} GRPOTrainer, same model, prompts, 8 x <= 128 tokens, "
                            f"beta 0.01 (steps {', '.join(f'{s:.1f}' for s in t['seconds'])})",
                    f"{mean_trl:.1f} s", f"mean completion "
                    f"{sum(t['mean_length']) / len(t['mean_length']):.0f} tokens{versus}")]

    return [Part("grpo", "ours, GRPO on TRL's settings", lambda: grpo_rows(args, ours)),
            Part("grpo", "TRL GRPOTrainer", trl_rows)]


def grpo_rows(args, ours: dict) -> list[str]:
    steps = args.grpo_steps
    flags = ["--preset", "demo", "--advantage", "grpo", "--rollout_batch_size", "1",
             "--n_samples_per_prompt", "8", "--max_new_tokens", "128", "--train_batch_size", "8",
             "--max_steps", str(steps), "--eval_every", "0", *args.train_device]
    if args.quick:  # a tiny model, short prompts and responses: only checks that the section runs
        flags += ["--model", "tiny-qwen2", "--max_prompt_tokens", "4096", "--max_new_tokens",
                  "16"]
    r = ppo_steps(flags, 1800)
    times = [m["time_step"] for m in r["metrics"]]
    updated = [m for m in r["metrics"] if "skipped" not in m]
    lengths = [m["response_tokens"] for m in r["metrics"]]
    ours["mean"] = sum(times) / len(times)
    return [row("grpo", f"ours: {' '.join(flags[2:])}; seconds per step (steps "
                        f"{', '.join(f'{s:.1f}' for s in times)}; {len(updated)} of {steps} "
                        f"updated)", f"{ours['mean']:.1f} s",
                f"mean completion {sum(lengths) / len(lengths):.0f} tokens")]


# ==================================================================================================
# fsdp
# ==================================================================================================
def rank_bytes(ranks) -> int:
    """Bytes of actor and critic, parameters, gradients and AdamW together, on the fullest rank."""
    return max(sum(v for part in r.values() for v in part.values()) for r in ranks)


def fsdp_parts(args) -> list[Part]:
    return [Part("fsdp", "per-rank bytes at 1 and 2 processes", lambda: fsdp_rows(args))]


def fsdp_rows(args) -> list[str]:
    """N processes on N GPUs with nccl where the machine has them, else on the CPU with gloo (the
    bytes of a shard do not depend on the device; a machine with one GPU runs N=1 on it and N=2 on
    the CPU)."""
    per_world, backend = {}, {}
    for n in (1, 2):
        on_gpu = args.device == "cuda" and torch.cuda.device_count() >= n
        backend[n] = f"nccl on {n} GPU{'s' * (n > 1)}" if on_gpu else "gloo on the CPU"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", "-m", "benchmarks.fsdp_memory", "--model", args.model,
               "--device", "cuda" if on_gpu else "cpu"]
        per_world[n] = run_child(cmd, "BENCH_FSDP", 900)["ranks"]
    rows = [row("fsdp", f"N=1: {backend[1]}; N=2: {backend[2]}")]
    for part in ("actor", "critic"):
        for kind in ("params", "grads", "adamw"):
            one = per_world[1][0][part][kind]
            two = max(rank[part][kind] for rank in per_world[2])  # the fullest rank
            rows.append(row("fsdp", f"{args.model} {part} {kind} per rank: N=1 -> N=2",
                            f"{one / 2 ** 20:.1f} -> {two / 2 ** 20:.1f} MiB",
                            f"{two / one:.2f} (target <= 0.6)"))
    one, two = rank_bytes(per_world[1]), rank_bytes(per_world[2])
    rows.append(row("fsdp", "actor + critic, all three, per rank: N=1 -> N=2",
                    f"{one / 2 ** 20:.1f} -> {two / 2 ** 20:.1f} MiB", f"{two / one:.2f}"))
    return rows
