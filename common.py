"""The shell both trainers (train_ppo.py, train_sft.py) run in, so that each holds only its
algorithm.

  - flags: a dataclass whose fields are the flags (`arg`), presets over it (`parse_flags`), and the
    flags every run has (`RunFlags`: the output folder, checkpoints, resume, device, dtype, ...);
  - the start of a run (`start_run`): process group, the settings re-checked against the number of
    ranks, seeds, the checkpoint to resume from; the run's folder (`prepare_out_dir`);
  - AdamW with the warm-up + cosine schedule (`adamw`), the time of each phase of a step
    (`PhaseTimer`);
  - the housekeeping around each step (`StepLoop`): the progress bar, SIGTERM and Ctrl-C, steps
    skipped for non-finite values, metrics.jsonl (strict JSON: `json_line`), checkpoints;
  - experiment tracking (--report_to, tracking.py): set up with the run's folder, fed each line
    of metrics.jsonl and eval.jsonl as it is written, closed with the step loop;
  - the command line (`cli`): an error the user can fix ends with its message, not a traceback.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import data
import distributed
import lora
import tracking
from ppo import lr_schedule


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def arg(default, help):
    """A config field that is also a command-line flag; `help` says what it does and its source."""
    return field(default=default, metadata={"help": help})


@dataclass
class RunFlags:
    """The flags of every run, whichever the trainer (each trainer's Config adds its own)."""
    out_dir: str = arg("runs/run", "metrics.jsonl, config.json and checkpoints/ go here")
    max_steps: int = arg(0, "stop after this many steps (0: num_epochs over the data)")
    save_every: int = arg(10, "checkpoint every N steps (and at the end)")
    keep_last: int = arg(3, "checkpoints kept (0: all)")
    resume: bool = arg(False, "continue from the newest sound checkpoint in out_dir")
    resume_fallback: bool = arg(False, "if the newest checkpoint fails its check, use the previous")
    seed: int = arg(42, "seeds the data order, option shuffling and sampling")
    device: str = arg("auto", "auto | cpu | cuda")
    dtype: str = arg("bfloat16", "compute dtype on a GPU: bfloat16 | float32 (weights stay fp32)")
    cudnn_attention: bool = arg(False, "on a GPU, let training forwards use cuDNN's SDPA kernel")
    gradient_checkpointing: bool = arg(True, "recompute activations in backward: less memory")
    collective_timeout_s: float = arg(600.0, "a collective waiting longer fails the job")
    max_nonfinite_steps: int = arg(3, "stop after this many steps in a row skipped for NaN or inf")
    report_to: str = arg("none", "also log metrics.jsonl and eval.jsonl to: none | tensorboard "
                                 "(out_dir/tensorboard) | wandb (tracking.py)")
    wandb_project: str = arg("medrlvr", "--report_to wandb: the W&B project")
    # LoRA (lora.py, roles.py): adapters on one frozen base instead of training every weight
    lora_rank: int = arg(0, "0: full fine-tuning (the study); r > 0: LoRA adapters of rank r "
                            "(Hu et al. 2021)")
    lora_alpha: float = arg(32.0, "LoRA's scale alpha / r (LoRA Without Regret: 32 at any rank)")
    lora_targets: str = arg(",".join(lora.ALL_TARGETS), "comma-separated linears of each decoder "
                            "layer to adapt (all seven, LoRA Without Regret)")


def parse_flags(config_class, presets: dict, check, argv=None, description=""):
    """Build a config from the command line: flags override the preset, which overrides the
    dataclass defaults. `check(cfg)` returns the problems of a config; any makes the parser exit
    with them. The trainer's own fields are listed first in --help, then RunFlags'."""
    parser = argparse.ArgumentParser(description=description)
    own = [f for f in dataclasses.fields(config_class) if f.name not in RunFlags.__annotations__]
    shared = [f for f in dataclasses.fields(config_class) if f.name in RunFlags.__annotations__]
    for f in own + shared:
        text = f"{f.metadata['help']} (default {f.default!r}; presets may change it)"
        text = text.replace("%", "%%")
        if f.type is bool:  # `--resume` alone means True; `--resume false` is also accepted
            parser.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True, default=None,
                                help=text)
        else:  # default None: a flag that was not given leaves the preset's value
            parser.add_argument(f"--{f.name}", type=f.type, default=None, help=text)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", config_class.preset)
    if preset not in presets:
        parser.error(f"--preset {preset!r}: unknown; choose one of {sorted(presets)}")
    cfg = config_class(**{**presets[preset], **given})
    problems = tracking.flag_problems(cfg.report_to) + run_flag_problems(cfg) + check(cfg)
    if problems:
        parser.error("\n  ".join(["bad settings:"] + problems))
    return cfg


def parse_bool(text: str) -> bool:
    """A boolean flag's value. Anything but the usual spellings is an error (argparse names the
    flag), so that a typo such as `--resume ture` does not quietly mean False."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false")


def value_problems(cfg, fields, positive=(), non_negative=(), fractions=(), named=(),
                   choices=None) -> list[str]:
    """The flags among `fields` (names of cfg's fields) whose values would fail later, deep in model
    loading or the loop, each with what is wrong: every float that is NaN or inf, and those that
    must be > 0 (`positive`), >= 0 (`non_negative`), in [0, 1] (`fractions`), not empty (`named`)
    or one of a fixed set (`choices`: {name: allowed values})."""
    bad = []
    for name in fields:
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(f"--{name} {value}: must be a finite number")
        elif name in positive and not value > 0:
            bad.append(f"--{name} {value}: must be > 0")
        elif name in non_negative and not value >= 0:
            bad.append(f"--{name} {value}: must be >= 0")
        elif name in fractions and not 0 <= value <= 1:
            bad.append(f"--{name} {value}: must be in [0, 1]")
        elif name in named and not value.strip():
            bad.append(f"--{name} {value!r}: must not be empty")
        elif name in (choices or {}) and value not in choices[name]:
            bad.append(f"--{name} {value!r}: choose one of {', '.join(choices[name])}")
    return bad


def own_fields(cfg) -> list[str]:
    """The names of a trainer's own flags: its Config's fields that RunFlags does not have."""
    return [f.name for f in dataclasses.fields(cfg) if f.name not in RunFlags.__annotations__]


def run_flag_problems(cfg) -> list[str]:
    """What is wrong with the values of the RunFlags fields (each trainer checks its own fields;
    --report_to is tracking.flag_problems')."""
    bad = value_problems(cfg, list(RunFlags.__annotations__), positive=(
        "save_every", "collective_timeout_s", "max_nonfinite_steps"),
        non_negative=("max_steps", "keep_last", "lora_rank"), named=("out_dir",),
        choices={"device": ("auto", "cpu", "cuda"), "dtype": ("bfloat16", "float32")})
    if not 0 <= cfg.seed < 2**32:  # numpy's seed range
        bad.append(f"--seed {cfg.seed}: must be in [0, 2**32)")
    return bad + lora_problems(cfg)


def lora_problems(cfg) -> list[str]:
    """--lora_alpha and --lora_targets, checked when LoRA is on (--lora_rank > 0). A target the
    architecture lacks is found once the model is loaded (BadFlag)."""
    if cfg.lora_rank <= 0:
        return []
    bad = []
    if not cfg.lora_alpha > 0:
        bad.append(f"--lora_alpha {cfg.lora_alpha}: must be > 0")
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in lora.ALL_TARGETS]
    if unknown or not targets:
        bad.append(f"--lora_targets {cfg.lora_targets!r}: unknown {unknown or 'none given'}; "
                   f"choose among {','.join(lora.ALL_TARGETS)}")
    return bad


# --------------------------------------------------------------------------------------------------
# The start of a run
# --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """This process's place in the job, and the run's folder."""
    cfg: RunFlags
    rank: int
    world: int
    device: torch.device
    out: Path  # the run's folder (--out_dir)
    resume_from: Path | None  # the checkpoint folder to resume from, if any
    tracker: tracking.Tracker = field(default_factory=tracking.Tracker)  # rank 0's: prepare_out_dir

    def log(self, message: str) -> None:
        """A line on stderr, from rank 0 only (tqdm.write keeps the progress bar intact)."""
        if self.rank == 0:
            tqdm.write(message, file=sys.stderr)


def start_run(cfg, check_config) -> Run:
    """What both trainers do first: join the process group, re-check the settings against the number
    of ranks, seed, and find the checkpoint to resume from (rank 0 looks, every rank gets its
    answer)."""
    rank, world, device = distributed.setup(cfg.device, cfg.collective_timeout_s)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention)  # every SDPA call of this process
    if problems := check_config(cfg, world):
        raise SystemExit("bad settings:\n  " + "\n  ".join(problems))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    run = Run(cfg, rank, world, device, Path(cfg.out_dir), None)
    if cfg.resume:
        found = None
        if rank == 0:
            found = checkpoint.find_resumable(run.out / "checkpoints", cfg.resume_fallback, run.log)
        run.resume_from = distributed.broadcast_object(found)
        if run.resume_from:
            run.log(f"resuming from {run.resume_from}")
        else:
            run.log(f"--resume: no checkpoint in {run.out}/checkpoints, starting fresh")
    return run


def prepare_out_dir(run: Run, start: int, logs: list[str]) -> None:
    """config.json, and the logs: on resume, cut back to the checkpoint's step; else started
    anew. Then the tracker (--report_to), which continues or starts anew likewise."""
    if run.rank != 0:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.json").write_text(json.dumps(asdict(run.cfg), indent=1))
    for name in logs:
        if run.resume_from:
            checkpoint.keep_steps_upto(run.out / name, start - 1)
        else:
            (run.out / name).unlink(missing_ok=True)
    run.tracker = tracking.start(run.cfg.report_to, run.out, asdict(run.cfg), start,
                                 bool(run.resume_from), run.cfg.wandb_project, run.log)


def adamw(params: list, lr: float, cfg, total_updates: int):
    """AdamW (betas 0.9, 0.95, as OpenRLHF) over `params` and its schedule: linear warm-up, then
    cosine decay to min_lr_ratio (ppo.lr_schedule), stepped once per optimizer step."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    factor = lr_schedule(total_updates, cfg.warmup_ratio, cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PhaseTimer:
    """Seconds per phase of a step (`with timer("generate"): ...`), each read once the GPU's queued
    work is done, so that a phase's time holds its own kernels."""

    def __init__(self, device: torch.device, phases: tuple):
        self.device = device
        self.seconds = dict.fromkeys(phases, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str):  # a phase entered twice (a second sampling round) adds up
        start = self.now()
        yield
        self.seconds[phase] += self.now() - start

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def metrics(self) -> dict:
        return {f"time_{phase}": seconds for phase, seconds in self.seconds.items()}


# --------------------------------------------------------------------------------------------------
# Around each step
# --------------------------------------------------------------------------------------------------
class StepLoop:
    """The steps of a run, and the housekeeping that ends each one, out of the trainer's way.

    Iterate over it for the step numbers (a progress bar on rank 0). After each step, `end_step`
    logs a skipped update, writes metrics.jsonl (and any other log) on rank 0, stops the run after
    cfg.max_nonfinite_steps steps in a row skipped for non-finite values, and writes a checkpoint
    every cfg.save_every steps, at the end, and when a stop is asked for. SIGTERM or Ctrl-C asks for
    one: the step in flight finishes, a checkpoint is written, the loop ends; a second signal stops
    at once.
    """

    def __init__(self, run: Run, start: int, total_steps: int, models: dict, optimizers: dict,
                 schedulers: dict, tokenizer, nonfinite: str, advice: str):
        self.run, self.total_steps, self.tokenizer = run, total_steps, tokenizer
        self.models, self.optimizers, self.schedulers = models, optimizers, schedulers
        self.nonfinite, self.advice = nonfinite, advice  # for the message that stops the run
        self.stop_signal = None  # the signal's name, once one arrived
        self.nonfinite_in_a_row = 0
        self.saved = 0  # the step of the last checkpoint written
        self.step_started = time.perf_counter()
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.bar = tqdm(range(start, total_steps + 1), initial=start - 1, total=total_steps,
                        disable=run.rank != 0, dynamic_ncols=True)

    def __iter__(self):
        for step in self.bar:
            self.step_started = time.perf_counter()
            yield step

    def on_signal(self, signum, frame):
        if self.stop_signal:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name

    def end_step(self, step: int, metrics: dict, trainer_state: dict, tokens: float,
                 postfix: dict, logs: dict | None = None) -> bool:
        """Log, count, checkpoint. `tokens`: what the step computed, for tokens/s; `trainer_state`:
        saved with the checkpoint; `logs`: more files to append lines to. True: stop the run now."""
        run, cfg = self.run, self.run.cfg
        seconds = time.perf_counter() - self.step_started
        metrics.update(time_step=seconds, tokens_per_s=tokens / seconds)
        skipped = metrics.get("skipped", "")
        if skipped:
            run.log(f"step {step}: update skipped ({skipped})")
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if "non-finite" in skipped else 0
        if run.rank == 0:
            for name, lines in {"metrics.jsonl": [metrics], **(logs or {})}.items():
                with open(run.out / name, "a") as f:
                    f.writelines(json_line(line) for line in lines)
            run.tracker.log(metrics, step)
            self.bar.set_postfix(postfix)
        if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:  # after the logs: this step logged
            raise SystemExit(f"step {step}: {self.nonfinite_in_a_row} steps in a row skipped for "
                             f"non-finite {self.nonfinite} (--max_nonfinite_steps "
                             f"{cfg.max_nonfinite_steps}); stopping. The last checkpoint holds "
                             f"finite weights: {self.advice}")
        stopping = distributed.all_reduce_dict({"s": float(bool(self.stop_signal))})["s"] > 0
        if step % cfg.save_every == 0 or step == self.total_steps or stopping:
            checkpoint.save_training(run.out / "checkpoints", step, self.models, self.optimizers,
                                     self.schedulers, self.tokenizer, asdict(cfg), trainer_state,
                                     keep_last=cfg.keep_last)
            self.saved = step
        if stopping:
            signal_name = self.stop_signal or "a signal on another rank"
            run.log(f"stopped by {signal_name} after step {step}; checkpoint "
                    f"{run.out}/checkpoints/step_{self.saved:06d} written; continue with --resume")
        return stopping

    def close(self):
        self.run.tracker.close()
        self.bar.close()
        distributed.cleanup()


def json_line(obj) -> str:
    """One line of strict JSON: a number that is not finite (a NaN loss, an undefined statistic)
    is written as null, never as NaN or Infinity, which strict readers (jq, browsers, Python's
    json with parse_constant refusing them) refuse."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(obj), allow_nan=False) + "\n"


class BadFlag(ValueError):
    """A flag's value that only the loaded model shows to be wrong (a --lora_targets linear the
    architecture lacks): the run stops as argparse stops a bad flag, exit code 2."""


def cli(main, argv=None):
    """The command line: what the user can fix (a malformed data file, a checkpoint that fails its
    manifest check, a disk that cannot be written, a flag the model refuses) ends the run with its
    message, not a traceback from deep inside. main() itself raises, for callers that want the
    exception."""
    try:
        main(argv)
    except (data.DataError, checkpoint.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    except BadFlag as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
