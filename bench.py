"""Where the time and memory of an RLVR run go, against baselines and against this machine's own
limits. Run from the repository root:

    python bench.py                          # every section, writes BENCHMARKS.md
    python bench.py --quick                  # small sizes and a tiny model: checks the script runs
    python bench.py --only machine,update    # sections: machine generation update step fsdp grpo
                                             # paper
    python bench.py --trl_python /work/trl-venv/bin/python   # adds TRL's GRPOTrainer (own venv)

Sections, each a row group of the table, every ratio measured in this one run (alternating where it
matters):
  machine     peak matmul FLOP/s (fp32 2048^2 and 4096^2 on CPU, bf16 4096^2 and 8192^2 on GPU),
              copy bandwidth
  generation  useful tokens/s of transformers' generate, the fast engine (engine.generate) and the
              teaching core (rollout.generate) on benchmarks/rollout_bench.py's workloads; prefill
              seconds, and decode ms/step vs the bound bandwidth / (weight bytes + KV cache bytes)
  update      the PPO update of train_ppo.ppo_step (step 7: actor log-probs + policy_loss, critic
              values + value_loss, backward, AdamW) on a synthetic step (benchmarks/update_bench.py)
              vs a plain transformers forward + backward (logits, cross-entropy; critic logits,
              MSE) + AdamW on the same rows: unique prompts (ours' overhead), then prompts shared
              by --update_group samples (packed and padded); ratio, MFU = 6 x parameters x tokens
              computed / s / measured peak
  step        one whole PPO step of the demo preset (python -m benchmarks.ppo_step runs
              train_ppo.main), padded rows then packed (the default), same samples: the time_*
              fields of metrics.jsonl, and the step's peak RSS against weights + gradients + AdamW
              + KV cache
  fsdp        bytes per rank of parameters, gradients and AdamW state of actor and critic under
              FSDP2, torchrun with 1 and 2 processes (gloo): benchmarks/fsdp_memory.py
  grpo        a GRPO-mode step on TRL's settings (1 prompt x 8 completions of <= 128 tokens) vs
              TRL's GRPOTrainer (benchmarks/trl_grpo.py, only with --trl_python: TRL is never a
              project dependency)
  paper       the paper's model size (model_zoo's random-qwen2.5-3b): decode at batch 64 and 256
              vs the HBM bound, the update's MFU (actor alone, actor + critic), one paper-preset
              step by phase and its peak memory; on a GPU only ("not measured: no GPU" elsewhere;
              --quick runs it scaled down)
On a machine with CUDA (--device auto takes it) every section runs there in bf16 (autocast over fp32
master weights in the update and the steps, as train_ppo.py on one GPU), with GPU-sized defaults,
and the table goes to a block of its own in BENCHMARKS.md. --cudnn_attention true lets every
section, ours and the baselines, use cuDNN's SDPA kernel (engine.generate never does).
Timings on a shared machine are noisy: the load average at start and end is written with the table.
"""
import argparse
import datetime
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
import train_ppo
from benchmarks import rollout_bench, update_bench
from benchmarks.rollout_bench import sync
from model import count_parameters, load_critic, load_policy, response_batch

ROOT = Path(__file__).resolve().parent
SECTIONS = ["machine", "generation", "update", "step", "fsdp", "grpo", "paper"]
GB = 1e9


def best_time(fn, repeats):
    """Least wall-clock seconds of `repeats` calls (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def describe_machine(device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"GPU {props.name} ({props.total_memory / 2 ** 30:.0f} GiB, "
                f"{props.multi_processor_count} SMs), {os.cpu_count()} CPU cores, "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


# ==================================================================================================
# machine: the limits every other number is compared with
# ==================================================================================================
def format_flops(flops: float, device) -> str:
    if device.type == "cuda":
        return f"{flops / 1e12:.0f} TFLOP/s"
    return f"{flops / GB:.0f} GFLOP/s"


def bench_machine(args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peaks = {}
    for n in args.matmul_sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        product = torch.empty(n, n, device=device, dtype=dtype)

        def matmul():
            torch.mm(a, b, out=product)
            sync(device)

        matmul()  # warm-up
        seconds = best_time(matmul, args.repeats + 1)
        peaks[n] = 2 * n ** 3 / seconds  # a matmul of two n x n matrices is n^3 multiply-adds
    numbers = args.copy_mb * 2 ** 20 // 4
    src = torch.randn(numbers, device=device)
    dst = torch.empty(numbers, device=device)

    def copy():
        dst.copy_(src)
        sync(device)

    copy()  # warm-up
    seconds = best_time(copy, args.repeats + 2)
    bandwidth = 2 * src.numel() * 4 / seconds  # every byte read once and written once
    dtype_name = str(dtype).replace("torch.", "")
    rows = [f"| machine | matmul {n}x{n} {dtype_name} | {format_flops(f, device)} | |"
            for n, f in peaks.items()]
    rows.append(f"| machine | memory copy {args.copy_mb} MB (read + write) | "
                f"{bandwidth / GB:.1f} GB/s | |")
    return rows, {"peak_flops": max(peaks.values()), "bandwidth": bandwidth}


# ==================================================================================================
# generation: transformers' generate, engine.generate and rollout.generate, and decode against the
# memory-bandwidth bound
# ==================================================================================================
# rollout_bench's implementations, as the table names them
GENERATORS = {"transformers": "transformers",
              "transformers-static": "transformers (static cache, torch.compile)",
              "engine": "engine.generate", "engine-static": "engine.generate(decode='static')",
              "engine-dynamic": "engine.generate(decode='dynamic')", "rollout": "rollout.generate"}


def decode_bound_ms(model, batch, mean_prompt, steps, bandwidth) -> float:
    """Least time of one decode step at full batch: every weight read once, plus each row's K and V
    cache (at its mean length over the decode, prompt + steps / 2), at the measured copy
    bandwidth."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * elem
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * elem
    kv = batch * (mean_prompt + steps / 2) * kv_per_token
    return 1000 * (weights + kv) / bandwidth


def bench_generation(args, limits):
    rows = []
    for name in args.workloads:
        model_name, batch = rollout_bench.WORKLOADS[name]
        model, tok, ids, mask, stops = rollout_bench.load(model_name, batch, args.device,
                                                          args.dtype)
        # alternating, so that all three see the same background load
        totals = rollout_bench.compare(model, tok, ids, mask, args.max_new_tokens, stops, 0,
                                       args.gen_repeats, names=getattr(args, "generators", None))
        baseline = totals["transformers"]["useful"] / totals["transformers"]["wall"]
        mean_prompt = float(mask.sum(1).float().mean())
        for impl, r in totals.items():
            tok_s = r["useful"] / r["wall"]
            steps = r["steps"] / args.gen_repeats
            prefill = r["prefill"] / args.gen_repeats
            bound = decode_bound_ms(model, batch, mean_prompt, steps, limits["bandwidth"])
            label = f"{name} {GENERATORS[impl]}"
            rows.append(f"| generation | {label}: useful tokens/s (B={batch}, prompt "
                        f"{mean_prompt:.0f} tokens, {args.max_new_tokens} new) | {tok_s:.1f} | "
                        f"{tok_s / baseline:.2f}x transformers |")
            rows.append(f"| generation | {label}: prefill s; decode ms/step vs bound (weights + KV "
                        f"cache / bandwidth) | {prefill:.2f} s; {r['step_ms']:.1f} ms vs "
                        f"{bound:.2f} ms | {bound / r['step_ms']:.1%} of the bound |")
        del model
    return rows


# ==================================================================================================
# update: the trainer's PPO update vs a plain transformers forward + backward on the same tokens
# ==================================================================================================
def bench_update(args, limits):
    """Two workloads. Unique prompts, no padding: the trainer's update's own overhead against a
    plain forward + backward on the same tokens. Shared prompts (--update_group samples each,
    responses of random length): the trainer's packed forward (each prompt once) and its padded
    one, against the plain loop on the padded rows; MFU counts the tokens each one actually
    computes."""
    device = torch.device(args.device)
    # fp32 master weights as in training; on a GPU both loops compute under bf16 autocast
    policy, tok = load_policy(args.model, device=device)
    critic = load_critic(args.model, device=device)
    policy.train()
    critic.train()
    # the reference is not needed: its log-probs are synthetic
    models = train_ppo.Models(policy, None, critic, tok, device)
    base = update_bench.update_config(args, device, 1, False)
    train_ppo.add_optimizers(base, models, total_steps=1000)
    run = common.Run(base, rank=0, world=1, device=device, out=ROOT, resume_from=None)
    B, mb = args.update_batch, args.micro_batch
    n_params = count_parameters(policy) + count_parameters(critic)
    rows = []
    for group in (1, args.update_group):
        synthetic = update_bench.update_batch(len(tok), B, args.prompt_len, args.response_len,
                                              samples_per_prompt=group)
        exp = {k: v.to(device) for k, v in synthetic.items()}  # what steps 1-4 would leave
        runs = {"plain": functools.partial(update_bench.plain_update, models, exp, mb, device)}
        # tokens each one computes: the plain loop every column of every row; ours trims
        # micro-batches or packs them
        computed = {"plain": exp["seq"].numel()}
        for name, pack in (("padded", False), ("packed", True)):
            if pack and group == 1:
                continue  # nothing shared: nothing to pack
            cfg = update_bench.update_config(args, device, group, pack)
            runs[name] = functools.partial(update_bench.ours_update, cfg, run, models, exp)
            computed[name] = sum(
                response_batch(exp["seq"][s:s + mb], exp["attn"][s:s + mb],
                               exp["mask"][s:s + mb], pack).input_ids.numel()
                for s in range(0, B, mb))
        t = {name: [] for name in runs}
        # alternate, so all see the same load; the best is kept. On a GPU the first round is a
        # warm-up (kernels, allocator).
        for rep in range(args.repeats + (device.type == "cuda")):
            for name, fn in runs.items():
                seconds = fn()
                if device.type == "cpu" or rep:
                    t[name].append(seconds)
        if group == 1:
            what = (f"{B} x {exp['seq'].shape[1]} tokens, unique prompts, {args.response_len} "
                    f"response tokens each")
        else:
            what = (f"{B // group} prompts x {group} samples, {args.prompt_len} + up to "
                    f"{args.response_len} tokens ({int(exp['mask'].sum())} response tokens)")
        labels = {"plain": "plain transformers forward + backward + AdamW",
                  "padded": "train_ppo.ppo_step's update, padded rows" if group > 1
                  else "train_ppo.ppo_step's update (actor + critic)",
                  "packed": "train_ppo.ppo_step's update, packed (each prompt once)"}
        for name in runs:
            sec = min(t[name])
            mfu = 6 * n_params * computed[name] / sec / limits["peak_flops"]
            rows.append(f"| update | {labels[name]}, {what}, micro-batch {mb}: {sec:.2f} s | "
                        f"{computed[name]} tokens computed, MFU {mfu:.0%} | "
                        f"{min(t['plain']) / sec:.2f}x plain |")
    return rows


# ==================================================================================================
# step and grpo: whole steps of train_ppo.py, in a child process (python -m benchmarks.ppo_step)
# for a clean peak RSS
# ==================================================================================================
def run_child(cmd, tag, timeout):
    """Run a child from the repository root, return the JSON after its `tag` line (its output in
    the error when it fails)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    shared = ROOT.parent / "shared" / "data"
    if "MEDRLVR_DATA" not in env and shared.is_dir():
        env["MEDRLVR_DATA"] = str(shared)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    found = [ln for ln in p.stdout.splitlines() if ln.startswith(tag + " ")]
    if p.returncode or not found:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {p.returncode}):\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(found[-1][len(tag) + 1:])


def ppo_steps(train_args, timeout):
    with tempfile.TemporaryDirectory(prefix="bench_step_") as out:
        cmd = [sys.executable, "-m", "benchmarks.ppo_step", *train_args, "--out_dir", out]
        return run_child(cmd, "BENCH_STEP", timeout)


def bench_step(args):
    """One demo step twice in this run: padded rows (--pack_samples false, as a plain training loop
    would) then packed (the default: each prompt once for its samples), same samples, phase by
    phase."""
    # no held-out evaluation: it is not part of a training step
    train_args = ["--preset", "smoke" if args.quick else "demo", "--max_steps", "1",
                  "--eval_every", "0", *args.train_device]
    runs = {name: ppo_steps(train_args + ["--pack_samples", flag], 1200)
            for name, flag in (("padded", "false"), ("packed", "true"))}
    m = {name: r["metrics"][0] for name, r in runs.items()}

    def time_of(name, phase):
        return m[name].get(f"time_{phase}", 0.0)

    packed_step, padded_step = time_of("packed", "step"), time_of("padded", "step")
    rows = [f"| step | {' '.join(train_args)}: whole step ({m['packed']['samples']} samples, "
            f"{m['packed']['response_tokens']:.0f} response tokens each on average), packed "
            f"(padded) | {packed_step:.1f} s ({padded_step:.1f} s) | 100%; "
            f"{padded_step / packed_step:.2f}x faster than padded |"]
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
        rows.append(f"| step | {label}, packed (padded) | {t['packed']:.1f} s "
                    f"({t['padded']:.1f} s) | {t['packed'] / packed_step:.0%}{speed} |")
    what = "peak GPU memory allocated" if args.device == "cuda" else "peak RSS"
    for name in ("packed", "padded"):
        b = runs[name]["budget"]
        need = sum(b.values())
        peak = next(iter(runs[name]["peak"].values()), float("nan"))
        rows.append(f"| step | {name}: {what} of the step vs weights {b['weights'] / GB:.2f} + "
                    f"gradients {b['gradients'] / GB:.2f} + AdamW {b['adamw'] / GB:.2f} + KV cache "
                    f"{b['kv_cache'] / GB:.2f} = {need / GB:.2f} GB | {peak / GB:.2f} GB | "
                    f"{peak / need:.2f}x (target <= 2x) |")
    a, b = (m[n].get("policy_loss", float("nan")) for n in ("packed", "padded"))
    if args.device == "cuda":  # bf16: packing changes the matmuls' shapes, so their rounding
        rows.append(f"| step | same samples: policy_loss packed {a:.7f}, padded {b:.7f} | differ "
                    f"by {abs(a - b) / max(abs(b), 1e-12):.1%} | bf16 autocast: rows packed or "
                    f"padded round differently |")
        return rows
    same = abs(a - b) <= 1e-6 * max(1.0, abs(b))  # the same samples and loss, up to float rounding
    rows.append(f"| step | same samples, same loss: policy_loss packed {a:.7f}, padded {b:.7f} | "
                f"{'equal to 1e-6' if same else 'DIFFERENT'} | |")
    return rows


def bench_grpo(args):
    steps = args.grpo_steps
    train_args = ["--preset", "demo", "--advantage", "grpo", "--rollout_batch_size", "1",
                  "--n_samples_per_prompt", "8", "--max_new_tokens", "128", "--train_batch_size",
                  "8", "--max_steps", str(steps), "--eval_every", "0", *args.train_device]
    if args.quick:  # a tiny model, short prompts and responses: only checks that the section runs
        train_args += ["--model", "tiny-qwen2", "--max_prompt_tokens", "4096", "--max_new_tokens",
                       "16"]
    r = ppo_steps(train_args, 1800)
    ours = [m["time_step"] for m in r["metrics"]]
    updated = [m["time_step"] for m in r["metrics"] if "skipped" not in m]
    lengths = [m["response_tokens"] for m in r["metrics"]]
    mean_ours = sum(ours) / len(ours)
    rows = [f"| grpo | ours: {' '.join(train_args[2:])}; seconds per step (steps "
            f"{', '.join(f'{s:.1f}' for s in ours)}; {len(updated)} of {steps} updated) | "
            f"{mean_ours:.1f} s | mean completion {sum(lengths) / len(lengths):.0f} tokens |"]
    if not args.trl_python or args.quick:
        rows.append("| grpo | TRL GRPOTrainer | not run | pass --trl_python PATH (a venv with trl, "
                    "see benchmarks/trl_grpo.py) |")
        return rows
    cmd = [args.trl_python, "-m", "benchmarks.trl_grpo", "--steps", str(args.trl_steps),
           "--device", args.device]
    t = run_child(cmd, "BENCH_TRL", 3000)
    mean_trl = sum(t["seconds"]) / len(t["seconds"])
    rows.append(f"| grpo | TRL {t['trl']} GRPOTrainer, same model, prompts, 8 x <= 128 tokens, "
                f"beta 0.01 (steps {', '.join(f'{s:.1f}' for s in t['seconds'])}) | "
                f"{mean_trl:.1f} s | mean completion "
                f"{sum(t['mean_length']) / len(t['mean_length']):.0f} tokens; ours "
                f"{mean_ours / mean_trl:.2f}x TRL's time (target <= 0.5x) |")
    return rows


# ==================================================================================================
# fsdp: per-rank memory of actor and critic at 1 and 2 processes
# ==================================================================================================
def rank_bytes(ranks) -> int:
    """Bytes of actor and critic, parameters, gradients and AdamW together, on the fullest rank."""
    return max(sum(v for part in r.values() for v in part.values()) for r in ranks)


def bench_fsdp(args):
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
    rows = [f"| fsdp | N=1: {backend[1]}; N=2: {backend[2]} | | |"]
    for part in ("actor", "critic"):
        for kind in ("params", "grads", "adamw"):
            one = per_world[1][0][part][kind]
            two = max(rank[part][kind] for rank in per_world[2])  # the fullest rank
            rows.append(f"| fsdp | {args.model} {part} {kind} per rank: N=1 -> N=2 | "
                        f"{one / 2 ** 20:.1f} -> {two / 2 ** 20:.1f} MiB | {two / one:.2f} "
                        f"(target <= 0.6) |")
    one, two = rank_bytes(per_world[1]), rank_bytes(per_world[2])
    rows.append(f"| fsdp | actor + critic, all three, per rank: N=1 -> N=2 | "
                f"{one / 2 ** 20:.1f} -> {two / 2 ** 20:.1f} MiB | {two / one:.2f} |")
    return rows


# ==================================================================================================
# paper: the study's model size (Qwen2.5-3B's shape, random weights) on a GPU
# ==================================================================================================
PAPER_ROWS = ("decode, batch 64 and 256: tokens/s against the HBM bound (target >= 40% at 256)",
              "update, 16 prompts x 4 samples x 512 + up to 512 tokens, packed: actor alone and "
              "actor + critic, MFU (target >= 35%)",
              "one paper-preset step, 16 prompts: phases (generation under half the step) and "
              "peak GPU memory against weights + gradients + AdamW + KV cache")


def bench_paper(args, limits):
    """model_zoo's random model of Qwen2.5-3B's shape in bf16 (autocast over fp32 master weights in
    the update and the step): decode as the generation section measures it, the update's MFU as
    the update section does, one paper-preset step as the step section does. --quick: the shape
    scaled down, on any device (checks the code runs). On a CPU otherwise: not measured (a 3B
    update on 2 cores would take hours)."""
    if args.device != "cuda" and not args.quick:
        return [f"| paper | {what} | not measured: no GPU | python bench.py --only paper on a "
                f"CUDA machine |" for what in PAPER_ROWS]
    name = "random-qwen2.5-3b-mini" if args.quick else "random-qwen2.5-3b"
    workloads = ["paper3b-mini-b8"] if args.quick else ["paper3b-b64", "paper3b-b256"]
    decode = argparse.Namespace(**{**vars(args), "workloads": workloads, "gen_repeats": 1,
                                   "generators": ["transformers", "engine"]})
    rows = [r.replace("| generation |", "| paper |", 1) for r in bench_generation(decode, limits)]
    sizes = dict(update_batch=64, micro_batch=16, update_group=4, prompt_len=512, response_len=512)
    if args.quick:
        sizes.update(update_batch=8, micro_batch=4, prompt_len=32, response_len=16)
    update = argparse.Namespace(**{**vars(args), **sizes, "model": name, "repeats": 1})
    rows += [r.replace("| update |", "| paper |", 1) for r in update_bench.paper_update(update,
                                                                                       limits)]
    step = ["--preset", "paper", "--model", name, "--rollout_batch_size", "16",
            "--train_batch_size", "16", "--generate_batch_size", "16", "--max_steps", "1",
            "--eval_every", "0", *args.train_device]
    if args.quick:
        step += ["--max_new_tokens", "16", "--train_data", "medqa_dev"]
    r = ppo_steps(step, 1800)
    m = r["metrics"][0]
    rows.append(f"| paper | {' '.join(step)}: whole step ({m['response_tokens']:.0f} response "
                f"tokens a sample) | {m['time_step']:.1f} s | 100% |")
    for phase in train_ppo.PHASES[:-1]:  # no held-out evaluation in a step here
        seconds = m.get(f"time_{phase}", 0.0)
        rows.append(f"| paper | {phase} | {seconds:.1f} s | {seconds / m['time_step']:.0%} |")
    b = r["budget"]
    need = sum(b.values())
    peak = next(iter(r["peak"].values()), float("nan"))
    what = "peak GPU memory allocated" if args.device == "cuda" else "peak RSS"
    rows.append(f"| paper | {what} of the step vs weights {b['weights'] / GB:.2f} + gradients "
                f"{b['gradients'] / GB:.2f} + AdamW {b['adamw'] / GB:.2f} + KV cache "
                f"{b['kv_cache'] / GB:.2f} = {need / GB:.2f} GB | {peak / GB:.2f} GB | "
                f"{peak / need:.2f}x |")
    return rows


# ==================================================================================================
def run_section(section, args, device, limits):
    """The rows of one section (and, for machine, the measured limits)."""
    if section == "machine":
        return bench_machine(args, device)
    if section == "generation":
        return bench_generation(args, limits), limits
    if section == "update":
        return bench_update(args, limits), limits
    if section == "step":
        return bench_step(args), limits
    if section == "fsdp":
        return bench_fsdp(args), limits
    if section == "paper":
        return bench_paper(args, limits), limits
    return bench_grpo(args), limits


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated sections: " + " ".join(SECTIONS))
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and a tiny model: checks that everything runs")
    p.add_argument("--cudnn_attention", default="false", choices=["true", "false"],
                   help="on a GPU, allow cuDNN's SDPA kernel in every section, ours and the "
                        "baselines alike (the trainers' --cudnn_attention; default off as there); "
                        "engine.generate never uses it")
    p.add_argument("--trl_python", default="",
                   help="python of a venv with trl installed: adds TRL's GRPOTrainer row")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"),
                   help="markdown file written ('' for none)")
    p.add_argument("--model", default="smollm2-135m", help="model of the update and fsdp sections")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if there is one) | cpu | cuda: on cuda, bf16 (matmul peak, "
                        "generation weights, autocast in the update and the steps) and GPU-sized "
                        "defaults")
    # None: the device's default (CPU / GPU), set in main
    p.add_argument("--workloads", nargs="+", default=None,
                   help="benchmarks/rollout_bench.py workloads (smollm2-b8 random-b32 / GPU: "
                        "smollm2-b8 smollm2-b64 smollm2-b128 random-b32)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="generation section")
    p.add_argument("--gen_repeats", type=int, default=None,
                   help="runs of each generator (seeds 0, 1, ...), summed (1 / 3)")
    p.add_argument("--update_batch", type=int, default=None,
                   help="rows of the update section (8 / 64)")
    p.add_argument("--micro_batch", type=int, default=None, help="(4 / 16)")
    p.add_argument("--update_group", type=int, default=4,
                   help="samples per prompt of the update's shared-prompt workload")
    p.add_argument("--prompt_len", type=int, default=None,
                   help="the update section's prompt tokens (128 / 256)")
    p.add_argument("--response_len", type=int, default=None, help="(128 / 256)")
    p.add_argument("--grpo_steps", type=int, default=2,
                   help="GRPO-mode steps of ours (a step whose 8 rewards are all equal skips its "
                        "update: the table says how many updated)")
    p.add_argument("--trl_steps", type=int, default=1,
                   help="steps of TRL's GRPOTrainer (it always updates)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats of matmul, copy and update, best kept (2 / 5)")
    p.add_argument("--matmul_sizes", type=int, nargs="+", default=None,
                   help="(2048 4096 / 4096 8192)")
    p.add_argument("--copy_mb", type=int, default=None, help="(512 / 4096)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.dtype = "bfloat16" if gpu else "float32"  # the generation weights; the rest autocasts
    args.train_device = []
    if gpu:
        args.train_device = ["--device", "cuda", "--dtype", "bfloat16", "--cudnn_attention",
                             args.cudnn_attention]
    defaults = dict(
        workloads=(["smollm2-b8", "smollm2-b64", "smollm2-b128", "random-b32"] if gpu
                   else ["smollm2-b8", "random-b32"]),
        gen_repeats=3 if gpu else 1, update_batch=64 if gpu else 8, micro_batch=16 if gpu else 4,
        prompt_len=256 if gpu else 128, response_len=256 if gpu else 128,
        repeats=5 if gpu else 2, matmul_sizes=[4096, 8192] if gpu else [2048, 4096],
        copy_mb=4096 if gpu else 512)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.model, args.workloads, args.max_new_tokens = "tiny-qwen2", ["random-b32"], 16
        args.update_batch, args.micro_batch, args.prompt_len, args.response_len = 4, 2, 32, 16
        args.grpo_steps, args.matmul_sizes, args.copy_mb, args.repeats = 1, [1024], 128, 1
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    if {"generation", "update", "paper"} & set(args.sections) and "machine" not in args.sections:
        args.sections.insert(0, "machine")  # their bounds and MFU need the measured limits
    return args


def main(argv=None):
    args = parse_args(argv)
    gpu = args.device == "cuda"
    if gpu:
        # the same SDPA kernels for ours and the baselines (transformers' generate, the plain
        # loop; TRL through the environment)
        torch.backends.cuda.enable_cudnn_sdp(args.cudnn_attention == "true")
        os.environ["MEDRLVR_CUDNN_ATTENTION"] = args.cudnn_attention
    device = torch.device(args.device)
    load_start, started = os.getloadavg(), time.time()
    now = datetime.datetime.now(datetime.timezone.utc)
    header = (f"{describe_machine(device)}; {now:%Y-%m-%d %H:%M} UTC; load average "
              f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start"
              + ("; --quick" if args.quick else ""))
    print(header, flush=True)
    rows, limits = ["| section | what | measured | vs |", "|---|---|---|---|"], {}
    for section in args.sections:
        t0 = time.time()
        try:
            new, limits = run_section(section, args, device, limits)
        except Exception as e:  # one broken section must not cost the others' numbers
            print(f"{section} failed: {e!r}", file=sys.stderr, flush=True)
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            new = [f"| {section} | failed: {reason} | | |"]
        rows += new
        print("\n".join(new) + f"\n  ({section}: {time.time() - t0:.0f} s, load average "
              f"{os.getloadavg()[0]:.2f})", flush=True)
    load_end = os.getloadavg()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    footer = (f"load average {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at end; "
              f"{time.time() - started:.0f} s in all; command: python bench.py {command}")
    table = "\n".join(rows)
    print("\n" + table + "\n\n" + footer)
    if args.out:
        write_markdown(Path(args.out), header, table, footer, "gpu table" if gpu else "table")


def write_markdown(path, header, table, footer, which="table"):
    """BENCHMARKS.md: the table between markers, so text written around it by hand survives a
    rerun. The CPU table and the GPU table have markers of their own: a run on one kind of machine
    leaves the other's table."""
    begin, end = f"<!-- bench.py {which}: begin -->", f"<!-- bench.py {which}: end -->"
    block = f"{begin}\n{header}\n\n{table}\n\n{footer}\n{end}"
    if path.exists():
        old = path.read_text()
    else:
        old = "# Benchmarks\n\nWritten by `python bench.py`.\n\n" + begin + end + "\n"
    if begin in old and end in old:
        pattern = re.escape(begin) + ".*?" + re.escape(end)
        new = re.sub(pattern, lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
