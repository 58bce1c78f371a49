"""A soak test: a long run of the toy task killed with SIGKILL five times at random moments (two of
them while a checkpoint is being written) and resumed each time, against the same run never
interrupted. What must hold after it all:
  - metrics.jsonl and rollouts.jsonl equal the uninterrupted run's line for line (no step lost,
    doubled or torn; the wall-clock fields aside);
  - the checkpoints folder holds at most --keep_last complete checkpoints, each passing its
    manifest check, and no leftover of a killed write;
  - the uninterrupted run's resident memory at its end is within 10% of what it was after the
    first tenth of the run: no leak that grows with the steps.
The toy task (conftest.py) is fast and deterministic with OMP_NUM_THREADS=1, so "equal" is equal.
"""
import json
import os
import random
import signal
import subprocess
import time

import pytest
from conftest import ROOT, trainer_command

import checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 200
KEEP_LAST = 2
KILLS = 5
WALL_CLOCK = ("time_", "tokens_per_s")


def start(args, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{out}.log", "a")
    command = trainer_command("train_ppo.py", [*args, "--out_dir", out])
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def lines(path) -> list:
    return path.read_text().splitlines() if path.exists() else []


def without_wall_clock(out) -> list:
    rows = [json.loads(line) for line in lines(out / "metrics.jsonl")]
    return [json.dumps({k: v for k, v in row.items() if not k.startswith(WALL_CLOCK)},
                       sort_keys=True) for row in rows]


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_for(condition, process, timeout=600):
    """Poll until condition() holds; False if the process ended first."""
    t0 = time.time()
    while not condition():
        if process.poll() is not None:
            return False
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.002)
    return True


def writing_a_checkpoint(out) -> bool:
    folder = out / "checkpoints"
    return folder.is_dir() and any(".tmp-" in p.name for p in folder.iterdir())


@pytest.mark.slow
def test_killed_five_times_and_resumed_equals_a_run_never_killed(toy, tmp_path):
    args = toy + ["--max_steps", str(STEPS), "--save_every", "5", "--keep_last", str(KEEP_LAST)]

    # The run never interrupted; its resident memory after a tenth of the steps and near the end.
    reference = tmp_path / "reference"
    process = start(args, reference)
    memory = []
    for at in (STEPS // 10, STEPS - 2):
        assert wait_for(lambda at=at: len(lines(reference / "metrics.jsonl")) >= at, process)
        memory.append(resident_bytes(process.pid))
    assert process.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert memory[1] <= 1.10 * memory[0], f"resident memory grew: {memory}"

    # The same run, SIGKILLed at five moments drawn from a seeded generator, resumed each time.
    out = tmp_path / "killed"
    moments = random.Random(0).sample(range(STEPS // 10, STEPS - 5), KILLS)
    in_a_write = {1, 3}  # these kills wait for a checkpoint write in progress
    torn_writes = 0
    for kill, step in enumerate(sorted(moments)):
        process = start(args + (["--resume"] if kill else []), out)
        wait_for(lambda step=step: len(lines(out / "metrics.jsonl")) >= step, process)
        if kill in in_a_write:
            wait_for(lambda: writing_a_checkpoint(out), process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        torn_writes += writing_a_checkpoint(out)
    process = start(args + ["--resume"], out)
    assert process.wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    assert torn_writes >= 1, "no kill landed in a checkpoint write: nothing of that was tested"

    assert without_wall_clock(out) == without_wall_clock(reference)
    assert lines(out / "rollouts.jsonl") == lines(reference / "rollouts.jsonl")
    steps = [json.loads(line)["step"] for line in lines(out / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))  # each once, in order
    folder = out / "checkpoints"
    kept = checkpoint.list_checkpoints(folder)
    assert 1 <= len(kept) <= KEEP_LAST
    assert all(checkpoint.verify(c) == [] for c in kept)
    assert sorted(p.name for p in folder.iterdir()) == sorted(c.name for c in kept)  # no leftover
