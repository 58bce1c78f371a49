"""Test-only launcher: a trainer run with faults injected from outside, by replacing functions
it calls.

    python tests/launch_with_faults.py FAULTS train_ppo.py FLAGS...
    torchrun --nproc_per_node=2 tests/launch_with_faults.py FAULTS train_ppo.py FLAGS...

FAULTS is a comma-separated list of WHAT@STEP or WHAT@STEP:RANK:
  raise@S[:R]   RuntimeError("injected fault at step S on rank R") as step S begins (on rank R only)
  nan_reward@S  the first response scored in step S gets a NaN reward (train_ppo)
  nan_loss@S    every policy loss of step S is NaN, and so are its gradients
  slow_save@S   step S's checkpoint, once its files are written and before it is published, waits
                60 s: a window for a test to kill the process in the middle of a checkpoint
The trainers know nothing of this file; tests/test_faults.py and tests/test_train_ppo.py start it.
"""
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's flat modules

import checkpoint  # noqa: E402
import experience  # noqa: E402
import ppo  # noqa: E402
import verifier  # noqa: E402


def parse(spec: str) -> list[tuple[str, int, int | None]]:
    faults = []
    for item in filter(None, spec.split(",")):
        what, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        faults.append((what, int(step), int(rank) if rank else None))
    return faults


def inject(trainer_name: str, faults: list) -> None:
    """Replace, in the modules the trainer reads them from, the functions each fault needs."""
    trainer = importlib.import_module(trainer_name)
    now = {"step": None, "scored_in": None}  # the step in flight; the step of the last verify call

    def due(what, rank=None):
        return any(w == what and s == now["step"] and (r is None or rank is None or r == rank)
                   for w, s, r in faults)

    # Every step of both trainers starts by asking which rows it takes: that is where a step begins.
    rows_module, rows_name = {"train_ppo": (experience, "step_prompt_indices"),
                              "train_sft": (trainer, "step_rows")}[trainer_name]
    rows_of_step = getattr(rows_module, rows_name)

    def rows_then_faults(cfg, n, step, rank, world):
        now["step"] = step
        if due("raise", rank):
            raise RuntimeError(f"injected fault at step {step} on rank {rank}")
        return rows_of_step(cfg, n, step, rank, world)

    setattr(rows_module, rows_name, rows_then_faults)

    verify = verifier.verify

    def verify_with_nan(*args, **kwargs):
        verdict = verify(*args, **kwargs)
        if due("nan_reward") and now["scored_in"] != now["step"]:
            verdict["reward"] = float("nan")
        now["scored_in"] = now["step"]
        return verdict

    verifier.verify = verify_with_nan

    policy_loss = ppo.policy_loss

    def nan_policy_loss(*args, **kwargs):
        loss, stats = policy_loss(*args, **kwargs)
        return (loss * float("nan") if due("nan_loss") else loss), stats

    ppo.policy_loss = nan_policy_loss
    if trainer_name == "train_sft":
        target_logprobs = trainer.target_logprobs

        def nan_target_logprobs(*args, **kwargs):
            logp, hit = target_logprobs(*args, **kwargs)
            return (logp * float("nan") if due("nan_loss") else logp), hit

        trainer.target_logprobs = nan_target_logprobs

    # rank 0 fsyncs the temporary folder once every rank has written its files, then publishes it
    fsync_tree = checkpoint._fsync_tree

    def slow_save(*args, **kwargs):
        out = fsync_tree(*args, **kwargs)
        if due("slow_save"):
            time.sleep(60)
        return out

    checkpoint._fsync_tree = slow_save


def main():
    spec, script, *flags = sys.argv[1:]
    trainer_name = Path(script).stem
    inject(trainer_name, parse(spec))
    importlib.import_module(trainer_name).cli(flags)


if __name__ == "__main__":
    main()
