"""--report_to (tracking.py): what TensorBoard and W&B receive is exactly what metrics.jsonl and
eval.jsonl hold, read back from what each backend wrote to disk; a crash, a resume and a Ctrl-C
leave each backend's run complete and closed; a missing package stops the run on the command line
before any model loads; --report_to none imports neither package.

The expected values are worked out here from the jsonl files, independently of tracking.py: every
int or float field but "step", at the line's step, eval.jsonl's under eval/<set>/. TensorBoard
stores float32 (compared as such); W&B's offline run is read from its .wandb file, a leveldb-style
log of protobuf records (`wandb_records`), and compared exactly. Runs are subprocesses of the smoke
presets with OMP_NUM_THREADS=1, W&B offline (no network, no login), its folders in the test's.
"""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from conftest import ROOT, trainer_command

import roles
import tracking
import train_ppo
import train_sft

# train_ppo.py's smoke preset, 2 steps, held-out evaluation of 2 sets at steps 0 and 2
PPO_SMOKE = ["--preset", "smoke", "--max_steps", "2", "--eval_every", "2",
             "--eval_data", "medqa_dev,medqa_test", "--eval_limit", "4",
             "--eval_max_new_tokens", "4"]
SFT_SMOKE = ["--preset", "smoke", "--max_steps", "2"]
SMOKE_RUNS = {"train_ppo.py": PPO_SMOKE, "train_sft.py": SFT_SMOKE}


def env_for(tmp_path) -> dict:
    """One thread; W&B offline and quiet, its settings and caches in the test's folder."""
    wandb_home = tmp_path / "wandb_home"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_CONFIG_DIR": str(wandb_home / "config"),
            "WANDB_CACHE_DIR": str(wandb_home / "cache"),
            "WANDB_DATA_DIR": str(wandb_home / "data")}


def train(script, args, out, tmp_path, faults="", fails=False) -> str:
    """Run a trainer to its end; check that it succeeded (or failed); return what it printed."""
    command = trainer_command(script, [*args, "--out_dir", out], faults)
    result = subprocess.run(command, cwd=ROOT, env=env_for(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert (result.returncode != 0) == fails, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result.stderr


def jsonl(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_rows(metrics_lines, eval_lines=()) -> dict:
    """{step: {name: value}}: what a tracker should hold, worked out from jsonl lines."""
    rows = {}
    lines = [("", line) for line in metrics_lines]
    lines += [(f"eval/{line['data']}/", line) for line in eval_lines]
    for prefix, line in lines:
        for key, value in line.items():
            if type(value) in (int, float) and key != "step":
                rows.setdefault(line["step"], {})[prefix + key] = value
    return rows


def comparable(value, float32=False):
    """NaN equal to NaN; a float32 where TensorBoard stores one."""
    value = float(np.float32(value)) if float32 else value
    return "NaN" if math.isnan(value) else value


def as_rows(series: dict) -> dict:
    """{tag: [(step, value), ...]} to {step: {tag: value}}; a step twice in a tag fails."""
    rows = {}
    for tag, points in series.items():
        for step, value in points:
            assert tag not in rows.get(step, {}), (tag, step)
            rows.setdefault(step, {})[tag] = value
    return rows


def assert_same_rows(got: dict, expected: dict, float32=False):
    assert sorted(got) == sorted(expected)
    for step, row in expected.items():
        assert sorted(got[step]) == sorted(row), step
        want = {k: comparable(v, float32) for k, v in row.items()}
        assert {k: comparable(v) for k, v in got[step].items()} == want, step


# ---- reading back what each backend wrote -------------------------------------------------------
def tensorboard_scalars(folder) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard reads the event files, purges included."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


BLOCK = 32768  # the leveldb log's block; a chunk header is 7 bytes: CRC-32, length, type
FULL, LAST = 1, 4  # chunk types that end a record (FIRST = 2 and MIDDLE = 3 continue one)


def wandb_records(path) -> list:
    """The protobuf records (wandb_internal_pb2.Record) of a .wandb file: W&B's leveldb log format,
    a file header (":W&B", magic 0xBEE1, version 0), then records cut into chunks that never cross
    a 32 KiB block, each chunk checked by its CRC-32 (seeded with the chunk's type byte)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), raw[:7]
    records, pending, position = [], b"", 7
    while position + 7 <= len(raw):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:  # too short for a header: padding
            position += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        chunk = raw[position + 7:position + 7 + length]
        position += 7 + length
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), (path, position)
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_runs(out) -> list[dict]:
    """Each offline W&B run under out/wandb, oldest first: its id, config, history (W&B's own
    _step, _runtime, _timestamp left out) and exit code (None: never finished)."""
    runs = []
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        found = {"history": {}, "exit_code": None}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["id"] = record.run.run_id
                found["started"] = (record.run.start_time.seconds, record.run.start_time.nanos)
                found["config"] = {item.key: json.loads(item.value_json)
                                   for item in record.run.config.update if item.key != "_wandb"}
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                row = {k: v for k, v in items.items() if not k.startswith("_")}
                found["history"].setdefault(record.history.step.num, {}).update(row)
            elif kind == "exit":
                found["exit_code"] = record.exit.exit_code
        runs.append(found)
    return sorted(runs, key=lambda found: found["started"])


# ---- on the command line ------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", [train_ppo, train_sft])
def test_a_bad_report_to_names_the_flag_and_the_choices(trainer, capsys):
    with pytest.raises(SystemExit) as e:
        trainer.parse_config(["--preset", "smoke", "--report_to", "mlflow"])
    assert e.value.code == 2
    assert "--report_to 'mlflow': choose none, tensorboard or wandb" in capsys.readouterr().err
    assert trainer.parse_config(["--preset", "smoke"]).report_to == "none"


@pytest.mark.parametrize("backend, module", [("tensorboard", "torch.utils.tensorboard"),
                                             ("wandb", "wandb")])
@pytest.mark.parametrize("trainer", [train_ppo, train_sft])
def test_a_missing_package_stops_the_run_before_any_model_loads(trainer, backend, module,
                                                                monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: its import fails

    def no_model_may_load(*args, **kwargs):
        raise AssertionError("a model loaded before the missing package was reported")

    monkeypatch.setattr(roles, "load_policy", no_model_may_load)  # every role loads through it
    with pytest.raises(SystemExit) as e:
        trainer.main(["--preset", "smoke", "--report_to", backend])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--report_to {backend} needs the {backend} package" in err
    assert f"pip install {backend}" in err


def test_only_numbers_are_tracked_each_under_its_prefix():
    line = {"step": 3, "data": "medqa_test", "loss": 0.25, "n": 4, "skipped": "non-finite",
            "flag": True, "nan": float("nan"), "inf": float("inf"), "list": [1], "nested": {"a": 1}}
    got = tracking.numeric_fields(line, "eval/medqa_test/")
    assert sorted(got) == ["eval/medqa_test/inf", "eval/medqa_test/loss", "eval/medqa_test/n",
                           "eval/medqa_test/nan"]
    assert (got["eval/medqa_test/loss"], got["eval/medqa_test/n"]) == (0.25, 4)
    assert math.isnan(got["eval/medqa_test/nan"]) and got["eval/medqa_test/inf"] == math.inf
    assert tracking.numeric_fields({"step": 1, "x": 2.5}) == {"x": 2.5}


def test_without_a_tracker_logging_and_closing_do_nothing(tmp_path):
    tracker = tracking.start("none", tmp_path, {}, 1, False, "medrlvr", print)
    tracker.log({"step": 1, "loss": 1.0}, 1)
    tracker.close()
    assert (tracker.backend, tracker.sink, list(tmp_path.iterdir())) == ("none", None, [])


def test_a_tensorboard_tracker_in_process_is_closed_at_exit_once(tmp_path, monkeypatch):
    at_exit = []
    monkeypatch.setattr(tracking.atexit, "register", at_exit.append)
    tracker = tracking.start("tensorboard", tmp_path, {}, 1, False, "medrlvr", print)
    tracker.log({"step": 0, "data": "toy", "accuracy": 0.1, "n": 8}, 0, prefix="eval/toy/")
    tracker.log({"step": 1, "loss": 2.5, "skipped": ""}, 1)
    assert at_exit == [tracker.close_at_exit]  # what runs if no StepLoop.close comes
    at_exit[0]()
    tracker.close()  # a second close does nothing
    assert tracker.sink is None
    assert tensorboard_scalars(tmp_path / "tensorboard") == {
        "eval/toy/accuracy": [(0, comparable(0.1, float32=True))], "eval/toy/n": [(0, 8.0)],
        "loss": [(1, 2.5)]}


@pytest.mark.slow
def test_report_to_none_imports_neither_package(tmp_path):
    """Both trainers, one step each, in one process: afterwards neither package is loaded."""
    script = (
        "import sys\n"
        "import train_ppo, train_sft\n"
        f"train_sft.main(['--preset', 'smoke', '--max_steps', '1', '--out_dir', "
        f"'{tmp_path / 'sft'}'])\n"
        f"train_ppo.main(['--preset', 'smoke', '--max_steps', '1', '--out_dir', "
        f"'{tmp_path / 'ppo'}'])\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard')\n"
        "          or m.startswith('torch.utils.tensorboard')]\n"
        "print('LOADED', loaded)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env_for(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout, result.stdout
    for run in ("sft", "ppo"):
        assert len(jsonl(tmp_path / run / "metrics.jsonl")) == 1  # the runs ran
        assert not (tmp_path / run / "tensorboard").exists()
        assert not (tmp_path / run / "wandb").exists()


# ---- end to end: each backend holds exactly the jsonl files' numbers ----------------------------
def expected_of(out, script) -> dict:
    rows = expected_rows(jsonl(out / "metrics.jsonl"), jsonl(out / "eval.jsonl"))
    assert sorted(rows) == ([0, 1, 2] if script == "train_ppo.py" else [1, 2])
    if script == "train_ppo.py":  # held-out evaluation at steps 0 and 2, of both sets
        assert {"eval/medqa_dev/accuracy", "eval/medqa_test/accuracy"} <= set(rows[2])
        assert {"reward", "policy_loss"} <= set(rows[1])
        # undefined (the returns did not vary): null in metrics.jsonl, so no point on a curve
        assert all("explained_variance" in line for line in jsonl(out / "metrics.jsonl"))
    else:
        assert {"loss", "letter_acc", "lr", "epoch"} <= set(rows[1])
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_tensorboard_holds_exactly_the_jsonl_numbers(script, data_dir, tmp_path):
    out = tmp_path / "run"
    train(script, SMOKE_RUNS[script] + ["--report_to", "tensorboard"], out, tmp_path)
    got = as_rows(tensorboard_scalars(out / "tensorboard"))
    assert_same_rows(got, expected_of(out, script), float32=True)
    assert not (out / "wandb").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_wandb_offline_holds_exactly_the_jsonl_numbers_and_the_config(script, data_dir, tmp_path):
    out = tmp_path / "run"
    train(script, SMOKE_RUNS[script] + ["--report_to", "wandb"], out, tmp_path)
    [run] = wandb_runs(out)
    assert run["id"] == (out / "wandb_run_id").read_text().strip()
    assert run["config"] == json.loads((out / "config.json").read_text())
    assert run["config"]["report_to"] == "wandb"
    assert_same_rows(run["history"], expected_of(out, script))
    assert run["exit_code"] == 0  # finished by the loop's end
    assert not (out / "tensorboard").exists()


@pytest.mark.slow
def test_under_torchrun_only_rank_0_logs(data_dir, tmp_path):
    out = tmp_path / "run"
    command = trainer_command("train_sft.py", SFT_SMOKE + ["--report_to", "tensorboard",
                                                           "--out_dir", out], torchrun=2)
    result = subprocess.run(command, cwd=ROOT, env=env_for(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_same_rows(as_rows(tensorboard_scalars(out / "tensorboard")),
                     expected_of(out, "train_sft.py"), float32=True)


# ---- a crash, then --resume; a Ctrl-C ----------------------------------------------------------
# train_sft.py's smoke preset, 4 steps, a checkpoint at 2 and 4: a crash as step 4 begins leaves
# step 3 logged but not checkpointed, so the resumed run trains (and logs) step 3 again
CRASHING = ["--preset", "smoke", "--max_steps", "4", "--save_every", "2"]


@pytest.mark.slow
def test_after_a_crash_and_resume_tensorboard_holds_the_resumed_runs_numbers(data_dir, tmp_path):
    out = tmp_path / "run"
    flags = CRASHING + ["--report_to", "tensorboard"]
    train("train_sft.py", flags, out, tmp_path, faults="raise@4", fails=True)
    crashed = jsonl(out / "metrics.jsonl")
    assert [line["step"] for line in crashed] == [1, 2, 3]
    assert as_rows(tensorboard_scalars(out / "tensorboard"))[3]["time_step"] == \
        comparable(crashed[2]["time_step"], float32=True)
    train("train_sft.py", flags + ["--resume"], out, tmp_path)
    resumed = jsonl(out / "metrics.jsonl")
    assert [line["step"] for line in resumed] == [1, 2, 3, 4]
    assert resumed[2]["time_step"] != crashed[2]["time_step"]  # step 3 was trained again
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    # the first attempt's step 3 is purged: each step once, with the resumed run's values
    assert_same_rows(as_rows(tensorboard_scalars(out / "tensorboard")), expected_rows(resumed),
                     float32=True)
    # a fresh run in the same folder starts the curves anew
    train("train_sft.py", CRASHING + ["--max_steps", "1", "--report_to", "tensorboard"], out,
          tmp_path)
    assert_same_rows(as_rows(tensorboard_scalars(out / "tensorboard")),
                     expected_rows(jsonl(out / "metrics.jsonl")), float32=True)
    assert sorted(as_rows(tensorboard_scalars(out / "tensorboard"))) == [1]


@pytest.mark.slow
def test_after_a_crash_and_resume_wandb_continues_the_same_run(data_dir, tmp_path):
    out = tmp_path / "run"
    flags = CRASHING + ["--report_to", "wandb"]
    train("train_sft.py", flags, out, tmp_path, faults="raise@4", fails=True)
    crashed = jsonl(out / "metrics.jsonl")
    run_id = (out / "wandb_run_id").read_text().strip()
    train("train_sft.py", flags + ["--resume"], out, tmp_path)
    resumed = jsonl(out / "metrics.jsonl")
    first, second = wandb_runs(out)  # offline, each process writes a run of its own, one id
    assert first["id"] == second["id"] == run_id == (out / "wandb_run_id").read_text().strip()
    assert first["exit_code"] == 1  # closed at exit after the exception: a failed run
    assert_same_rows(first["history"], expected_rows(crashed))  # steps 1 to 3
    assert second["exit_code"] == 0
    assert_same_rows(second["history"], expected_rows(resumed[2:]))  # steps 3 and 4
    assert second["config"]["resume"] is True
    # a fresh run in the same folder is a new W&B run
    train("train_sft.py", CRASHING + ["--max_steps", "1", "--report_to", "wandb"], out, tmp_path)
    assert wandb_runs(out)[-1]["id"] == (out / "wandb_run_id").read_text().strip() != run_id


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_wandb_still_holds_every_step(data_dir, tmp_path):
    """Ctrl-C in a terminal signals the whole process group, W&B's service process too: the step
    in flight finishes, is logged, and the W&B run is finished with exit code 0."""
    out = tmp_path / "run"
    command = trainer_command("train_sft.py", ["--preset", "smoke", "--max_steps", "60",
                                               "--save_every", "100", "--report_to", "wandb",
                                               "--out_dir", out])
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env_for(tmp_path), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(jsonl(out / "metrics.jsonl")) < 2 and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)
        rc = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = (tmp_path / "log").read_text()
    lines = jsonl(out / "metrics.jsonl")
    assert rc == 0 and f"stopped by SIGINT after step {len(lines)}" in text, text[-3000:]
    assert 2 <= len(lines) < 60
    [run] = wandb_runs(out)
    assert run["exit_code"] == 0
    assert_same_rows(run["history"], expected_rows(lines))
