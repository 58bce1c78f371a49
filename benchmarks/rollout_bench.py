"""Useful generated tokens per second: transformers' model.generate, the fast engine
(engine.generate) and the teaching core (rollout.generate), side by side; the engine with its
default decode (static shapes replayed as CUDA graphs on a GPU, dynamic on the CPU) and the other
one, and on a GPU transformers' own fast path too (a static cache, compiled by generate).

All three sample with the same settings (do_sample, temperature 1, top-p 1, no top-k) from the same
prompts with the same max_new_tokens and the same stopping rule. "Useful" tokens are those up to
and including the one that ended each row (EOS, a stop string, or the length limit): what RL trains
on. Padding that `generate` keeps computing for rows that already ended does not count. Each run's
time is split into the prefill (up to the logits of the first response token) and the decode steps
after it: for transformers at its first logits-processor call, for the engine when its prefill
function (engine.prefill_grouped or engine.prefill_padded) returns, for the teaching core when the
first rollout.decoder_forward call of the generate call (its prefill) returns.

Workloads (pick with --workloads):
  smollm2-b8, -b32, -b128  SmolLM2-135M-Instruct (model.load_policy("smollm2-135m")), fp32 (bf16
                           on a GPU), the first 8 / 32 / 128 MedQA dev questions as r1_chat prompts,
                           stop at "</answer>" or EOS.
  random-b32               a random Qwen2 (hidden 256, 4 layers) with the ~100-token character
                           vocabulary of model_zoo.py, EOS in it, temperature 1: rows end at very
                           different lengths.
  smollm2-b64              as smollm2-b8, 64 questions (the GPU decode target's batch).
  paper3b-b64, -b256       Qwen2.5-3B's shape with random weights (model_zoo.RANDOM_NAMES), bf16 on
                           a GPU, random prompts of 200-400 tokens; rows run to the length limit.
  paper3b-mini-b8          the same, scaled down to 2 layers (bench.py --quick).

Run from the repository root:
  python -m benchmarks.rollout_bench                          # smollm2-b8, smollm2-b32, random-b32
  python -m benchmarks.rollout_bench --workloads random-b32 --threads 1
  python -m benchmarks.rollout_bench --profile --workloads smollm2-b8 --max_new_tokens 16
Timings are noisy on a shared machine: compare the implementations within one run (they
alternate, so all see the same background load).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import engine
import rollout

WORKLOADS = {  # name -> (model, batch)
    "smollm2-b8": ("smollm2-135m", 8),
    "smollm2-b32": ("smollm2-135m", 32),
    "smollm2-b128": ("smollm2-135m", 128),  # a GPU-sized rollout batch
    "random-b32": ("random", 32),
    "smollm2-b64": ("smollm2-135m", 64),
    # the paper's model size with random weights (model_zoo.RANDOM_NAMES): no stop string, rows
    # run to max_new_tokens; prompts of random tokens, MedQA's lengths
    "paper3b-b64": ("random-qwen2.5-3b", 64),
    "paper3b-b256": ("random-qwen2.5-3b", 256),
    "paper3b-mini-b8": ("random-qwen2.5-3b-mini", 8),  # its shape scaled down: bench.py --quick
}
STOP = ["</answer>"]


class StepClock(LogitsProcessor):
    """Notes the time at every decoding step of model.generate (it runs once per step, after the
    forward); starts `profiler` (if any) after the prefill."""

    def __init__(self, profiler=None):
        self.times = []
        self.profiler = profiler

    def __call__(self, input_ids, scores):
        sync(scores.device)
        self.times.append(time.perf_counter())
        if self.profiler is not None and len(self.times) == 1:
            self.profiler.start()
        return scores


def sync(device):
    """Wait for the GPU's queued work, so a host clock read after it counts that work (no-op on
    CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def load(model_name: str, batch: int, device="cpu", dtype="float32"):
    """(model, tokenizer, input_ids [B, P], attention_mask [B, P], stop strings) for one workload,
    the model and the prompts on `device`, the weights in `dtype` (fp32 on CPU; bf16 on GPU)."""
    from model import load_policy
    from model_zoo import load_tiny
    if model_name == "random":
        model, tok = load_tiny("qwen2", seed=0, hidden=256, layers=4, heads=8, kv_heads=4,
                               dtype=dtype, device=device)
        prompts = [f"Question {i}: " + "the patient presents with fever " * (1 + i % 4)
                   for i in range(batch)]
        enc = tok(prompts, return_tensors="pt", padding=True)
        return model, tok, enc["input_ids"].to(device), enc["attention_mask"].to(device), None
    if model_name.startswith("random-qwen2.5-3b"):
        return paper_shaped(model_name, batch, device, dtype)
    from data import build_prompt, tokenize_prompts
    from sources import load_dataset
    model, tok = load_policy(model_name, dtype=dtype, device=device)
    # ../shared/data beside the repository, unless MEDRLVR_DATA says otherwise
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    data_dir = os.environ.get("MEDRLVR_DATA") or (str(shared) if shared.is_dir() else None)
    records = load_dataset("medqa_dev", data_dir)[:batch]
    prompts = [build_prompt(r, "r1_chat", tok) for r in records]
    ids, mask, _, _ = tokenize_prompts(tok, prompts, None)
    return model, tok, ids.to(device), mask.to(device), STOP


def paper_shaped(name: str, batch: int, device, dtype):
    """The paper-size workload: model_zoo's random model of Qwen2.5-3B's shape, and left-padded
    prompts of random tokens whose lengths spread as MedQA's r1_chat prompts do under Qwen's
    tokenizer (about 200 to 400 tokens). Rows run to the length limit (a random model almost never
    samples its EOS)."""
    from model_zoo import load_random_named
    model, tok = load_random_named(name, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(200, 401, (batch,), generator=g)  # [B]
    P = int(lengths.max())
    ids = torch.randint(len(tok), model.config.vocab_size, (batch, P), generator=g)  # [B, P]
    mask = (torch.arange(P)[None, :] >= P - lengths[:, None]).long()  # [B, P] left padded
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    return model, tok, ids.to(device), mask.to(device), None


def eos_ids(model, tok) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return eos or [tok.eos_token_id]


def useful_lengths(responses: torch.Tensor, eos: list[int], stops, tok) -> list[int]:
    """Per row of responses [B, T]: tokens up to and including the first EOS or stop-string end,
    else T."""
    lengths = []
    for row in responses.tolist():
        n = len(row)
        for k, token in enumerate(row):
            tail = row[max(0, k + 1 - 12):k + 1]
            if token in eos or (stops and any(s in tok.decode(tail) for s in stops)):
                n = k + 1
                break
        lengths.append(n)
    return lengths


@contextlib.contextmanager
def first_return_clock(module, names, device, profiler=None):
    """Within the block, module.<name> for each of `names` is wrapped: when the first call to any of
    them returns, the time is appended to the yielded list (after the GPU's queued work) and
    `profiler` (if any) starts. Functions that the module calls by global name see the wrapper."""
    times = []

    def clocked(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            if not times:
                sync(device)
                times.append(time.perf_counter())
                if profiler is not None:
                    profiler.start()
            return out
        return call

    inner = {name: getattr(module, name) for name in names}
    for name, fn in inner.items():
        setattr(module, name, clocked(fn))
    try:
        yield times
    finally:
        for name, fn in inner.items():
            setattr(module, name, fn)


def run_ours(generate, prefill_module, prefill_names, model, tok, ids, mask, max_new, stops, seed,
             profiler=None):
    """One generate call of ours, its prefill timed by wrapping prefill_module.<prefill_names>."""
    with first_return_clock(prefill_module, prefill_names, ids.device, profiler) as prefill_done:
        sync(ids.device)
        start = time.perf_counter()
        out = generate(model, ids, mask, max_new, temperature=1.0, top_p=1.0, top_k=0,
                       eos_token_id=eos_ids(model, tok), stop_strings=stops, tokenizer=tok,
                       generator=torch.Generator().manual_seed(seed), pad_token_id=tok.pad_token_id)
        sync(ids.device)
        end = time.perf_counter()
    steps = out.response_mask.shape[1]
    return dict(steps=steps, useful=int(out.response_mask.sum()), wall=end - start,
                prefill=prefill_done[0] - start,
                step_ms=1000 * (end - prefill_done[0]) / max(steps - 1, 1))


def run_engine(model, tok, ids, mask, max_new, stops, seed, profiler=None, decode="auto"):
    """The fast engine; its prefill is whichever of its two prefill functions it picks. decode:
    engine.generate's ("auto": static shapes replayed as CUDA graphs on a GPU, dynamic on the
    CPU)."""
    generate = functools.partial(engine.generate, decode=decode)
    return run_ours(generate, engine, ("prefill_grouped", "prefill_padded"), model, tok, ids, mask,
                    max_new, stops, seed, profiler)


def run_rollout(model, tok, ids, mask, max_new, stops, seed, profiler=None):
    """The teaching core; its prefill is the first decoder_forward call of the generate call."""
    return run_ours(rollout.generate, rollout, ("decoder_forward",), model, tok, ids, mask, max_new,
                    stops, seed, profiler)


def run_transformers(model, tok, ids, mask, max_new, stops, seed, profiler=None, cache="dynamic"):
    """transformers' generate; cache="static": its own fast path (a static cache, which generate
    compiles with torch.compile on a GPU)."""
    clock = StepClock(profiler)
    options = {"cache_implementation": "static"} if cache == "static" else {}
    torch.manual_seed(seed)
    sync(ids.device)
    start = time.perf_counter()
    seqs = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                          top_k=0, max_new_tokens=max_new, eos_token_id=eos_ids(model, tok),
                          pad_token_id=tok.pad_token_id, stop_strings=stops,
                          tokenizer=tok if stops else None,
                          logits_processor=LogitsProcessorList([clock]), **options)
    sync(ids.device)
    end = time.perf_counter()
    responses = seqs[:, ids.shape[1]:]  # [B, T]
    steps = responses.shape[1]
    useful = sum(useful_lengths(responses, eos_ids(model, tok), stops, tok))
    return dict(steps=steps, useful=useful, wall=end - start, prefill=clock.times[0] - start,
                step_ms=1000 * (end - clock.times[0]) / max(steps - 1, 1))


def implementations(device, names=None) -> dict:
    """name -> runner, in the order each round runs them; transformers first: the ratios are against
    it. The engine runs with its default decode and, for the A/B, the other one; on a GPU
    transformers' static-cache fast path runs too. `names`: only these."""
    gpu = torch.device(device).type == "cuda"
    other = "dynamic" if gpu else "static"
    runners = {"transformers": run_transformers,
               "transformers-static": functools.partial(run_transformers, cache="static"),
               "engine": run_engine,
               f"engine-{other}": functools.partial(run_engine, decode=other),
               "rollout": run_rollout}
    if not gpu:
        del runners["transformers-static"]  # it compiles on a GPU only
    return {name: run for name, run in runners.items() if names is None or name in names}


def compare(model, tok, ids, mask, max_new, stops, seed=0, repeats=1, log=None,
            names=None) -> dict:
    """Each implementation `repeats` times (seeds seed, seed + 1, ...), alternating, after a
    warm-up on two prompts (so that none pays first-call costs in a timed run). Returns
    {implementation: totals}: steps, useful tokens, wall and prefill seconds summed over the
    repeats, decode ms/step their mean."""
    runners = implementations(ids.device, names)
    for run in runners.values():
        run(model, tok, ids[:2], mask[:2], 4, stops, seed)
    totals = {}
    for rep in range(repeats):  # each repeat samples with another seed; the totals sum them
        for impl, run in runners.items():
            r = run(model, tok, ids, mask, max_new, stops, seed + rep)
            if log is not None:
                log(f"{impl} seed {seed + rep}: {r}")
            total = totals.setdefault(impl, dict.fromkeys(r, 0.0))
            for key in r:
                total[key] += r[key] / (repeats if key == "step_ms" else 1)
    return totals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["smollm2-b8", "smollm2-b32", "random-b32"],
                   choices=list(WORKLOADS))
    p.add_argument("--device", default="auto",
                   help="auto (cuda if there is one) | cpu | cuda: bf16 weights on cuda")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each, seeds seed, seed+1, ...; the table sums steps, tokens and "
                        "seconds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="instead of the table: profile --max_new_tokens decode steps (e.g. 16) of "
                        "each, top ops")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.device.startswith("cuda"):  # every implementation on the kernels the engine uses
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.profile:
        return profile(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    rows = []
    for name in args.workloads:
        model_name, batch = WORKLOADS[name]
        model, tok, ids, mask, stops = load(model_name, batch, args.device, args.dtype)

        def log(line, workload=name):
            print(f"  {workload} {line}", file=sys.stderr, flush=True)

        totals = compare(model, tok, ids, mask, args.max_new_tokens, stops, args.seed,
                         args.repeats, log)
        baseline = totals["transformers"]["useful"] / totals["transformers"]["wall"]
        for impl, r in totals.items():
            tok_s = r["useful"] / r["wall"]
            rows.append(f"| {name} | {impl} | {batch} | {ids.shape[1]} | {r['steps']:.0f} | "
                        f"{r['useful']:.0f} | {r['wall']:.1f} | {r['prefill']:.2f} | "
                        f"{r['step_ms']:.1f} | {tok_s:.1f} | {tok_s / baseline:.2f}x |")
    print(f"\nmax_new_tokens {args.max_new_tokens}, repeats {args.repeats}, "
          f"load average {os.getloadavg()[0]:.2f} at end\n")
    print("| workload | impl | batch | prompt len (padded) | decode steps | useful tokens | wall s "
          "| prefill s | decode ms/step (mean) | useful tok/s | vs transformers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def profile(args):
    """Where a decode step's time goes (torch.profiler over the decode steps only, prefill
    excluded)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    for name in args.workloads:
        model, tok, ids, mask, stops = load(*WORKLOADS[name], args.device, args.dtype)
        for impl, run in implementations(ids.device).items():
            run(model, tok, ids[:2], mask[:2], 4, stops, args.seed)  # warm-up
            prof = torch_profile(activities=[ProfilerActivity.CPU])
            r = run(model, tok, ids, mask, args.max_new_tokens, stops, args.seed, profiler=prof)
            prof.stop()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
            print(f"\n{name} {impl}: {r['steps'] - 1} decode steps, {r['step_ms']:.1f} ms/step "
                  f"(profiled)")
            for e in top:
                print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.key}  ({e.count} calls)")


if __name__ == "__main__":
    main()
