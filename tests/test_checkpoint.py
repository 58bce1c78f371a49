"""checkpoint.py on its own, without a training run: complete or absent, never non-finite, and every
kind of damage found. A disk that fills or turns read-only is a real tmpfs mount (CI runs as root,
where chmod does not stop a write; skipped where mounting is not allowed). The faults injected into
real training runs are in tests/test_faults.py."""
import os
import shutil
import subprocess

import pytest
import torch

import checkpoint
import model_zoo
import roles


def tiny_training_state():
    policy, tokenizer = model_zoo.load_tiny(chars="ABCD:", seed=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    policy(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    trained = {"policy": roles.Trained(policy, list(policy.parameters()))}
    return trained, {"policy": optimizer}, {"policy": scheduler}, tokenizer


def save(root, step, state):
    models, opts, scheds, tokenizer = state
    checkpoint.save_training(root, step, models, opts, scheds, tokenizer, {"note": "test"},
                             {"kl_coef": 0.01})


def test_nonfinite_weights_are_never_written(tmp_path):
    state = tiny_training_state()
    save(tmp_path, 1, state)
    with torch.no_grad():
        next(state[0]["policy"].module.parameters())[0, 0] = float("inf")
    with pytest.raises(checkpoint.CheckpointError,
                       match="step 2: the weights hold NaN or inf; refusing"):
        save(tmp_path, 2, state)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]
    assert checkpoint.verify(tmp_path / "step_000001") == []


def test_leftovers_of_killed_saves_are_ignored_then_removed(tmp_path):
    """A kill mid-save leaves step_N.tmp-*; mid-replace of a step, step_N.old-*; mid-delete of an
    old step (keep_last), step_N.del-*. None of them is a checkpoint to resume from; the next save
    removes them all."""
    state = tiny_training_state()
    save(tmp_path, 1, state)
    leftover_names = ("step_000002.tmp-0a1b2c3d", "step_000001.old-0a1b2c3d",
                      "step_000000.del-0a1b2c3d")
    for name in leftover_names:
        # complete-looking, manifest and all
        shutil.copytree(tmp_path / "step_000001", tmp_path / name)
    assert checkpoint.list_checkpoints(tmp_path) == [tmp_path / "step_000001"]
    assert checkpoint.find_resumable(tmp_path) == tmp_path / "step_000001"
    models, opts, scheds, tokenizer = state
    checkpoint.save_training(tmp_path, 2, models, opts, scheds, tokenizer, {}, {"kl_coef": 0.01},
                             keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs mounted for the test (real ENOSPC and EROFS, for root too), unmounted after it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)]
    if not shutil.which("mount") or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt, opts):
    subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)


def used_kb(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


@pytest.mark.parametrize("fault", ["full in the model files", "full in the optimizer shards",
                                   "read-only"])
def test_checkpoint_write_failure_keeps_the_previous_one(tmpfs, fault):
    state = tiny_training_state()
    save(tmpfs, 1, state)
    first = tmpfs / "step_000001"
    # Room for 64 KB, less than the model file alone, or for everything but the optimizer shards
    # and 100 KB more, far less than the shards need.
    all_but_optim_kb = sum(p.stat().st_size for p in first.rglob("*")
                           if "optim" not in p.parts) // 1024
    free_kb = {"full in the model files": 64,
               "full in the optimizer shards": all_but_optim_kb + 100}.get(fault)
    remount(tmpfs, f"size={used_kb(tmpfs) + free_kb}k" if free_kb else "ro")
    with pytest.raises(checkpoint.CheckpointError) as err:
        save(tmpfs, 2, state)
    msg = str(err.value)
    assert msg.startswith(f"could not write checkpoint {tmpfs}/step_000002: "), msg
    assert "\n" not in msg, msg
    expected = {"full in the model files": "SafetensorError: Error while serializing: I/O error: "
                                           "No space left on device",
                "full in the optimizer shards": "No space left on device",
                "read-only": "Read-only file system"}[fault]
    assert expected in msg
    assert "MiB free there" in msg
    if fault == "full in the optimizer shards":
        # safetensors' error, from writing the optimizer state
        assert type(err.value.__cause__).__name__ == "SafetensorError"
    assert msg.endswith("the previous checkpoints are intact")
    remount(tmpfs, "rw")
    assert [p.name for p in tmpfs.iterdir()] == ["step_000001"]
    assert checkpoint.verify(first) == []


def test_checkpoint_folder_that_is_a_file(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"could not write checkpoint {tmp_path}/checkpoints/step_000001: "):
        save(tmp_path / "checkpoints", 1, tiny_training_state())


def _flip(path):
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))


# what happens to the newest checkpoint -> the words verify() must say
CORRUPTIONS = {
    "a flipped bit in the optimizer state": (lambda ck: _flip(ck / "optim" / "policy.safetensors"),
                                             "policy.safetensors: sha256 differs"),
    "a truncated model file": (lambda ck: os.truncate(ck / "policy" / "model.safetensors", 100),
                               "model.safetensors: 100 bytes"),
    "a deleted file": (lambda ck: (ck / "trainer_state.json").unlink(),
                       "trainer_state.json: missing"),
    "no manifest": (lambda ck: (ck / "MANIFEST.json").unlink(), "MANIFEST.json: missing"),
    "a manifest cut short": (lambda ck: os.truncate(ck / "MANIFEST.json", 50),
                             "MANIFEST.json: unreadable"),
    "a manifest of the wrong shape":
        (lambda ck: (ck / "MANIFEST.json").write_text('{"files": {"rng.pt": 3}}'),
         "MANIFEST.json: unreadable"),
    "a manifest that is a list": (lambda ck: (ck / "MANIFEST.json").write_text("[1, 2]"),
                                  "MANIFEST.json: unreadable"),
    "a manifest listing nothing": (lambda ck: (ck / "MANIFEST.json").write_text('{"files": {}}'),
                                   "lists no files"),
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
    problems = checkpoint.verify(root / "step_000002")
    assert len(problems) == 1, problems
    assert words in problems[0], problems
    with pytest.raises(checkpoint.CheckpointError, match="failed verification"):
        checkpoint.find_resumable(root)
    said = []
    assert checkpoint.find_resumable(root, fallback=True, log=said.append) == root / "step_000001"
    assert words in said[0]
    corrupt(root / "step_000001")
    with pytest.raises(checkpoint.CheckpointError,
                       match="no checkpoint under .* passes verification"):
        checkpoint.find_resumable(root, fallback=True, log=said.append)
