"""Useful generated tokens per second of the samplers a run can choose (samplers.py's --engine),
side by side with transformers' model.generate, on one workload:

  transformers         transformers' generate, its default dynamic cache
  transformers-static  transformers' own fast path: a static cache, which generate compiles (CUDA)
  plain                --engine plain: rollout.generate, the teaching core
  dynamic              --engine dynamic: engine.Engine with the CPU's code paths
  static               --engine static: static shapes, replayed as CUDA graphs on CUDA (eager on
                       the CPU)
  static-compiled      --engine static --compile_decode: the static step compiled by Inductor

Each engine is built once per workload and kept for every call, as a run keeps its sampler. All
sample with the same settings (temperature 1, top-p 1, no top-k) from the same prompts with the same
max_new_tokens and stopping rule. "Useful" tokens are those up to and including the one that ended
each row (EOS, a stop string, or the length limit): what RL trains on. Each generator first runs
once at the timed shapes, untimed, so that compiles and graph captures happen there. A call's time
is split into the prefill (up to the logits of the first response token: transformers' first
logits-processor call, the engine's engine.run_prefill returning, the teaching core's first
rollout.decoder_forward returning) and the decode steps after it; on CUDA the split is a CUDA event
recorded in the stream, never a synchronize (timing each step with one would slow the loops that
avoid it).

Workloads (pick with --workloads):
  smollm2-b8, -b32, -b64, -b128  SmolLM2-135M-Instruct, fp32 (bf16 on a GPU), the first 8 / 32 /
                           64 / 128 MedQA dev questions as r1_chat prompts, stop at "</answer>" or
                           EOS.
  random-b32               a random Qwen2 (hidden 256, 4 layers) with the ~100-token character
                           vocabulary of model_zoo.py, EOS in it: rows end at very different
                           lengths.
  paper3b-b64, -b256       Qwen2.5-3B's shape with random weights (model_zoo.RANDOM_NAMES), random
                           prompts of 200-400 tokens; rows run to the length limit.
  paper3b-mini-b8          the same, scaled down to 2 layers (bench.py --quick).

Run from the repository root:
  python -m benchmarks.rollout_bench                          # smollm2-b8, smollm2-b32, random-b32
  python -m benchmarks.rollout_bench --workloads random-b32 --threads 1
  python -m benchmarks.rollout_bench --profile --workloads smollm2-b8 --max_new_tokens 16
Timings are noisy on a shared machine: compare the generators within one run (they alternate, so
all see the same background load).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import engine
import rollout
import samplers
from benchmarks.measure import Timeline, reason, sync

WORKLOADS = {  # name -> (model, batch)
    "smollm2-b8": ("smollm2-135m", 8),
    "smollm2-b32": ("smollm2-135m", 32),
    "smollm2-b64": ("smollm2-135m", 64),  # the GPU decode target's batch
    "smollm2-b128": ("smollm2-135m", 128),
    "random-b32": ("random", 32),
    # the paper's model size with random weights: no stop string, rows run to max_new_tokens
    "paper3b-b64": ("random-qwen2.5-3b", 64),
    "paper3b-b256": ("random-qwen2.5-3b", 256),
    "paper3b-mini-b8": ("random-qwen2.5-3b-mini", 8),  # its shape scaled down: bench.py --quick
}
STOP = ["</answer>"]
# name -> how the table calls it (the module docstring says what each is)
GENERATORS = {"transformers": "transformers' generate",
              "transformers-static": "transformers' generate, static cache compiled",
              "plain": "--engine plain (rollout.generate)",
              "dynamic": "--engine dynamic",
              "static": "--engine static (CUDA graphs on CUDA)",
              "static-compiled": "--engine static --compile_decode"}
# what bench.py's generation section runs: transformers first, the ratios are against it
DEFAULT_GENERATORS = ("transformers", "dynamic", "static", "plain")


@dataclass(frozen=True)
class Workload:
    """A model on its device and the prompts it continues: ids, mask [B, P] left padded."""
    name: str
    model: object
    tokenizer: object
    ids: torch.Tensor
    mask: torch.Tensor
    stops: list | None  # stop strings (None: EOS and the length limit only)

    @property
    def eos(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return eos or [self.tokenizer.eos_token_id]


def load(name: str, device="cpu", dtype="float32") -> Workload:
    """A workload of WORKLOADS, the model on `device` with its weights in `dtype` (fp32 on the
    CPU, bf16 on a GPU)."""
    from model import load_policy
    from model_zoo import load_tiny
    model_name, batch = WORKLOADS[name]
    if model_name == "random":
        model, tok = load_tiny("qwen2", seed=0, hidden=256, layers=4, heads=8, kv_heads=4,
                               dtype=dtype, device=device)
        prompts = [f"Question {i}: " + "the patient presents with fever " * (1 + i % 4)
                   for i in range(batch)]
        enc = tok(prompts, return_tensors="pt", padding=True)
        return Workload(name, model, tok, enc["input_ids"].to(device),
                        enc["attention_mask"].to(device), None)
    if model_name.startswith("random-qwen2.5-3b"):
        return paper_shaped(name, model_name, batch, device, dtype)
    from data import build_prompt, tokenize_prompts
    from sources import load_dataset
    model, tok = load_policy(model_name, dtype=dtype, device=device)
    # ../shared/data beside the repository, unless MEDRLVR_DATA says otherwise
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    data_dir = os.environ.get("MEDRLVR_DATA") or (str(shared) if shared.is_dir() else None)
    records = load_dataset("medqa_dev", data_dir)[:batch]
    prompts = [build_prompt(r, "r1_chat", tok) for r in records]
    ids, mask, _, _ = tokenize_prompts(tok, prompts, None)
    return Workload(name, model, tok, ids.to(device), mask.to(device), STOP)


def paper_shaped(name: str, model_name: str, batch: int, device, dtype) -> Workload:
    """The paper-size workload: model_zoo's random model of Qwen2.5-3B's shape, and left-padded
    prompts of random tokens whose lengths spread as MedQA's r1_chat prompts do under Qwen's
    tokenizer (about 200 to 400 tokens). Rows run to the length limit (a random model almost never
    samples its EOS)."""
    from model_zoo import load_random_named
    model, tok = load_random_named(model_name, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(200, 401, (batch,), generator=g)  # [B]
    P = int(lengths.max())
    ids = torch.randint(len(tok), model.config.vocab_size, (batch, P), generator=g)  # [B, P]
    mask = (torch.arange(P)[None, :] >= P - lengths[:, None]).long()  # [B, P] left padded
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    return Workload(name, model, tok, ids.to(device), mask.to(device), None)


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


# ==================================================================================================
# One timed generate call of each generator
# ==================================================================================================
class FirstLogits(LogitsProcessor):
    """Marks the timeline at transformers' first logits-processor call (the prefill's logits), then
    runs `then` (if any: a profiler's start); later calls only pass the scores on."""

    def __init__(self, timeline: Timeline, then=None):
        self.timeline, self.then, self.mark = timeline, then, None

    def __call__(self, input_ids, scores):
        if self.mark is None:
            self.mark = self.timeline.mark()
            if self.then is not None:
                self.then()
        return scores


@contextlib.contextmanager
def first_return(module, name: str, timeline: Timeline, then=None):
    """Within the block, module.<name> is wrapped: when its first call returns, the timeline is
    marked (the yielded list gets the mark) and `then` runs. Functions that the module calls by
    global name see the wrapper."""
    marks = []
    inner = getattr(module, name)

    @functools.wraps(inner)
    def marked(*args, **kwargs):
        out = inner(*args, **kwargs)
        if not marks:
            marks.append(timeline.mark())
            if then is not None:
                then()
        return out

    setattr(module, name, marked)
    try:
        yield marks
    finally:
        setattr(module, name, inner)


def timing(timeline, start, prefill_done, end, steps: int, useful: int) -> dict:
    wall = timeline.seconds(start, end)
    prefill = timeline.seconds(start, prefill_done)
    return dict(steps=steps, useful=useful, wall=wall, prefill=prefill,
                step_ms=1000 * (wall - prefill) / max(steps - 1, 1))


def run_transformers(w: Workload, max_new: int, seed: int, cache="dynamic", then=None) -> dict:
    """One call of transformers' generate; cache="static": its static-cache fast path."""
    timeline = Timeline(w.ids.device)
    first = FirstLogits(timeline, then)
    options = {"cache_implementation": "static"} if cache == "static" else {}
    torch.manual_seed(seed)
    sync(w.ids.device)  # start from an idle device: one wait a call, none a step
    start = timeline.mark()
    seqs = w.model.generate(w.ids, attention_mask=w.mask, do_sample=True, temperature=1.0,
                            top_p=1.0, top_k=0, max_new_tokens=max_new, eos_token_id=w.eos,
                            pad_token_id=w.tokenizer.pad_token_id, stop_strings=w.stops,
                            tokenizer=w.tokenizer if w.stops else None,
                            logits_processor=LogitsProcessorList([first]), **options)
    end = timeline.mark()
    responses = seqs[:, w.ids.shape[1]:]  # [B, T]
    useful = sum(useful_lengths(responses, w.eos, w.stops, w.tokenizer))
    return timing(timeline, start, first.mark, end, responses.shape[1], useful)


def run_sampler(sampler, w: Workload, max_new: int, seed: int, then=None) -> dict:
    """One call of a samplers.py sampler, with its noise drawn as the trainer draws it: uniforms
    [B, max_new] on the device."""
    timeline = Timeline(w.ids.device)
    g = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(len(w.ids), max_new, generator=g).to(w.ids.device)  # [B, max_new]
    # the end of the prefill: the engine's prefill function, or the teaching core's first forward
    site = (rollout, "decoder_forward") if isinstance(sampler, samplers.Plain) else \
        (engine, "run_prefill")
    with first_return(*site, timeline, then) as prefill_done:
        sync(w.ids.device)
        start = timeline.mark()
        out = sampler.generate(w.ids, w.mask, max_new, temperature=1.0, top_p=1.0, top_k=0,
                               eos_token_id=w.eos, stop_strings=w.stops, tokenizer=w.tokenizer,
                               pad_token_id=w.tokenizer.pad_token_id, uniforms=uniforms)
        end = timeline.mark()
    return timing(timeline, start, prefill_done[0], end, out.response_mask.shape[1],
                  int(out.response_mask.sum()))


def make_runner(name: str, w: Workload, max_new: int):
    """run(max_new, seed, then=None) -> timing for generator `name` on the workload. An engine is
    built here, once, sized for the workload's calls."""
    if name not in GENERATORS:
        raise ValueError(f"generator {name!r}: choose from {', '.join(GENERATORS)}")
    if name.startswith("transformers"):
        cache = "static" if name == "transformers-static" else "dynamic"
        if cache == "static" and w.ids.device.type != "cuda":
            raise ValueError("transformers-static: generate compiles its static cache on CUDA")
        return functools.partial(run_transformers, w, cache=cache)
    choice = "static" if name == "static-compiled" else name
    sampler = samplers.make_sampler(choice, w.model, w.model.dtype, own_weights=False,
                                    max_rows=len(w.ids), max_len=w.ids.shape[1] + max_new,
                                    compile_decode=name == "static-compiled")
    return functools.partial(run_sampler, sampler, w)


def compare(w: Workload, names, max_new: int, seed=0, repeats=1, log=None):
    """Each generator of `names` `repeats` times (seeds seed, seed + 1, ...), alternating, after
    one untimed call at the timed shapes. Returns ({generator: totals}, {generator: why it failed}):
    steps, useful tokens, wall and prefill seconds summed over the repeats, decode ms/step their
    mean. A generator that fails is dropped with its reason; the others go on."""
    runners, failed = {}, {}
    for name in names:
        try:
            run = make_runner(name, w, max_new)
            run(max_new, seed)  # the warm-up: compiles, graph captures, the allocator's blocks
            runners[name] = run
        except Exception as e:  # one broken generator must not cost the others' rows
            failed[name] = reason(e)
    totals = {}
    for rep in range(repeats):  # each repeat samples with another seed; the totals sum them
        for name, run in list(runners.items()):
            try:
                r = run(max_new, seed + rep)
            except Exception as e:
                failed[name] = reason(e)
                del runners[name]
                totals.pop(name, None)
                continue
            if log is not None:
                log(f"{name} seed {seed + rep}: {r}")
            total = totals.setdefault(name, dict.fromkeys(r, 0.0))
            for key in r:
                total[key] += r[key] / (repeats if key == "step_ms" else 1)
    return totals, failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["smollm2-b8", "smollm2-b32", "random-b32"],
                   choices=list(WORKLOADS))
    p.add_argument("--generators", nargs="+", default=list(DEFAULT_GENERATORS),
                   choices=list(GENERATORS))
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
    if args.device.startswith("cuda"):  # every generator on the kernels the engine uses
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.profile:
        return profile(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    rows = []
    for name in args.workloads:
        w = load(name, args.device, args.dtype)

        def log(line, workload=name):
            print(f"  {workload} {line}", file=sys.stderr, flush=True)

        totals, failed = compare(w, args.generators, args.max_new_tokens, args.seed,
                                 args.repeats, log)
        baseline = totals.get("transformers")
        for impl, r in totals.items():
            tok_s = r["useful"] / r["wall"]
            ratio = f"{tok_s / (baseline['useful'] / baseline['wall']):.2f}x" if baseline else "-"
            rows.append(f"| {name} | {impl} | {len(w.ids)} | {w.ids.shape[1]} | "
                        f"{r['steps']:.0f} | {r['useful']:.0f} | {r['wall']:.1f} | "
                        f"{r['prefill']:.2f} | {r['step_ms']:.1f} | {tok_s:.1f} | {ratio} |")
        rows += [f"| {name} | {impl} | failed: {why} | | | | | | | | |"
                 for impl, why in failed.items()]
    print(f"\nmax_new_tokens {args.max_new_tokens}, repeats {args.repeats}, "
          f"load average {os.getloadavg()[0]:.2f} at end\n")
    print("| workload | generator | batch | prompt len (padded) | decode steps | useful tokens | "
          "wall s | prefill s | decode ms/step (mean) | useful tok/s | vs transformers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def profile(args):
    """Where a decode step's time goes (torch.profiler over the decode steps only, prefill
    excluded)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    for name in args.workloads:
        w = load(name, args.device, args.dtype)
        for impl in args.generators:
            run = make_runner(impl, w, args.max_new_tokens)
            run(args.max_new_tokens, args.seed)  # warm-up at the profiled shapes
            prof = torch_profile(activities=[ProfilerActivity.CPU])
            r = run(args.max_new_tokens, args.seed, then=prof.start)
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
