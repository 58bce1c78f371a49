"""Faults injected into real training runs: what a long run on a shared machine meets, and that
nothing is lost.

  1. SIGKILL in the middle of a step and in the middle of a checkpoint write: the last complete
     checkpoint passes its manifest check, `--resume` continues from it, and the resumed run logs
     exactly the metrics (and rollouts) of a run never killed; half-written log lines and leftover
     folders are dropped;
  2. SIGTERM and Ctrl-C: the step in flight finishes, a checkpoint is written, exit code 0 with a
     message (a second Ctrl-C stops at once);
  3. a non-finite reward, loss or gradient: the step is skipped and logged; too many in a row stop
     the run with an error, and no checkpoint ever holds a non-finite tensor;
  4. a file-size limit while a checkpoint is written: a one-line error naming the checkpoint folder,
     the previous checkpoint untouched (a full or read-only disk: tests/test_checkpoint.py);
  5. malformed data files, through data.load_mcqa and through the train_ppo.py command line;
  6. under torchrun: a rank that raises, dies or hangs ends the whole job, within the collective
     timeout; SIGTERM to torchrun stops every rank after a checkpoint;
  7. a corrupted checkpoint: `--resume` refuses naming the file, `--resume_fallback` steps back one.
A fault is injected by tests/launch_with_faults.py, which replaces a function the trainer calls
(nothing in the trainers knows of it), or by a signal, a resource limit, a damaged file.
The verifier fed hostile strings (odd gold labels and option tables, tags split by whitespace, any
short pattern repeated into a long response) is at the end of tests/test_verifier.py.

Training runs are subprocesses on the toy task of conftest.py (a 12-token model, 6 steps of 32
samples) with OMP_NUM_THREADS=1, which makes them deterministic on CPU, so "equal" below means
equal, not close. The command-line disk test uses RLIMIT_FSIZE, which the kernel enforces for root
too.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, trainer_command

import checkpoint
import data
import model
import train_ppo

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 6


# ==================================================================================================
# The toy run, a reference run never interrupted, and helpers to start, watch and kill runs
# ==================================================================================================
@pytest.fixture(scope="module")
def toy(toy):
    """conftest.py's toy run, 6 steps, a checkpoint after each (add --out_dir)."""
    return toy + ["--max_steps", str(STEPS), "--save_every", "1"]


def command(args, out, fault="", torchrun=0):
    return trainer_command("train_ppo.py", [*args, "--out_dir", out], fault, torchrun)


STARTED = []  # every process group this file starts; none outlives its test (see the fixture below)


def start(args, out, fault="", torchrun=0, preexec_fn=None):
    """A training process in the background, in a process group of its own (torchrun and its workers
    go together); its stdout and stderr go to OUT.log (a pipe nobody reads would fill up and block
    it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "w") as log:
        process = subprocess.Popen(command(args, out, fault, torchrun), cwd=ROOT, env=ENV,
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                                   start_new_session=True)
    process.log_path = Path(f"{out}.log")
    STARTED.append(process)
    return process


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    while STARTED:
        process = STARTED.pop()
        try:
            # the group: a failed test may leave torchrun's workers running
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def finish(process, timeout=120) -> tuple[int, str]:
    """Wait for the process; (exit code, everything it printed)."""
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n"
                             f"{process.log_path.read_text()[-3000:]}") from None
    return rc, process.log_path.read_text()


def train(args, out, fault="", rc=0, **kw) -> str:
    """Run to the end; check the exit code; return the output."""
    got, text = finish(start(args, out, fault, **kw))
    assert got == rc, f"exit {got}, expected {rc}\n{text[-3000:]}"
    return text


def wait_until(cond, process, timeout=120, poll=0.005):
    t0 = time.time()
    while not cond():
        if process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before the moment "
                                 f"to inject the fault:\n{process.log_path.read_text()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting:\n{process.log_path.read_text()[-3000:]}")
        time.sleep(poll)


def n_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def metrics(out) -> list:
    """metrics.jsonl without its wall-clock fields, as comparable strings (NaN == NaN here)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    wall_clock = ("time_", "tokens_per_s")
    return [json.dumps({k: v for k, v in row.items() if not k.startswith(wall_clock)},
                       sort_keys=True)
            for row in rows]


def rollouts(out) -> list:
    return (out / "rollouts.jsonl").read_text().splitlines()


def steps_of(out) -> list:
    return [int(p.name[len("step_"):]) for p in checkpoint.list_checkpoints(out / "checkpoints")]


def leftovers(out) -> list:
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if not checkpoint.STEP_RE.match(p.name))


def assert_clean_exit_message(text: str, *words):
    """A message the user can act on, not a Python traceback from deep inside."""
    assert "Traceback" not in text, text[-3000:]
    for word in words:
        assert word in text, (word, text[-3000:])


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    """The run never interrupted (every checkpoint kept): what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(toy + ["--keep_last", "0"], out)
    assert len(metrics(out)) == STEPS and steps_of(out) == list(range(1, STEPS + 1))
    return out


def assert_same_run(out, reference):
    assert metrics(out) == metrics(reference)
    # every step logged exactly once, nothing lost or doubled
    assert rollouts(out) == rollouts(reference)


# ==================================================================================================
# 1. SIGKILL: in the middle of a step, in the middle of a checkpoint write
# ==================================================================================================
@pytest.mark.slow
def test_sigkill_mid_step_resumes_exactly(toy, reference, tmp_path):
    out = tmp_path / "run"
    # checkpoints at steps 2, 4, 6: step 3's line appears, step 4 begins
    args = toy + ["--save_every", "2"]
    process = start(args, out)
    wait_until(lambda: n_lines(out / "metrics.jsonl") >= 3, process)
    process.kill()
    finish(process)
    last = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    # killed in step 4 (almost always) or, on a slow machine, just after it
    assert steps_of(out)[-1] in (2, 4)
    assert checkpoint.verify(last) == [] and model.load_policy(str(last / "policy"))[0] is not None
    # A kill in the middle of writing rollouts.jsonl (thousands of lines a step, written in 8 KB
    # chunks) leaves half a line, maybe half a UTF-8 character: resume must drop it, not choke.
    with open(out / "rollouts.jsonl", "ab") as f:
        f.write('{"step": 5, "id": "q1", "response": "caf\u00e9'.encode()[:-1])
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "reward": 0.2')
    text = train(args + ["--resume"], out)
    assert f"resuming from {last}" in text
    assert_same_run(out, reference)
    assert steps_of(out) == [2, 4, 6]  # keep_last 3


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_leaves_the_previous_one_sound(toy, reference, tmp_path):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    # slow_save@3: step 3's checkpoint waits 60 s, fully written in its .tmp- folder, unpublished
    process = start(toy, out, fault="slow_save@3")
    wait_until(lambda: any(checkpoints.glob("step_000003.tmp-*/optim/critic.json")), process)
    process.kill()
    finish(process)
    assert steps_of(out) == [1, 2] and leftovers(out)[0].startswith("step_000003.tmp-")
    assert checkpoint.verify(checkpoints / "step_000002") == []
    # the .tmp- is ignored
    assert checkpoint.find_resumable(checkpoints) == checkpoints / "step_000002"
    text = train(toy + ["--resume"], out)
    assert f"resuming from {checkpoints / 'step_000002'}" in text
    assert_same_run(out, reference)
    assert leftovers(out) == []  # the next save removed it


# ==================================================================================================
# 2. SIGTERM and Ctrl-C: finish the step, save, say so, exit 0
# ==================================================================================================
@pytest.mark.slow
def test_sigterm_ctrl_c_and_a_second_ctrl_c_then_resume_exactly(toy, reference, tmp_path):
    out = tmp_path / "run"
    # no periodic checkpoints: only the stop (and the end) save one
    args = toy + ["--save_every", "100"]
    for sig, resume in ((signal.SIGTERM, []), (signal.SIGINT, ["--resume"])):
        before = n_lines(out / "metrics.jsonl")
        process = start(args + resume, out)
        # a step of this process is done
        wait_until(lambda: n_lines(out / "metrics.jsonl") > before, process)
        process.send_signal(sig)
        rc, text = finish(process)
        step = n_lines(out / "metrics.jsonl")
        assert rc == 0, text[-3000:]
        assert step < STEPS, "the run ended before the signal: nothing was tested"
        assert steps_of(out)[-1] == step
        assert checkpoint.verify(checkpoint.list_checkpoints(out / "checkpoints")[-1]) == []
        assert_clean_exit_message(text, f"stopped by {sig.name} after step {step}; checkpoint "
                                        f"{out}/checkpoints/step_{step:06d} written; "
                                        "continue with --resume")
    # An impatient second Ctrl-C stops at once, here in the middle of the next checkpoint write
    # (held open 60 s by slow_save): no waiting, and what it leaves behind is a .tmp- folder,
    # nothing worse.
    unpublished = f"step_{step + 1:06d}.tmp-*/optim/critic.json"
    process = start(args + ["--resume", "--save_every", "1"], out, fault=f"slow_save@{step + 1}")
    wait_until(lambda: any((out / "checkpoints").glob(unpublished)), process)
    t0 = time.time()
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    rc, text = finish(process)
    assert rc != 0 and "KeyboardInterrupt" in text and time.time() - t0 < 10
    assert steps_of(out)[-1] == step and leftovers(out)[0].startswith(f"step_{step + 1:06d}.tmp-")
    train(args + ["--resume"], out)
    assert_same_run(out, reference)
    assert leftovers(out) == []


# ==================================================================================================
# 3. Non-finite reward, loss, gradient
# ==================================================================================================
def all_tensors(folder: Path):
    """Every tensor a checkpoint holds: both models' weights and the optimizer's state (all of them
    safetensors files)."""
    from safetensors.torch import load_file
    for path in sorted(folder.rglob("*.safetensors")):
        yield from ((f"{path.relative_to(folder)}:{k}", v) for k, v in load_file(path).items())


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_the_run(toy, tmp_path):
    out = tmp_path / "run"
    # step 2: NaN reward; step 3 fine (resets the count);
    # steps 4, 5, 6: NaN loss, reward, loss, 3 in a row
    text = train(toy + ["--keep_last", "0", "--max_nonfinite_steps", "3"], out, rc=1,
                 fault="nan_reward@2,nan_loss@4,nan_reward@5,nan_loss@6")
    assert_clean_exit_message(text, "step 2: update skipped (non-finite reward)",
                              "step 4: update skipped (4 non-finite gradient(s))",
                              "step 6: 3 steps in a row skipped for non-finite rewards, losses "
                              "or gradients (--max_nonfinite_steps 3); stopping")
    logged = {m["step"]: m for m in map(json.loads, metrics(out))}
    assert [s for s, m in logged.items() if "skipped" in m] == [2, 4, 5, 6]
    assert logged[2]["skipped"] == "non-finite reward" and "nonfinite_updates" not in logged[2]
    # 2 minibatches x 2 PPO epochs, no optimizer step taken
    assert logged[4]["nonfinite_updates"] == 4
    assert steps_of(out) == [1, 2, 3, 4, 5]  # step 6 stopped the run before its checkpoint
    weights = {}
    for folder in checkpoint.list_checkpoints(out / "checkpoints"):
        tensors = dict(all_tensors(folder))
        assert len(tensors) > 40 and any(k.startswith("optim/") for k in tensors)
        bad = [k for k, t in tensors.items()
               if t.is_floating_point() and not torch.isfinite(t).all()]
        assert bad == [], (folder, bad)
        weights[int(folder.name[5:])] = {k: t for k, t in tensors.items() if ".safetensors:" in k}

    def same_weights(step, other_step):
        return all(torch.equal(weights[step][k], weights[other_step][k]) for k in weights[step])

    # a skipped step leaves the weights exactly as they were
    assert same_weights(1, 2)
    assert same_weights(3, 4)
    assert same_weights(4, 5)
    assert not same_weights(2, 3)  # and a normal step does change them


# ==================================================================================================
# 4. A file-size limit: a clear error, the previous checkpoint intact
# ==================================================================================================
@pytest.mark.slow
def test_checkpoint_write_failure_on_the_command_line(toy, reference, tmp_path):
    """The run resumes from step 6, trains step 7, and cannot write its checkpoint: the kernel
    refuses to grow any file past 90% of a model file's size (RLIMIT_FSIZE), which the logs stay
    below. One clear line, exit 1."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    model_file = out / "checkpoints" / f"step_{STEPS:06d}" / "policy" / "model.safetensors"
    limit = int(0.9 * model_file.stat().st_size)
    # else the logs would hit the limit first
    assert (out / "rollouts.jsonl").stat().st_size * (STEPS + 2) / STEPS < limit

    def limit_file_size():  # in the child, before exec: EFBIG instead of the default SIGXFSZ kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    text = train(toy + ["--resume", "--max_steps", "7"], out, rc=1, preexec_fn=limit_file_size)
    assert_clean_exit_message(text, "error: could not write checkpoint "
                                    f"{out}/checkpoints/step_000007: ",
                              "File too large", "the previous checkpoints are intact")
    assert steps_of(out)[-1] == 6 and checkpoint.verify(out / "checkpoints" / "step_000006") == []
    assert leftovers(out) == []


# ==================================================================================================
# 5. Malformed data: the same one-line message from data.load_mcqa and from the command line
# ==================================================================================================
GOOD = {"id": "q0", "question": "Pick A", "options": {"A": "x", "B": "y", "C": "z", "D": "w"},
        "answer": "A"}


def line(**change) -> str:
    return json.dumps({k: v for k, v in {**GOOD, **change}.items() if v is not None}) + "\n"


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
# two records, the second's JSON escape \u00e9 turned into the character's Latin-1 byte
LATIN_1 = (line() + line(id="q1", question="Caf\u00e9?")).encode().replace(b"\\u00e9", b"\xe9")

# name: (file name, bytes, line the message names, words it must hold)
BAD_DATA = {
    "truncated JSON line": ("t.jsonl", (line() + line(id="q1")[:45]).encode(), 2,
                            ["malformed JSON"]),
    "wrong type": ("t.jsonl", (line() + line(id="q1", question=["Pick", "A"])).encode(), 2,
                   ["field 'question' should be str, got list"]),
    "missing options": ("t.jsonl", (line() + line(id="q1", options=None)).encode(), 2,
                        ["missing field 'options'"]),
    "gold letter outside the options": ("t.jsonl", (line() + line(id="q1", answer="E")).encode(), 2,
                                        ["gold answer 'E' is not among the options ABCD"]),
    "empty file": ("t.jsonl", b"", 1, ["file is empty"]),
    "binary garbage (a PNG)": ("t.jsonl", PNG, 1, ["not UTF-8 text (byte 0x89)"]),
    "non-UTF-8 bytes (Latin-1)": ("t.jsonl", LATIN_1, 2, ["not UTF-8 text (byte 0xe9)"]),
    "CSV row with too few columns": ("anatomy_test.csv", b"Pick A,x,y,z,w,A\nPick B,x,y\n", 2,
                                     ["CSV row has 3 columns, expected 6"]),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_message_from_load_mcqa_and_the_command_line(case, toy, tmp_path):
    name, content, lineno, words = BAD_DATA[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(data.DataError) as err:
        data.load_mcqa(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{lineno}: "), message
    assert all(word in message for word in words), message
    # the command line, in this process: SystemExit with the message (exit code 1), nothing else
    with pytest.raises(SystemExit) as stop:
        train_ppo.cli(toy + ["--train_data", str(path), "--out_dir", str(tmp_path / "run")])
    assert stop.value.code == f"error: {err.value}"
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_a_missing_data_file_is_named():
    with pytest.raises(SystemExit,
                       match="error: /nowhere/train.jsonl: no such file, and not a dataset name"):
        train_ppo.cli(["--preset", "smoke", "--model", "tiny-qwen2",
                       "--train_data", "/nowhere/train.jsonl"])


@pytest.mark.slow
def test_bad_data_on_the_real_command_line_prints_one_line(toy, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(BAD_DATA["truncated JSON line"][1])
    process = subprocess.run(command(toy + ["--train_data", str(path)], tmp_path / "run"),
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1
    assert process.stderr.splitlines()[-1].startswith(f"error: {path}:2: malformed JSON")
    assert_clean_exit_message(process.stderr)


# ==================================================================================================
# 6. torchrun: a rank that raises, a rank SIGKILLed: the whole job ends, quickly, every process gone
# ==================================================================================================
def workers(launcher_pid: int) -> dict:
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    for pid in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        try:
            variables = Path(f"/proc/{pid}/environ").read_text().split("\0")
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in variables if "=" in kv)
        if "RANK" in env:
            found[int(env["RANK"])] = int(pid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "sigkill", "sigstop"])
def test_torchrun_a_failing_rank_ends_the_job(how, toy, tmp_path):
    """raise: rank 1 raises at step 2; sigkill: rank 1 dies hard; sigstop: rank 1 hangs (stopped),
    so nothing tells the others but --collective_timeout_s: rank 0 must give up after it, not wait
    forever."""
    out = tmp_path / "run"
    timeout = 10 if how == "sigstop" else 20
    process = start(toy + ["--collective_timeout_s", str(timeout)], out, torchrun=2,
                    fault="raise@2:1" if how == "raise" else "")
    # step 1 saved
    wait_until(lambda: (out / "checkpoints" / "step_000001").is_dir(), process, timeout=240)
    ranks = workers(process.pid)
    assert sorted(ranks) == [0, 1]
    t0 = time.time()
    if how == "sigkill":
        os.kill(ranks[1], signal.SIGKILL)
    if how == "sigstop":
        os.kill(ranks[1], signal.SIGSTOP)
        while alive(ranks[0]) and time.time() - t0 < timeout + 60:
            time.sleep(0.05)
        waited = time.time() - t0
        # let torchrun's SIGTERM reach it (a stopped process only obeys SIGKILL)
        os.kill(ranks[1], signal.SIGCONT)
        # Generous upper margins: a loaded machine with few cores is slow to tear processes down,
        # and a real hang lasts minutes.
        late = f"rank 0 ended {waited:.1f} s after its peer hung"
        assert timeout - 1 < waited < timeout + 45, late
    rc, text = finish(process, timeout=120)
    assert rc != 0, text[-3000:]
    assert time.time() - t0 < timeout + 60, "the job outlived the collective timeout by a minute"
    assert not any(alive(pid) for pid in ranks.values())
    said = {"raise": "injected fault at step 2 on rank 1",
            "sigkill": "Signal 9 (SIGKILL) received by PID",
            "sigstop": f"Timed out waiting {timeout * 1000}ms"}[how]
    assert said in text, text[-3000:]
    assert steps_of(out)[0] == 1
    saved = checkpoint.list_checkpoints(out / "checkpoints")
    assert all(checkpoint.verify(folder) == [] for folder in saved)


@pytest.mark.slow
def test_torchrun_sigterm_stops_every_rank_after_a_checkpoint(toy, tmp_path):
    """A cluster's preemption notice: SIGTERM to torchrun, which passes it on to every worker and
    SIGKILLs them 30 s later. Each rank finishes the step in flight, together they write the
    checkpoint, and exit."""
    out = tmp_path / "run"
    process = start(toy + ["--save_every", "100"], out, torchrun=2)
    wait_until(lambda: n_lines(out / "metrics.jsonl") >= 1, process, timeout=240)
    ranks = workers(process.pid)
    t0 = time.time()
    process.send_signal(signal.SIGTERM)
    rc, text = finish(process)
    step = n_lines(out / "metrics.jsonl")
    assert rc != 0 and time.time() - t0 < 30  # torchrun itself reports the signal as a failure
    assert step < STEPS and steps_of(out) == [step]
    assert checkpoint.verify(out / "checkpoints" / f"step_{step:06d}") == []
    stopped = (f"stopped by SIGTERM after step {step}; checkpoint "
               f"{out}/checkpoints/step_{step:06d} written")
    assert stopped in text
    assert not any(alive(pid) for pid in ranks.values())


# ==================================================================================================
# 7. The manifest: a corrupted checkpoint is refused, or skipped when asked
# ==================================================================================================
@pytest.mark.slow
def test_corrupted_checkpoint_refused_then_fallback_resumes_exactly(toy, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    bad = out / "checkpoints" / f"step_{STEPS:06d}" / "policy" / "model.safetensors"
    blob = bytearray(bad.read_bytes())
    middle = slice(len(blob) // 2, len(blob) // 2 + 8)
    blob[middle] = bytes(byte ^ 0xFF for byte in blob[middle])
    bad.write_bytes(bytes(blob))  # same size: only the checksum can tell
    logged = (out / "metrics.jsonl").read_bytes()

    # the command line, in this process (exit code 1, no traceback)
    with pytest.raises(SystemExit) as stop:
        train_ppo.cli(toy + ["--resume", "--out_dir", str(out)])
    refusal = stop.value.code
    assert str(refusal).startswith(f"error: checkpoint {bad.parent.parent} failed verification:\n")
    assert f"{bad}: sha256 differs from the manifest (corrupted)" in refusal
    assert "rerun with --resume_fallback" in refusal
    assert (out / "metrics.jsonl").read_bytes() == logged  # a refused resume touches nothing

    text = train(toy + ["--resume", "--resume_fallback"], out)
    assert "falling back to the previous checkpoint" in text
    assert f"resuming from {out / 'checkpoints' / f'step_{STEPS - 1:06d}'}" in text
    assert_same_run(out, reference)
    assert checkpoint.verify(bad.parent.parent) == []  # step 6 written again, sound
