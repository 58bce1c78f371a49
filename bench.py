"""Where the time and memory of an RLVR run go, against baselines and against this machine's own
limits. Run from the repository root:

    python bench.py                          # every section, writes BENCHMARKS.md
    python bench.py --quick                  # small sizes and tiny models: checks every row runs
    python bench.py --only machine,update    # sections: machine host generation update step fsdp
                                             # grpo paper
    python bench.py --trl_python /work/trl-venv/bin/python   # adds TRL's GRPOTrainer (own venv)
    bash benchmarks/gpu_check.sh             # on a lent GPU: the CUDA-only tests and the GPU rows

Sections, each a row group of the table, every ratio measured in this one run (alternating where it
matters); each lives in benchmarks/:
  machine     peak matmul FLOP/s (fp32 2048^2 and 4096^2 on CPU, bf16 4096^2 and 8192^2 on GPU),
              copy bandwidth (machine.py)
  host        the host's milliseconds per decode step outside the model, at batch 64 and 256, with
              and without stop strings: the engine's static and dynamic paths against the loop
              before them (host_bench.py)
  generation  useful tokens/s of transformers' generate and of each --engine (plain: the teaching
              core; dynamic; static: CUDA graphs on CUDA) on rollout_bench.py's workloads; prefill
              seconds, and decode ms/step vs the bound bandwidth / (weight bytes + KV cache bytes)
              (generation.py)
  update      the PPO update of train_ppo.ppo_step (step 7) on a synthetic step vs a plain
              transformers forward + backward + AdamW on the same rows: unique prompts, then
              prompts shared by --update_group samples (padded and packed); MFU; and the update
              with and without LoRA adapters, time and peak memory (update_bench.py)
  step        one whole PPO step of the demo preset (ppo_step.py runs train_ppo.main in a child),
              padded rows then packed, same samples, by phase, peak memory against weights +
              gradients + AdamW + the sampler's weights and KV cache; and the demo_lora preset's
              step, time and peak memory (steps.py)
  fsdp        bytes per rank of actor and critic under FSDP2 at 1 and 2 processes (steps.py,
              fsdp_memory.py)
  grpo        a GRPO-mode step on TRL's settings vs TRL's GRPOTrainer (steps.py, trl_grpo.py; TRL
              only with --trl_python: it is never a project dependency)
  paper       Qwen2.5-3B's shape with random weights on one GPU: decode at batch 64 and 256 vs the
              HBM bound, the update's MFU, one step of each setting that fits 80 GB by phase and
              its peak memory against memory_plan.py's arithmetic (paper.py); "not measured: no
              GPU" elsewhere, --quick runs it scaled down anywhere
Every row, or small group of rows, is measured by its own call: one that fails becomes a "failed:
reason" row and the others stay. On a machine with CUDA (--device auto takes it) every section runs
there in bf16 (autocast over fp32 master weights in the update and the steps, as train_ppo.py on one
GPU), with GPU-sized defaults, and the table goes to a block of its own in BENCHMARKS.md; a run with
the paper section also writes memory_plan.py's table there. --cudnn_attention true lets every
section, ours and the baselines, use cuDNN's SDPA kernel (the engine never does). Timings on a
shared machine are noisy: the load average at start and end is written with the table.
"""
import argparse
import datetime
import gc
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import (
    generation,
    host_bench,
    machine,
    memory_plan,
    paper,
    rollout_bench,
    steps,
    update_bench,
)
from benchmarks.measure import ROOT, failed_row, reason, row

SECTIONS = ["machine", "host", "generation", "update", "step", "fsdp", "grpo", "paper"]


def section_parts(section: str, args, limits: dict) -> list:
    """The parts of a section (benchmarks/measure.Part); the machine's write `limits`."""
    if section == "machine":
        return machine.parts(args, limits)
    if section == "host":
        return host_bench.parts(repeats=1 if args.quick else 5)
    if section == "generation":
        return generation.parts(args, limits, generators=args.generators)
    if section == "update":
        return update_bench.parts(args, limits)
    if section == "step":
        return steps.parts(args)
    if section == "fsdp":
        return steps.fsdp_parts(args)
    if section == "grpo":
        return steps.grpo_parts(args)
    return paper.parts(args, limits)


def measure_section(section: str, args, limits: dict) -> list[str]:
    """Every part of the section, each by its own call: a part that fails leaves one "failed" row,
    and the rows measured before and after it stay. Each part's rows are printed as they come."""
    try:
        parts = section_parts(section, args, limits)
    except Exception as e:
        traceback.print_exc()
        return [row(section, f"failed: {reason(e)}")]
    rows = []
    for part in parts:
        t0 = time.perf_counter()
        try:
            new = part.measure()
        except Exception as e:  # one broken part must not cost the others' numbers
            traceback.print_exc()
            new = [failed_row(part, e)]
        gc.collect()  # the part's models, before the next part loads its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows += new
        seconds = time.perf_counter() - t0
        print("\n".join(new) + f"\n  ({section}, {part.what}: {seconds:.0f} s, load "
                               f"average {os.getloadavg()[0]:.2f})", flush=True)
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated sections: " + " ".join(SECTIONS))
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and tiny models: checks that every row runs")
    p.add_argument("--cudnn_attention", default="false", choices=["true", "false"],
                   help="on a GPU, allow cuDNN's SDPA kernel in every section, ours and the "
                        "baselines alike (the trainers' --cudnn_attention; default off as there); "
                        "the engine never uses it")
    p.add_argument("--trl_python", default="",
                   help="python of a venv with trl installed: adds TRL's GRPOTrainer row")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"),
                   help="markdown file written ('' for none)")
    p.add_argument("--model", default="smollm2-135m", help="model of the update and fsdp sections")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (cuda if there is one): on cuda, bf16 (matmul peak, generation "
                        "weights, autocast in the update and the steps) and GPU-sized defaults")
    # None: the device's default (CPU / GPU), set below
    p.add_argument("--workloads", nargs="+", default=None, choices=list(rollout_bench.WORKLOADS),
                   help="the generation section's (smollm2-b8 random-b32 / GPU: smollm2-b8 "
                        "smollm2-b64 smollm2-b128 random-b32)")
    p.add_argument("--generators", nargs="+", default=list(rollout_bench.DEFAULT_GENERATORS),
                   choices=list(rollout_bench.GENERATORS),
                   help="the generation section's, transformers first (rollout_bench.py)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="generation and paper decode")
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
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
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
    if args.update_batch % args.update_group or args.update_batch % args.micro_batch:
        p.error(f"--update_batch {args.update_batch} must be a multiple of --update_group "
                f"{args.update_group} and of --micro_batch {args.micro_batch}")
    if args.generators[0] != "transformers":
        p.error("--generators: the first must be transformers (the ratios are against it)")
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
    load_start, started = os.getloadavg(), time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc)
    header = (f"{machine.describe(device)}; {now:%Y-%m-%d %H:%M} UTC; load average "
              f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start"
              + ("; --quick" if args.quick else ""))
    print(header, flush=True)
    rows, limits = ["| section | what | measured | vs |", "|---|---|---|---|"], {}
    for section in args.sections:
        rows += measure_section(section, args, limits)
    load_end = os.getloadavg()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    footer = (f"load average {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at end; "
              f"{time.perf_counter() - started:.0f} s in all; command: python bench.py {command}")
    table = "\n".join(rows)
    print("\n" + table + "\n\n" + footer)
    if args.out:
        which = "gpu table" if gpu else "table"
        write_markdown(Path(args.out), which, f"{header}\n\n{table}\n\n{footer}")
        if "paper" in args.sections:
            write_markdown(Path(args.out), "paper memory", memory_plan.markdown())


def write_markdown(path: Path, which: str, text: str):
    """BENCHMARKS.md: `text` between markers named `which`, so that text written around it by hand
    survives a rerun. The CPU table, the GPU table and the paper's memory arithmetic have markers
    of their own: a run on one kind of machine leaves the other's table."""
    begin, end = f"<!-- bench.py {which}: begin -->", f"<!-- bench.py {which}: end -->"
    block = f"{begin}\n{text}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `python bench.py`.\n"
    if begin in old and end in old:
        pattern = re.escape(begin) + ".*?" + re.escape(end)
        new = re.sub(pattern, lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
