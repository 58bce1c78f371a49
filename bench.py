"""Where the time and memory of an RLVR run go, against baselines and against this machine's own limits.

    python bench.py                          # every section, writes BENCHMARKS.md (~15 min on 2 CPU cores)
    python bench.py --quick                  # small sizes and a tiny model: checks the script runs (~2 min)
    python bench.py --only machine,update    # some sections: machine generation update step fsdp grpo
    python bench.py --trl_python /work/trl-venv/bin/python   # adds TRL's GRPOTrainer (its own environment)

Sections, each a table row group, every ratio measured in this one run (alternating where it matters):
  machine     peak matmul FLOP/s (fp32 2048^2 and 4096^2 on CPU, bf16 4096^2 and 8192^2 on GPU), copy bandwidth
  generation  useful tokens/s of rollout.generate vs transformers' generate (bench/rollout_bench.py's
              workloads), and decode ms/step vs the bound bandwidth / (weight bytes + KV cache bytes read)
  update      train_ppo.ppo_update (actor log-probs + policy_loss, critic values + value_loss, AdamW) vs a
              plain transformers forward + backward (logits, cross-entropy; critic logits, MSE) + AdamW on the
              same rows: unique prompts (ours' overhead), then prompts shared by 4 samples (packed and padded);
              ratio, MFU = 6 x parameters x tokens computed / s / measured peak
  step        one whole PPO step of the demo preset (bench/ppo_step.py runs train_ppo.main), padded rows then
              packed (the default), same samples: the time_* fields of metrics.jsonl, and the step's peak RSS
              against weights + gradients + AdamW + KV cache
  fsdp        bytes per rank of parameters, gradients and AdamW state of actor and critic under FSDP2,
              torchrun with 1 and 2 processes (gloo), bench/fsdp_memory.py
  grpo        a GRPO-mode step on TRL's settings (1 prompt x 8 completions of <= 128 tokens) vs TRL's
              GRPOTrainer (bench/trl_grpo.py, only with --trl_python: TRL is never a project dependency)
On a machine with CUDA (--device auto takes it) every section runs there in bf16 (autocast over fp32 master weights
in the update and the steps, as train_ppo.py on one GPU), with GPU-sized defaults, and the table goes to a block of
its own in BENCHMARKS.md. --cudnn_attention true lets every section, ours and the baselines, use cuDNN's SDPA kernel.
Timings on a shared machine are noisy: the load average at start and end is written with the table.
"""
import argparse
import datetime
import importlib.util
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
SECTIONS = ["machine", "generation", "update", "step", "fsdp", "grpo"]
GB = 1e9


def best_time(fn, repeats):
    """Least wall-clock seconds of `repeats` calls (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def describe_machine(device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"GPU {props.name} ({props.total_memory / 2 ** 30:.0f} GiB, {props.multi_processor_count} SMs), "
                f"{os.cpu_count()} CPU cores, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


# ======================================================================================================
# machine: the limits every other number is compared with
# ======================================================================================================
def bench_machine(args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peaks = {}
    for n in args.matmul_sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        sync(device)
        seconds = best_time(lambda: (a @ b, sync(device)), args.repeats + 1)
        peaks[n] = 2 * n ** 3 / seconds  # a matmul of two n x n matrices is n^3 multiply-adds
    numbers = args.copy_mb * 2 ** 20 // 4
    src, dst = torch.randn(numbers, device=device), torch.empty(numbers, device=device)
    dst.copy_(src)
    sync(device)
    seconds = best_time(lambda: (dst.copy_(src), sync(device)), args.repeats + 2)
    bandwidth = 2 * src.numel() * 4 / seconds  # every byte read once and written once
    peak = max(peaks.values())
    flops = (lambda f: f"{f / 1e12:.0f} TFLOP/s") if device.type == "cuda" else (lambda f: f"{f / GB:.0f} GFLOP/s")
    rows = [f"| machine | matmul {n}x{n} {str(dtype).replace('torch.', '')} | {flops(f)} | |" for n, f in peaks.items()]
    rows.append(f"| machine | memory copy {args.copy_mb} MB (read + write) | {bandwidth / GB:.1f} GB/s | |")
    return rows, {"peak_flops": peak, "bandwidth": bandwidth}


# ======================================================================================================
# generation: rollout.generate vs transformers' generate, and decode against the memory-bandwidth bound
# ======================================================================================================
def load_rollout_bench():
    """bench/rollout_bench.py (the rollout's own benchmark), imported by path: its workloads and runners."""
    spec = importlib.util.spec_from_file_location("rollout_bench", ROOT / "bench" / "rollout_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode_bound_ms(model, batch, mean_prompt, steps, bandwidth) -> float:
    """Least time of one decode step at full batch: every weight read once, plus each row's K and V cache
    (at its mean length over the decode, prompt + steps / 2), at the measured copy bandwidth."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * elem
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * elem
    kv = batch * (mean_prompt + steps / 2) * kv_per_token
    return 1000 * (weights + kv) / bandwidth


def bench_generation(args, limits):
    rb = load_rollout_bench()
    rows = []
    for name in args.workloads:
        model_name, batch = rb.WORKLOADS[name]
        model, tok, ids, mask, stops = rb.load(model_name, batch, args.device, args.dtype)
        for run in (rb.run_ours, rb.run_transformers):  # warm-up: first-call costs out of the timed runs
            run(model, tok, ids[:2], mask[:2], 4, stops, 0)
        res = {"transformers": [], "ours": []}
        for rep in range(args.gen_repeats):  # alternate, so both see the same background load
            for impl, run in (("transformers", rb.run_transformers), ("ours", rb.run_ours)):
                res[impl].append(run(model, tok, ids, mask, args.max_new_tokens, stops, rep))
        tok_s = {impl: sum(r["useful"] for r in rs) / sum(r["wall"] for r in rs) for impl, rs in res.items()}
        mean_prompt = float(mask.sum(1).float().mean())
        for impl, rs in res.items():
            step_ms = sum(r["step_ms"] for r in rs) / len(rs)
            steps = sum(r["steps"] for r in rs) / len(rs)
            bound = decode_bound_ms(model, batch, mean_prompt, steps, limits["bandwidth"])
            rows.append(f"| generation | {name} {impl}: useful tokens/s (B={batch}, prompt {mean_prompt:.0f} tokens, "
                        f"{args.max_new_tokens} new) | {tok_s[impl]:.1f} | "
                        f"{tok_s[impl] / tok_s['transformers']:.2f}x transformers |")
            rows.append(f"| generation | {name} {impl}: decode ms/step vs bound (weights + KV cache / bandwidth) | "
                        f"{step_ms:.1f} ms vs {bound:.2f} ms | {bound / step_ms:.1%} of the bound |")
        del model
    return rows


# ======================================================================================================
# update: the trainer's PPO update vs a plain transformers forward + backward on the same tokens
# ======================================================================================================
def update_batch(vocab, batch, prompt_len, response_len, seed=0, samples_per_prompt=1):
    """A full batch of the trainer's experience on random tokens: what ppo_update reads. samples_per_prompt > 1:
    consecutive rows share their prompt and responses end at random lengths (between a third and all of
    response_len), as after sampling."""
    g = torch.Generator().manual_seed(seed)
    L, T = prompt_len + response_len, response_len
    seq = torch.randint(0, vocab, (batch, L), generator=g)  # [B, L]
    mask = torch.ones(batch, T)  # [B, T] every response token counts (no padding: the plain baseline has none)
    if samples_per_prompt > 1:
        seq[:, :prompt_len] = seq[::samples_per_prompt, :prompt_len].repeat_interleave(samples_per_prompt, 0)
        lengths = torch.randint(T // 3, T + 1, (batch,), generator=g)  # [B]
        mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # [B, T]
    attn = torch.cat([torch.ones(batch, prompt_len, dtype=torch.long), mask.long()], 1)  # [B, L]
    old = -torch.rand(batch, T, generator=g) * 3 * mask  # [B, T]
    return dict(seq=seq, attn=attn, mask=mask, old_logprobs=old, ref_logprobs=old.clone(),
                advantages=torch.randn(batch, T, generator=g) * mask, returns=torch.randn(batch, T, generator=g) * mask,
                values=torch.zeros(batch, T))


def bench_update(args, limits):
    """Two workloads. Unique prompts, no padding: ppo_update's own overhead against a plain forward +
    backward on the same tokens. Shared prompts (--update_group samples each, responses of random length):
    the trainer's packed forward (each prompt once) and its padded one, against the plain loop on the padded
    rows; MFU counts the tokens each one actually computes."""
    import model as M
    import train_ppo
    device = torch.device(args.device)
    # fp32 master weights as in training; on a GPU both loops compute under bf16 autocast, as train_ppo does
    policy, tok = M.load_policy(args.model, device=device)
    critic = M.load_critic(args.model, device=device)
    policy.train(), critic.train()
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # noqa: E731
    B, mb = args.update_batch, args.micro_batch
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-7, betas=(0.9, 0.95)) for n, m in (("policy", policy), ("critic", critic))}
    scheds = {n: torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0) for n, o in opts.items()}
    n_params = M.count_parameters(policy) + M.count_parameters(critic)
    rows = []
    for group in (1, args.update_group):
        exp = update_batch(len(tok), B, args.prompt_len, args.response_len, samples_per_prompt=group)
        exp = {k: v.to(device) for k, v in exp.items()}

        def ours(pack):
            cfg = train_ppo.Config(**{**train_ppo.PRESETS["demo"], "model": args.model, "rollout_batch_size": B // group,
                                      "n_samples_per_prompt": group, "train_batch_size": B, "micro_batch_size": mb,
                                      "pack_samples": pack, "device": device.type, "dtype": args.dtype})
            train_ppo.ppo_update(cfg, 1, exp, policy, critic, opts, scheds, world=1, rank=0)

        def plain():  # what any transformers training loop does with the same rows, same micro-batches and AdamW
            for s in range(0, B, mb):
                ids = exp["seq"][s:s + mb]  # [mb, L]
                with amp():
                    logits = policy(input_ids=ids).logits  # [mb, L, V]
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                with amp():
                    v = critic(input_ids=ids).logits[..., 0]  # [mb, L]
                    loss = F.mse_loss(v.float(), torch.zeros_like(v, dtype=torch.float32))
                loss.backward()
            for name, m in (("policy", policy), ("critic", critic)):
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)

        # tokens each one computes: the plain loop every column of every row; ours trims micro-batches or packs them
        computed = {"plain": exp["seq"].numel()}
        for name, pack in (("padded", False), ("packed", True)):
            batches = [M.response_batch(exp["seq"][s:s + mb], exp["attn"][s:s + mb], exp["mask"][s:s + mb], pack)
                       for s in range(0, B, mb)]
            computed[name] = sum(x.input_ids.numel() if isinstance(x, M.Packed) else x[0].numel() for x in batches)
        runs = [("plain", plain), ("padded", lambda: ours(False))] + ([("packed", lambda: ours(True))] if group > 1 else [])
        t = {name: [] for name, _ in runs}
        for rep in range(args.repeats + (device.type == "cuda")):  # alternate, so all see the same load; best kept
            for name, fn in runs:
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                if device.type == "cpu" or rep:  # on a GPU the first round is a warm-up (kernels, allocator)
                    t[name].append(time.perf_counter() - t0)
        what = (f"{B} x {exp['seq'].shape[1]} tokens, unique prompts, {args.response_len} response tokens each" if group == 1
                else f"{B // group} prompts x {group} samples, {args.prompt_len} + up to {args.response_len} tokens "
                     f"({int(exp['mask'].sum())} response tokens)")
        labels = {"plain": "plain transformers forward + backward + AdamW",
                  "padded": "train_ppo.ppo_update, padded rows" if group > 1 else "train_ppo.ppo_update (actor + critic)",
                  "packed": "train_ppo.ppo_update, packed (each prompt once)"}
        for name, _ in runs:
            sec = min(t[name])
            mfu = 6 * n_params * computed[name] / sec / limits["peak_flops"]
            rows.append(f"| update | {labels[name]}, {what}, micro-batch {mb}: {sec:.2f} s | {computed[name]} tokens "
                        f"computed, MFU {mfu:.0%} | {min(t['plain']) / sec:.2f}x plain |")
    return rows


# ======================================================================================================
# step and grpo: whole steps of train_ppo.py, in a child process (bench/ppo_step.py) for a clean peak RSS
# ======================================================================================================
def run_child(cmd, tag, timeout):
    """Run a child, pass its stderr through to a log, return the JSON after its `tag` line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    shared = ROOT.parent / "shared" / "data"
    if "MEDRLVR_DATA" not in env and shared.is_dir():
        env["MEDRLVR_DATA"] = str(shared)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    found = [ln for ln in p.stdout.splitlines() if ln.startswith(tag + " ")]
    if p.returncode or not found:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(found[-1][len(tag) + 1:])


def ppo_steps(train_args, timeout):
    with tempfile.TemporaryDirectory(prefix="bench_step_") as out:
        return run_child([sys.executable, "bench/ppo_step.py", *train_args, "--out_dir", out], "BENCH_STEP", timeout)


def bench_step(args):
    """One demo step twice in this run: padded rows (--pack_samples false, as a plain training loop would)
    then packed (the default: each prompt once for its samples), same samples, phase by phase."""
    train_args = ["--preset", "smoke" if args.quick else "demo", "--max_steps", "1", *args.train_device]
    runs = {name: ppo_steps(train_args + ["--pack_samples", flag], 1200) for name, flag in (("padded", "false"), ("packed", "true"))}
    m = {name: r["metrics"][0] for name, r in runs.items()}
    phases = ["generate", "score", "reference", "critic", "update"]
    time_of = lambda name, ph: m[name].get(f"time_{ph}", 0.0)  # noqa: E731
    rows = [f"| step | {' '.join(train_args)}: whole step ({m['packed']['samples']} samples, "
            f"{m['packed']['response_tokens']:.0f} response tokens each on average), packed (padded) | "
            f"{time_of('packed', 'step'):.1f} s ({time_of('padded', 'step'):.1f} s) | 100%; "
            f"{time_of('padded', 'step') / time_of('packed', 'step'):.2f}x faster than padded |"]
    for ph in phases + ["other"]:
        if ph == "other":
            t = {n: time_of(n, "step") - sum(time_of(n, x) for x in phases) for n in m}
            label = "other (advantages, metrics, logs)"
        else:
            t, label = {n: time_of(n, ph) for n in m}, ph
        speed = f"; {t['padded'] / t['packed']:.2f}x" if t["packed"] > 0.5 else ""
        rows.append(f"| step | {label}, packed (padded) | {t['packed']:.1f} s ({t['padded']:.1f} s) | "
                    f"{t['packed'] / time_of('packed', 'step'):.0%}{speed} |")
    what = "peak GPU memory allocated" if args.device == "cuda" else "peak RSS"
    for name in ("packed", "padded"):
        b = runs[name]["budget"]
        need = sum(b.values())
        peak = next(iter(runs[name]["peak"].values()), float("nan"))
        rows.append(f"| step | {name}: {what} of the step vs weights {b['weights'] / GB:.2f} + gradients "
                    f"{b['gradients'] / GB:.2f} + AdamW {b['adamw'] / GB:.2f} + KV cache {b['kv_cache'] / GB:.2f} = "
                    f"{need / GB:.2f} GB | {peak / GB:.2f} GB | {peak / need:.2f}x (target <= 2x) |")
    a, b = (m[n].get("policy_loss", float("nan")) for n in ("packed", "padded"))
    if args.device == "cuda":  # bf16: packing changes the matmuls' shapes, so their rounding; no exact equality
        rows.append(f"| step | same samples: policy_loss packed {a:.7f}, padded {b:.7f} | differ by "
                    f"{abs(a - b) / max(abs(b), 1e-12):.1%} | bf16 autocast: rows packed or padded round differently |")
        return rows
    same = abs(a - b) <= 1e-6 * max(1.0, abs(b))  # the same samples and loss, up to float rounding
    rows.append(f"| step | same samples, same loss: policy_loss packed {a:.7f}, padded {b:.7f} | "
                f"{'equal to 1e-6' if same else 'DIFFERENT'} | |")
    return rows


def bench_grpo(args):
    steps = args.grpo_steps
    train_args = ["--preset", "demo", "--advantage", "grpo", "--rollout_batch_size", "1", "--n_samples_per_prompt", "8",
                  "--max_new_tokens", "128", "--train_batch_size", "8", "--max_steps", str(steps), *args.train_device]
    if args.quick:  # a tiny model, short prompts and responses: only checks that the section runs
        train_args += ["--model", "tiny-qwen2", "--max_prompt_tokens", "4096", "--max_new_tokens", "16"]
    r = ppo_steps(train_args, 1800)
    ours = [m["time_step"] for m in r["metrics"]]
    updated = [m["time_step"] for m in r["metrics"] if "skipped" not in m]
    lengths = [m["response_tokens"] for m in r["metrics"]]
    rows = [f"| grpo | ours: {' '.join(train_args[2:])}; seconds per step (steps {', '.join(f'{s:.1f}' for s in ours)}; "
            f"{len(updated)} of {steps} updated) | {sum(ours) / len(ours):.1f} s | mean completion "
            f"{sum(lengths) / len(lengths):.0f} tokens |"]
    if not args.trl_python or args.quick:
        rows.append("| grpo | TRL GRPOTrainer | not run | pass --trl_python PATH (a venv with trl, see bench/trl_grpo.py) |")
        return rows
    t = run_child([args.trl_python, "bench/trl_grpo.py", "--steps", str(args.trl_steps), "--device", args.device],
                  "BENCH_TRL", 3000)
    mean_trl = sum(t["seconds"]) / len(t["seconds"])
    rows.append(f"| grpo | TRL {t['trl']} GRPOTrainer, same model, prompts, 8 x <= 128 tokens, beta 0.01 (steps "
                f"{', '.join(f'{s:.1f}' for s in t['seconds'])}) | {mean_trl:.1f} s | mean completion "
                f"{sum(t['mean_length']) / len(t['mean_length']):.0f} tokens; ours {sum(ours) / len(ours) / mean_trl:.2f}x "
                f"TRL's time (target <= 0.5x) |")
    return rows


# ======================================================================================================
# fsdp: per-rank memory of actor and critic at 1 and 2 processes
# ======================================================================================================
def bench_fsdp(args):
    """N processes on N GPUs with nccl where the machine has them, else on the CPU with gloo (the bytes of a
    shard do not depend on the device; a machine with one GPU runs N=1 on it and N=2 on the CPU)."""
    per_world, backend = {}, {}
    for n in (1, 2):
        on_gpu = args.device == "cuda" and torch.cuda.device_count() >= n
        backend[n] = f"nccl on {n} GPU{'s' * (n > 1)}" if on_gpu else "gloo on the CPU"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "bench/fsdp_memory.py", "--model", args.model, "--device", "cuda" if on_gpu else "cpu"]
        per_world[n] = run_child(cmd, "BENCH_FSDP", 900)["ranks"]
    rows = [f"| fsdp | N=1: {backend[1]}; N=2: {backend[2]} | | |"]
    for part in ("actor", "critic"):
        for kind in ("params", "grads", "adamw"):
            one = per_world[1][0][part][kind]
            two = max(rank[part][kind] for rank in per_world[2])  # the fullest rank
            rows.append(f"| fsdp | {args.model} {part} {kind} per rank: N=1 -> N=2 | {one / 2 ** 20:.1f} -> "
                        f"{two / 2 ** 20:.1f} MiB | {two / one:.2f} (target <= 0.6) |")
    total = lambda ranks: max(sum(v for part in r.values() for v in part.values()) for r in ranks)  # noqa: E731
    rows.append(f"| fsdp | actor + critic, all three, per rank: N=1 -> N=2 | {total(per_world[1]) / 2 ** 20:.1f} -> "
                f"{total(per_world[2]) / 2 ** 20:.1f} MiB | {total(per_world[2]) / total(per_world[1]):.2f} |")
    return rows


# ======================================================================================================
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + " ".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="tiny sizes and a tiny model: checks that everything runs")
    p.add_argument("--cudnn_attention", default="false", choices=["true", "false"],
                   help="on a GPU, allow cuDNN's SDPA kernel in every section, ours and the baselines alike (the trainers' "
                        "--cudnn_attention; default off as there); rollout.generate never uses it")
    p.add_argument("--trl_python", default="", help="python of a venv with trl installed: adds TRL's GRPOTrainer row")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file written ('' for none)")
    p.add_argument("--model", default="smollm2-135m", help="model of the update and fsdp sections")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one) | cpu | cuda: on cuda, bf16 "
                   "(matmul peak, generation weights, autocast in the update and the steps) and GPU-sized defaults")
    # None: the device's default below (CPU / GPU)
    p.add_argument("--workloads", nargs="+", default=None, help="bench/rollout_bench.py workloads "
                   "(smollm2-b8 random-b32 / GPU: smollm2-b8 smollm2-b32 smollm2-b128 random-b32)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="generation section")
    p.add_argument("--gen_repeats", type=int, default=None, help="runs of each generator (seeds 0, 1, ...), summed (1 / 3)")
    p.add_argument("--update_batch", type=int, default=None, help="rows of the update section (8 / 64)")
    p.add_argument("--micro_batch", type=int, default=None, help="(4 / 16)")
    p.add_argument("--update_group", type=int, default=4, help="samples per prompt of the update's shared-prompt workload")
    p.add_argument("--prompt_len", type=int, default=None, help="the update section's prompt tokens (128 / 256)")
    p.add_argument("--response_len", type=int, default=None, help="(128 / 256)")
    p.add_argument("--grpo_steps", type=int, default=2, help="GRPO-mode steps of ours (a step whose 8 rewards are "
                   "all equal skips its update: the table says how many updated)")
    p.add_argument("--trl_steps", type=int, default=1, help="steps of TRL's GRPOTrainer (it always updates)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of matmul, copy and update, best kept (2 / 5)")
    p.add_argument("--matmul_sizes", type=int, nargs="+", default=None, help="(2048 4096 / 4096 8192)")
    p.add_argument("--copy_mb", type=int, default=None, help="(512 / 4096)")
    args = p.parse_args(argv)
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device == "cuda"
    args.dtype = "bfloat16" if gpu else "float32"  # the generation weights; the update and steps autocast to it
    args.train_device = ["--device", "cuda", "--dtype", "bfloat16", "--cudnn_attention", args.cudnn_attention] if gpu else []
    if gpu:  # the same SDPA kernels for ours and the baselines (transformers' generate, the plain loop; TRL by env)
        torch.backends.cuda.enable_cudnn_sdp(args.cudnn_attention == "true")
        os.environ["MEDRLVR_CUDNN_ATTENTION"] = args.cudnn_attention
    defaults = dict(workloads=["smollm2-b8", "smollm2-b32", "smollm2-b128", "random-b32"] if gpu else ["smollm2-b8", "random-b32"],
                    gen_repeats=3 if gpu else 1, update_batch=64 if gpu else 8, micro_batch=16 if gpu else 4,
                    prompt_len=256 if gpu else 128, response_len=256 if gpu else 128, repeats=5 if gpu else 2,
                    matmul_sizes=[4096, 8192] if gpu else [2048, 4096], copy_mb=4096 if gpu else 512)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.model, args.workloads, args.max_new_tokens, args.update_batch = "tiny-qwen2", ["random-b32"], 16, 4
        args.micro_batch, args.prompt_len, args.response_len, args.grpo_steps = 2, 32, 16, 1
        args.matmul_sizes, args.copy_mb, args.repeats = [1024], 128, 1
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    if {"generation", "update"} & set(only) and "machine" not in only:
        only.insert(0, "machine")  # their bounds and MFU need the measured limits
    device = torch.device(args.device)
    load_start, started = os.getloadavg(), time.time()
    header = (f"{describe_machine(device)}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start"
              + ("; --quick" if args.quick else ""))
    print(header, flush=True)
    rows, limits = ["| section | what | measured | vs |", "|---|---|---|---|"], {}
    for section in only:
        t0 = time.time()
        try:
            if section == "machine":
                new, limits = bench_machine(args, device)
            else:
                new = {"generation": lambda: bench_generation(args, limits), "update": lambda: bench_update(args, limits),
                       "step": lambda: bench_step(args), "fsdp": lambda: bench_fsdp(args),
                       "grpo": lambda: bench_grpo(args)}[section]()
        except Exception as e:  # one broken section must not cost the others' numbers
            print(f"{section} failed: {e!r}", file=sys.stderr, flush=True)
            new = [f"| {section} | failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__} | | |"]
        rows += new
        print("\n".join(new) + f"\n  ({section}: {time.time() - t0:.0f} s, load average {os.getloadavg()[0]:.2f})", flush=True)
    load_end = os.getloadavg()
    footer = (f"load average {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at end; "
              f"{time.time() - started:.0f} s in all; command: python bench.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    table = "\n".join(rows)
    print("\n" + table + "\n\n" + footer)
    if args.out:
        write_markdown(Path(args.out), header, table, footer, "gpu table" if gpu else "table")


def write_markdown(path, header, table, footer, which="table"):
    """BENCHMARKS.md: the table between markers, so text written around it by hand survives a rerun. The CPU
    table and the GPU table have markers of their own: a run on one kind of machine leaves the other's table."""
    begin, end = f"<!-- bench.py {which}: begin -->", f"<!-- bench.py {which}: end -->"
    block = f"{begin}\n{header}\n\n{table}\n\n{footer}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `python bench.py`.\n\n" + begin + end + "\n"
    if begin in old and end in old:
        new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
