"""What both trainers (train_ppo.py, train_sft.py) share: a dataclass of flags with presets, the start of a run
(process group, settings re-checked against the number of ranks, seeds, the checkpoint to resume from), bf16
autocast on one GPU, and the fault-injection hook of tests/test_faults.py.
"""
import argparse
import dataclasses
import os
import random
import sys
from dataclasses import field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint as C
import distributed as D


def arg(default, help):
    return field(default=default, metadata={"help": help})


def parse_flags(config_cls, presets: dict, check, argv=None, description=""):
    """Build a config from the command line: flags override the preset, which overrides the dataclass
    defaults. `check(cfg)` returns the problems of a config; any makes the parser exit with them."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config_cls):
        text = f"{f.metadata['help']} (default {f.default!r}; presets may change it)".replace("%", "%%")
        if f.type is bool:  # `--resume` alone means True; `--resume false` is also accepted
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes", "on"), nargs="?",
                           const=True, default=None, help=text)
        else:  # default None: a flag that was not given leaves the preset's value
            p.add_argument(f"--{f.name}", type=f.type, default=None, help=text)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", config_cls.preset)
    if preset not in presets:
        p.error(f"--preset {preset!r}: unknown; choose one of {sorted(presets)}")
    cfg = config_cls(**{**presets[preset], **given})
    if problems := check(cfg):
        p.error("\n  ".join(["bad settings:"] + problems))
    return cfg


def start_run(cfg, check_config):
    """What both trainers do first: join the process group, re-check the settings against the number of
    ranks, seed, and find the checkpoint to resume from (rank 0 looks, every rank gets its answer)."""
    rank, world, device = D.setup(cfg.device, cfg.collective_timeout_s)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention)  # for this process's every SDPA call
    if problems := check_config(cfg, world):
        raise SystemExit("bad settings:\n  " + "\n  ".join(problems))
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    resume_from = None
    if cfg.resume:
        resume_from = D.broadcast_object(C.find_resumable(out / "checkpoints", cfg.resume_fallback, log) if rank == 0 else None)
        log(f"resuming from {resume_from}" if resume_from else f"--resume: no checkpoint in {out}/checkpoints, starting fresh")
    return rank, world, device, log, out, resume_from


def autocast(cfg, device):
    """bf16 autocast for a single GPU process; under FSDP the mixed-precision policy does this instead."""
    on = cfg.dtype == "bfloat16" and device.type == "cuda" and not D.is_distributed()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def fault(name, step, rank=None):
    """Test hook: MEDRLVR_FAULT="nan_reward@2,nan_loss@3,raise@4:1,slow_save@2" injects a fault at a step
    (and rank). Used by tests/test_faults.py only; empty in every real run."""
    spec = os.environ.get("MEDRLVR_FAULT", "")
    for item in filter(None, spec.split(",")):
        what, _, where = item.partition("@")
        at, _, on_rank = where.partition(":")
        if what == name and int(at) == step and (not on_rank or rank is None or int(on_rank) == rank):
            return True
    return False
