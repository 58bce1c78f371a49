"""Faults injected for real (issue 7): what a long run on a shared machine meets, and that nothing is lost.

  1. SIGKILL in the middle of a step and in the middle of a checkpoint write: the last complete checkpoint
     passes its manifest check, `--resume` continues from it, and the resumed run logs exactly the metrics
     (and rollouts) of a run never killed; half-written log lines and leftover folders are dropped;
  2. SIGTERM and Ctrl-C: the step in flight finishes, a checkpoint is written, exit code 0 with a message
     (a second Ctrl-C stops at once);
  3. a non-finite reward, loss or gradient (MEDRLVR_FAULT): the step is skipped and logged; too many in a
     row stop the run with an error, and no checkpoint ever holds a non-finite tensor;
  4. a disk that fills, a read-only folder, a file-size limit: a one-line error naming the checkpoint
     folder, the previous checkpoint untouched;
  5. malformed data files, through data.load_mcqa and through the train_ppo.py command line;
  6. under torchrun: a rank that raises, dies or hangs ends the whole job, within the collective timeout;
     SIGTERM to torchrun stops every rank after a checkpoint;
  7. a corrupted checkpoint: `--resume` refuses naming the file, `--resume_fallback` steps back one.
The verifier fed hostile strings (odd gold labels and option tables, tags split by whitespace, any short
pattern repeated into a long response) is at the end of tests/test_verifier.py.

Training runs are subprocesses on the toy task of tests/test_train_ppo.py (a 12-token model, 6 steps of
32 samples, ~1 s of compute a run) with OMP_NUM_THREADS=1, which makes them deterministic on CPU, so
"equal" below means equal, not close. CI runs as root, where chmod does not stop a write: the full and
read-only disks are real tmpfs mounts (skipped where mounting is not allowed), and the command-line disk
test uses RLIMIT_FSIZE, which the kernel enforces for root too.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint as C
import data
import model as M
import model_zoo
import train_ppo

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MEDRLVR_FAULT": ""}
STEPS = 6


# =========================================================================================================
# The toy run, a reference run never interrupted, and helpers to start, watch and kill training processes
# =========================================================================================================
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Command-line flags of a 6-step toy run (the output folder is added per run)."""
    d = tmp_path_factory.mktemp("toy")
    m, tok = model_zoo.load_tiny(chars="ABCD:", seed=0)
    M.save_model(m, tok, d / "tiny")
    recs = [{"id": f"q{i}", "question": f"Pick {'ABCD'[i % 4]}", "options": {"A": "x", "B": "y", "C": "z", "D": "w"},
             "answer": "ABCD"[i % 4], "source": "toy", "meta": {}} for i in range(16)]
    (d / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ["--preset", "smoke", "--model", str(d / "tiny"), "--train_data", str(d / "toy.jsonl"),
            "--prompt_style", "direct", "--prefill", "<think></think><answer>", "--rollout_batch_size", "8",
            "--n_samples_per_prompt", "4", "--train_batch_size", "16", "--micro_batch_size", "4",
            "--max_new_tokens", "4", "--actor_lr", "3e-3", "--critic_lr", "3e-3", "--ppo_epochs", "2",
            "--max_steps", str(STEPS), "--save_every", "1"]


def command(args, out, torchrun=0):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return [*launcher, str(ROOT / "train_ppo.py"), *args, "--out_dir", str(out)]


STARTED = []  # every process group this file starts; none outlives its test (see the fixture below)


def start(args, out, fault="", torchrun=0, preexec_fn=None):
    """A training process in the background, in a process group of its own (torchrun and its workers go
    together); its stdout and stderr go to OUT.log (a pipe nobody reads would fill up and block it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "w") as log:
        p = subprocess.Popen(command(args, out, torchrun), cwd=ROOT, env={**ENV, "MEDRLVR_FAULT": fault},
                             stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn, start_new_session=True)
    p.log_path = Path(f"{out}.log")
    STARTED.append(p)
    return p


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    while STARTED:
        p = STARTED.pop()
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group: a failed test may leave torchrun's workers running
        except ProcessLookupError:
            pass
        p.wait()


def finish(p, timeout=120) -> tuple[int, str]:
    """Wait for the process; (exit code, everything it printed)."""
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{p.log_path.read_text()[-3000:]}") from None
    return rc, p.log_path.read_text()


def train(args, out, fault="", rc=0, **kw) -> str:
    """Run to the end; check the exit code; return the output."""
    got, text = finish(start(args, out, fault, **kw))
    assert got == rc, f"exit {got}, expected {rc}\n{text[-3000:]}"
    return text


def wait_until(cond, p, timeout=120, poll=0.005):
    t0 = time.time()
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"the process ended (exit {p.returncode}) before the moment to inject the fault:\n"
                                 f"{p.log_path.read_text()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting:\n{p.log_path.read_text()[-3000:]}")
        time.sleep(poll)


def n_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def metrics(out) -> list:
    """metrics.jsonl without its wall-clock fields, as comparable strings (NaN == NaN here)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [json.dumps({k: v for k, v in m.items() if not k.startswith(("time_", "tokens_per_s"))}, sort_keys=True)
            for m in rows]


def rollouts(out) -> list:
    return (out / "rollouts.jsonl").read_text().splitlines()


def steps_of(out) -> list:
    return [int(p.name[len("step_"):]) for p in C.list_checkpoints(out / "checkpoints")]


def leftovers(out) -> list:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if not C.STEP_RE.match(p.name))


def assert_clean_exit_message(text: str, *words):
    """A message the user can act on, not a Python traceback from deep inside."""
    assert "Traceback" not in text, text[-3000:]
    for w in words:
        assert w in text, (w, text[-3000:])


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    """The run never interrupted (every checkpoint kept): what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(toy + ["--keep_last", "0"], out)
    assert len(metrics(out)) == STEPS and steps_of(out) == list(range(1, STEPS + 1))
    return out


def assert_same_run(out, reference):
    assert metrics(out) == metrics(reference)
    assert rollouts(out) == rollouts(reference)  # every step logged exactly once, nothing lost or doubled


# =========================================================================================================
# 1. SIGKILL: in the middle of a step, in the middle of a checkpoint write
# =========================================================================================================
@pytest.mark.slow
def test_sigkill_mid_step_resumes_exactly(toy, reference, tmp_path):
    out = tmp_path / "run"
    args = toy + ["--save_every", "2"]  # checkpoints at steps 2, 4, 6: step 3's line appears, step 4 begins
    p = start(args, out)
    wait_until(lambda: n_lines(out / "metrics.jsonl") >= 3, p)
    p.kill()
    finish(p)
    last = C.list_checkpoints(out / "checkpoints")[-1]
    assert steps_of(out)[-1] in (2, 4)  # killed in step 4 (almost always) or, on a slow machine, just after it
    assert C.verify(last) == [] and M.load_policy(str(last / "policy"))[0] is not None
    # A kill in the middle of writing rollouts.jsonl (thousands of lines a step, written in 8 KB chunks)
    # leaves half a line, possibly half a UTF-8 character: resume must drop it, not choke on it.
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
    # slow_save@3: step 3's checkpoint, fully written into its .tmp- folder but not yet published, waits 60 s
    p = start(toy, out, fault="slow_save@3")
    wait_until(lambda: any((out / "checkpoints").glob("step_000003.tmp-*/optim/.metadata")), p)
    p.kill()
    finish(p)
    assert steps_of(out) == [1, 2] and leftovers(out)[0].startswith("step_000003.tmp-")
    assert C.verify(out / "checkpoints" / "step_000002") == []
    assert C.find_resumable(out / "checkpoints") == out / "checkpoints" / "step_000002"  # the .tmp- is ignored
    text = train(toy + ["--resume"], out)
    assert f"resuming from {out / 'checkpoints' / 'step_000002'}" in text
    assert_same_run(out, reference)
    assert leftovers(out) == []  # the next save removed it


# =========================================================================================================
# 2. SIGTERM and Ctrl-C: finish the step, save, say so, exit 0
# =========================================================================================================
@pytest.mark.slow
def test_sigterm_ctrl_c_and_a_second_ctrl_c_then_resume_exactly(toy, reference, tmp_path):
    out = tmp_path / "run"
    args = toy + ["--save_every", "100"]  # no periodic checkpoints: only the stop (and the end) save one
    for sig, resume in ((signal.SIGTERM, []), (signal.SIGINT, ["--resume"])):
        before = n_lines(out / "metrics.jsonl")
        p = start(args + resume, out)
        wait_until(lambda: n_lines(out / "metrics.jsonl") > before, p)  # a step of this process is done
        p.send_signal(sig)
        rc, text = finish(p)
        step = n_lines(out / "metrics.jsonl")
        assert rc == 0, text[-3000:]
        assert step < STEPS, "the run ended before the signal: nothing was tested"
        assert steps_of(out)[-1] == step and C.verify(C.list_checkpoints(out / "checkpoints")[-1]) == []
        assert_clean_exit_message(text, f"stopped by {sig.name} after step {step}; checkpoint "
                                        f"{out}/checkpoints/step_{step:06d} written; continue with --resume")
    # An impatient second Ctrl-C stops at once, here in the middle of the next checkpoint write (held open
    # 60 s by slow_save): no waiting, and what it leaves behind is a .tmp- folder, nothing worse.
    p = start(args + ["--resume", "--save_every", "1"], out, fault=f"slow_save@{step + 1}")
    wait_until(lambda: any((out / "checkpoints").glob(f"step_{step + 1:06d}.tmp-*/optim/.metadata")), p)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    rc, text = finish(p)
    assert rc != 0 and "KeyboardInterrupt" in text and time.time() - t0 < 10
    assert steps_of(out)[-1] == step and leftovers(out)[0].startswith(f"step_{step + 1:06d}.tmp-")
    train(args + ["--resume"], out)
    assert_same_run(out, reference)
    assert leftovers(out) == []


# =========================================================================================================
# 3. Non-finite reward, loss, gradient
# =========================================================================================================
def all_tensors(folder: Path):
    """Every tensor a checkpoint holds: both models' weights and the optimizer's state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    for f in sorted(folder.rglob("*.safetensors")):
        yield from ((f"{f.relative_to(folder)}:{k}", v) for k, v in load_file(f).items())
    flat = folder.parent.parent / f"{folder.name}-optim.pt"  # beside checkpoints/, not in it
    dcp_to_torch_save(folder / "optim", flat)
    stack = [("optim", torch.load(flat, weights_only=False))]
    while stack:
        name, obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            yield name, obj
        elif isinstance(obj, dict):
            stack += [(f"{name}.{k}", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            stack += [(f"{name}.{i}", v) for i, v in enumerate(obj)]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_the_run(toy, tmp_path):
    out = tmp_path / "run"
    # step 2: NaN reward; step 3 fine (resets the count); steps 4, 5, 6 NaN loss / reward / loss: 3 in a row
    text = train(toy + ["--keep_last", "0", "--max_nonfinite_steps", "3"], out, rc=1,
                 fault="nan_reward@2,nan_loss@4,nan_reward@5,nan_loss@6")
    assert_clean_exit_message(text, "step 2: update skipped (non-finite reward)",
                              "step 4: update skipped (4 non-finite gradient(s))",
                              "step 6: 3 steps in a row skipped for non-finite rewards, losses or gradients "
                              "(--max_nonfinite_steps 3); stopping")
    logged = {m["step"]: m for m in map(json.loads, metrics(out))}
    assert [s for s, m in logged.items() if "skipped" in m] == [2, 4, 5, 6]
    assert logged[2]["skipped"] == "non-finite reward" and "nonfinite_updates" not in logged[2]
    assert logged[4]["nonfinite_updates"] == 4  # 2 minibatches x 2 PPO epochs, no optimizer step taken
    assert steps_of(out) == [1, 2, 3, 4, 5]  # step 6 stopped the run before its checkpoint
    weights = {}
    for folder in C.list_checkpoints(out / "checkpoints"):
        tensors = dict(all_tensors(folder))
        assert len(tensors) > 40 and any(k.startswith("optim.") for k in tensors)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert bad == [], (folder, bad)
        weights[int(folder.name[5:])] = {k: t for k, t in tensors.items() if ".safetensors:" in k}
    same = lambda a, b: all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])  # noqa: E731
    assert same(1, 2) and same(3, 4) and same(4, 5)  # a skipped step leaves the weights exactly as they were
    assert not same(2, 3)  # and a normal step does change them


def tiny_training_state():
    m, tok = model_zoo.load_tiny(chars="ABCD:", seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    return {"policy": m}, {"policy": opt}, {"policy": sched}, tok


def save(root, step, state):
    models, opts, scheds, tok = state
    C.save_training(root, step, models, opts, scheds, tok, {"note": "test"}, {"kl_coef": 0.01})


def test_nonfinite_weights_are_never_written(tmp_path):
    state = tiny_training_state()
    save(tmp_path, 1, state)
    with torch.no_grad():
        next(state[0]["policy"].parameters())[0, 0] = float("inf")
    with pytest.raises(C.CheckpointError, match="step 2: the weights hold NaN or inf; refusing"):
        save(tmp_path, 2, state)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"] and C.verify(tmp_path / "step_000001") == []


def test_leftovers_of_killed_saves_are_ignored_then_removed(tmp_path):
    """A kill mid-save leaves step_N.tmp-*; mid-replace of a step, step_N.old-*; mid-delete of an old step
    (keep_last), step_N.del-*. None of them is a checkpoint to resume from; the next save removes them all."""
    state = tiny_training_state()
    save(tmp_path, 1, state)
    for name in ("step_000002.tmp-0a1b2c3d", "step_000001.old-0a1b2c3d", "step_000000.del-0a1b2c3d"):
        shutil.copytree(tmp_path / "step_000001", tmp_path / name)  # complete-looking, manifest and all
    assert C.list_checkpoints(tmp_path) == [tmp_path / "step_000001"]
    assert C.find_resumable(tmp_path) == tmp_path / "step_000001"
    models, opts, scheds, tok = state
    C.save_training(tmp_path, 2, models, opts, scheds, tok, {}, {"kl_coef": 0.01}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]


# =========================================================================================================
# 4. A full disk, a read-only folder, a file-size limit: a clear error, the previous checkpoint intact
# =========================================================================================================
@pytest.mark.slow
def test_checkpoint_write_failure_on_the_command_line(toy, reference, tmp_path):
    """The run resumes from step 6, trains step 7, and cannot write its checkpoint: the kernel refuses to grow
    any file past 90% of a model file's size (RLIMIT_FSIZE), which the logs stay below. One clear line, exit 1."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    limit = int(0.9 * (out / "checkpoints" / f"step_{STEPS:06d}" / "policy" / "model.safetensors").stat().st_size)
    assert (out / "rollouts.jsonl").stat().st_size * (STEPS + 2) / STEPS < limit  # else the logs would hit it first

    def limit_file_size():  # in the child, before exec: EFBIG instead of the default SIGXFSZ kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    text = train(toy + ["--resume", "--max_steps", "7"], out, rc=1, preexec_fn=limit_file_size)
    assert_clean_exit_message(text, f"error: could not write checkpoint {out}/checkpoints/step_000007: ",
                              "File too large", "the previous checkpoints are intact")
    assert steps_of(out)[-1] == 6 and C.verify(out / "checkpoints" / "step_000006") == []
    assert leftovers(out) == []


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs mounted for the test (real ENOSPC and EROFS, for root too), unmounted after it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt, opts):
    subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)


def used_kb(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


@pytest.mark.parametrize("fault", ["full in the model files", "full in the optimizer shards", "read-only"])
def test_checkpoint_write_failure_keeps_the_previous_one(tmpfs, fault):
    state = tiny_training_state()
    save(tmpfs, 1, state)
    first = tmpfs / "step_000001"
    # room for 64 KB (the model file is ~300 KB), or for everything but the optimizer shards (~600 KB)
    all_but_optim_kb = sum(p.stat().st_size for p in first.rglob("*") if "optim" not in p.parts) // 1024
    free_kb = {"full in the model files": 64, "full in the optimizer shards": all_but_optim_kb + 100}.get(fault)
    remount(tmpfs, f"size={used_kb(tmpfs) + free_kb}k" if free_kb else "ro")
    with pytest.raises(C.CheckpointError) as err:
        save(tmpfs, 2, state)
    msg = str(err.value)
    assert msg.startswith(f"could not write checkpoint {tmpfs}/step_000002: ") and "\n" not in msg, msg
    assert {"full in the model files": "SafetensorError: Error while serializing: I/O error: No space left on device",
            "full in the optimizer shards": "No space left on device",
            "read-only": "Read-only file system"}[fault] in msg and "MiB free there" in msg
    if fault == "full in the optimizer shards":  # torch.distributed.checkpoint's error: a BaseException
        assert type(err.value.__cause__).__name__ == "CheckpointException"
    assert msg.endswith("the previous checkpoints are intact")
    remount(tmpfs, "rw")
    assert [p.name for p in tmpfs.iterdir()] == ["step_000001"] and C.verify(first) == []


def test_checkpoint_folder_that_is_a_file(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(C.CheckpointError, match=f"could not write checkpoint {tmp_path}/checkpoints/step_000001: "):
        save(tmp_path / "checkpoints", 1, tiny_training_state())


# =========================================================================================================
# 5. Malformed data: the same one-line message from data.load_mcqa and from the command line
# =========================================================================================================
GOOD = {"id": "q0", "question": "Pick A", "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer": "A"}


def line(**change) -> str:
    return json.dumps({k: v for k, v in {**GOOD, **change}.items() if v is not None}) + "\n"


# name: (file name, bytes, line the message names, words it must hold)
BAD_DATA = {
    "truncated JSON line": ("t.jsonl", (line() + line(id="q1")[:45]).encode(), 2, ["malformed JSON"]),
    "wrong type": ("t.jsonl", (line() + line(id="q1", question=["Pick", "A"])).encode(), 2,
                   ["field 'question' should be str, got list"]),
    "missing options": ("t.jsonl", (line() + line(id="q1", options=None)).encode(), 2, ["missing field 'options'"]),
    "gold letter outside the options": ("t.jsonl", (line() + line(id="q1", answer="E")).encode(), 2,
                                        ["gold answer 'E' is not among the options ABCD"]),
    "empty file": ("t.jsonl", b"", 1, ["file is empty"]),
    "binary garbage (a PNG)": ("t.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), 1,
                               ["not UTF-8 text (byte 0x89)"]),
    "non-UTF-8 bytes (Latin-1)": ("t.jsonl", (line() + line(id="q1", question="Caf\u00e9?")).encode()
                                  .replace(b"\\u00e9", b"\xe9"), 2, ["not UTF-8 text (byte 0xe9)"]),
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
    assert str(err.value).startswith(f"{path}:{lineno}: ") and all(w in str(err.value) for w in words), err.value
    # the command line, in this process: SystemExit with the message (exit code 1), no other exception
    with pytest.raises(SystemExit) as stop:
        train_ppo.cli(toy + ["--train_data", str(path), "--out_dir", str(tmp_path / "run")])
    assert stop.value.code == f"error: {err.value}"
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_a_missing_data_file_is_named():
    with pytest.raises(SystemExit, match="error: /nowhere/train.jsonl: no such file, and not a dataset name"):
        train_ppo.cli(["--preset", "smoke", "--model", "tiny-qwen2", "--train_data", "/nowhere/train.jsonl"])


@pytest.mark.slow
def test_bad_data_on_the_real_command_line_prints_one_line(toy, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(BAD_DATA["truncated JSON line"][1])
    p = subprocess.run(command(toy + ["--train_data", str(path)], tmp_path / "run"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.splitlines()[-1].startswith(f"error: {path}:2: malformed JSON")
    assert_clean_exit_message(p.stderr)


# =========================================================================================================
# 6. torchrun: a rank that raises, a rank SIGKILLed: the whole job ends, quickly, every process gone
# =========================================================================================================
def workers(launcher_pid: int) -> dict:
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    for pid in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(pid)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "sigkill", "sigstop"])
def test_torchrun_a_failing_rank_ends_the_job(how, toy, tmp_path):
    """raise: rank 1 raises at step 2; sigkill: rank 1 dies hard; sigstop: rank 1 hangs (stopped), so nothing
    tells the others but --collective_timeout_s: rank 0 must give up after it, not wait forever."""
    out, timeout = tmp_path / "run", (10 if how == "sigstop" else 20)
    p = start(toy + ["--collective_timeout_s", str(timeout)], out, torchrun=2,
              fault="raise@2:1" if how == "raise" else "")
    wait_until(lambda: (out / "checkpoints" / "step_000001").is_dir(), p, timeout=240)  # step 1 saved
    ranks = workers(p.pid)
    assert sorted(ranks) == [0, 1]
    t0 = time.time()
    if how == "sigkill":
        os.kill(ranks[1], signal.SIGKILL)
    if how == "sigstop":
        os.kill(ranks[1], signal.SIGSTOP)
        while alive(ranks[0]) and time.time() - t0 < timeout + 60:
            time.sleep(0.05)
        waited = time.time() - t0
        os.kill(ranks[1], signal.SIGCONT)  # let torchrun's SIGTERM reach it (a stopped process only obeys SIGKILL)
        # generous upper margins: a loaded 2-core machine is slow to tear processes down; a hang is minutes
        assert timeout - 1 < waited < timeout + 45, f"rank 0 ended {waited:.1f} s after its peer hung"
    rc, text = finish(p, timeout=120)
    assert rc != 0, text[-3000:]
    assert time.time() - t0 < timeout + 60, "the job outlived the collective timeout by a minute"
    assert not any(alive(pid) for pid in ranks.values())
    said = {"raise": "injected fault at step 2 on rank 1", "sigkill": "Signal 9 (SIGKILL) received by PID",
            "sigstop": f"Timed out waiting {timeout * 1000}ms"}[how]
    assert said in text, text[-3000:]
    assert steps_of(out)[0] == 1 and all(C.verify(ck) == [] for ck in C.list_checkpoints(out / "checkpoints"))


@pytest.mark.slow
def test_torchrun_sigterm_stops_every_rank_after_a_checkpoint(toy, tmp_path):
    """A cluster's preemption notice: SIGTERM to torchrun, which passes it on to every worker and SIGKILLs
    them 30 s later. Each rank finishes the step in flight, together they write the checkpoint, and exit."""
    out = tmp_path / "run"
    p = start(toy + ["--save_every", "100"], out, torchrun=2)
    wait_until(lambda: n_lines(out / "metrics.jsonl") >= 1, p, timeout=240)
    ranks = workers(p.pid)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    rc, text = finish(p)
    step = n_lines(out / "metrics.jsonl")
    assert rc != 0 and time.time() - t0 < 30  # torchrun itself reports the signal as a failure
    assert step < STEPS and steps_of(out) == [step] and C.verify(out / "checkpoints" / f"step_{step:06d}") == []
    assert f"stopped by SIGTERM after step {step}; checkpoint {out}/checkpoints/step_{step:06d} written" in text
    assert not any(alive(pid) for pid in ranks.values())


# =========================================================================================================
# 7. The manifest: a corrupted checkpoint is refused, or skipped when asked
# =========================================================================================================
@pytest.mark.slow
def test_corrupted_checkpoint_refused_then_fallback_resumes_exactly(toy, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    bad = out / "checkpoints" / f"step_{STEPS:06d}" / "policy" / "model.safetensors"
    blob = bytearray(bad.read_bytes())
    blob[len(blob) // 2:len(blob) // 2 + 8] = bytes(b ^ 0xFF for b in blob[len(blob) // 2:len(blob) // 2 + 8])
    bad.write_bytes(bytes(blob))  # same size: only the checksum can tell
    logged = (out / "metrics.jsonl").read_bytes()

    with pytest.raises(SystemExit) as stop:  # the command line, in this process (exit code 1, no traceback)
        train_ppo.cli(toy + ["--resume", "--out_dir", str(out)])
    assert str(stop.value.code).startswith(f"error: checkpoint {bad.parent.parent} failed verification:\n")
    assert f"{bad}: sha256 differs from the manifest (corrupted)" in stop.value.code
    assert "rerun with --resume_fallback" in stop.value.code
    assert (out / "metrics.jsonl").read_bytes() == logged  # a refused resume touches nothing

    text = train(toy + ["--resume", "--resume_fallback"], out)
    assert "falling back to the previous checkpoint" in text
    assert f"resuming from {out / 'checkpoints' / f'step_{STEPS - 1:06d}'}" in text
    assert_same_run(out, reference)
    assert C.verify(bad.parent.parent) == []  # step 6 written again, sound


def _flip(p):
    b = bytearray(p.read_bytes())
    b[-1] ^= 1
    p.write_bytes(bytes(b))


CORRUPTIONS = {  # what happens to the newest checkpoint -> the words verify() must say
    "a flipped bit in the optimizer shard": (lambda ck: _flip(ck / "optim" / "__0_0.distcp"), "__0_0.distcp: sha256 differs"),
    "a truncated model file": (lambda ck: os.truncate(ck / "policy" / "model.safetensors", 100), "model.safetensors: 100 bytes"),
    "a deleted file": (lambda ck: (ck / "trainer_state.json").unlink(), "trainer_state.json: missing"),
    "no manifest": (lambda ck: (ck / "MANIFEST.json").unlink(), "MANIFEST.json: missing"),
    "a manifest cut short": (lambda ck: os.truncate(ck / "MANIFEST.json", 50), "MANIFEST.json: unreadable"),
    "a manifest of the wrong shape": (lambda ck: (ck / "MANIFEST.json").write_text('{"files": {"rng.pt": 3}}'),
                                      "MANIFEST.json: unreadable"),
    "a manifest that is a list": (lambda ck: (ck / "MANIFEST.json").write_text("[1, 2]"), "MANIFEST.json: unreadable"),
    "a manifest listing nothing": (lambda ck: (ck / "MANIFEST.json").write_text('{"files": {}}'), "lists no files"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("two") / "checkpoints"
    state = tiny_training_state()
    save(root, 1, state)
    save(root, 2, state)
    return root


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_find_resumable_detects_each_corruption(case, two_checkpoints, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, root)
    corrupt, words = CORRUPTIONS[case]
    corrupt(root / "step_000002")
    problems = C.verify(root / "step_000002")
    assert len(problems) == 1 and words in problems[0], problems
    with pytest.raises(C.CheckpointError, match="failed verification"):
        C.find_resumable(root)
    said = []
    assert C.find_resumable(root, fallback=True, log=said.append) == root / "step_000001"
    assert words in said[0]
    corrupt(root / "step_000001")
    with pytest.raises(C.CheckpointError, match="no checkpoint under .* passes verification"):
        C.find_resumable(root, fallback=True, log=said.append)

