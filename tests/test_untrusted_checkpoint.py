"""A run folder from someone else runs no code: each file of a real checkpoint that `--resume` or
eval.py reads is replaced, one at a time, by a pickle whose loading runs a shell command, with the
manifest's size and sha256 updated to match (whoever sends the folder writes the manifest too).
Resuming, or evaluating the policy, must refuse it, naming the file, and the command must not run.
"""
import json
import os
import shutil

import pytest
import torch

import checkpoint
import eval as evaluate
import train_ppo


class RunsAShellCommand:
    """Unpickling it runs `touch MARKER`: what a pickle sent by an attacker would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(folder, rel, marker, replaces=None):
    """Write the malicious pickle at folder/rel (in place of folder/replaces, if given) and make the
    manifest agree with it, so that only the loading itself can tell."""
    path = folder / rel
    if replaces:
        (folder / replaces).unlink()
    with open(path, "wb") as f:  # torch.save refuses a path named ".metadata", not a file
        torch.save(RunsAShellCommand(marker), f)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"].pop(replaces or rel, None)
    manifest["files"][rel] = {"bytes": path.stat().st_size, "sha256": checkpoint.sha256(path)}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(folder) == []
    return path


@pytest.fixture(scope="module")
def saved(toy, tmp_path_factory):
    """A real two-step PPO run (policy, critic, optimizers, RNG states) with a checkpoint per step,
    and the files of its newest checkpoint."""
    out = tmp_path_factory.mktemp("saved") / "run"
    train_ppo.main(toy + ["--max_steps", "2", "--save_every", "1", "--out_dir", str(out)])
    newest = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    return out, sorted(str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file())


def test_the_payload_is_live(tmp_path):
    """The planted file does run its command when unpickled: the tests below mean something."""
    marker = tmp_path / "ran"
    torch.save(RunsAShellCommand(marker), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


# files read as data on resume; the model weights are replaced by a pickle under their usual name
RESUME_CASES = ["rng.safetensors", "rng.json", "trainer_state.json", "optim/policy.safetensors",
                "optim/policy.json", "optim/critic.safetensors", "optim/critic.json",
                "policy/pytorch_model.bin", "critic/pytorch_model.bin"]
REPLACED_WEIGHTS = {"policy/pytorch_model.bin": "policy/model.safetensors",
                    "critic/pytorch_model.bin": "critic/model.safetensors"}


def test_every_file_of_a_checkpoint_is_covered(saved):
    """Each file is a case below, or text that transformers and tokenizers parse as JSON (the
    configs, the tokenizer) and never unpickle."""
    _, files = saved
    covered = {*RESUME_CASES, *REPLACED_WEIGHTS.values(), "MANIFEST.json"}
    parsed_as_text = [f for f in files if f.startswith(("policy/", "critic/"))
                      and f.endswith((".json", ".jinja", ".txt"))]
    assert sorted(set(files) - covered - set(parsed_as_text)) == []


@pytest.mark.parametrize("rel", RESUME_CASES)
def test_resume_refuses_a_pickle_naming_the_file(rel, saved, toy, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved[0], out)
    newest = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    marker = tmp_path / "ran"
    path = plant(newest, rel, marker, REPLACED_WEIGHTS.get(rel))
    logged = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as refused:  # the command line's one-line error, exit 1
        train_ppo.cli(toy + ["--max_steps", "3", "--resume", "--out_dir", str(out)])
    said = str(refused.value.code)
    assert said.startswith(f"error: {path}: "), said
    assert not marker.exists()
    assert (out / "metrics.jsonl").read_bytes() == logged  # a refused resume touches nothing


@pytest.mark.parametrize("rel", ["optim/__0_0.distcp", "optim/.metadata", "rng.pt",
                                 "policy/training_args.bin"])
def test_a_pickle_added_anywhere_is_refused_before_loading(rel, saved, toy, tmp_path):
    """An extra file that nothing would read today (or a checkpoint of the older, pickled format):
    still refused, since a later version, or transformers, might read it."""
    out = tmp_path / "run"
    shutil.copytree(saved[0], out)
    newest = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    marker = tmp_path / "ran"
    path = plant(newest, rel, marker)
    with pytest.raises(SystemExit, match="a pickle, which would run any code") as refused:
        train_ppo.cli(toy + ["--max_steps", "3", "--resume", "--out_dir", str(out)])
    assert str(refused.value.code).startswith(f"error: {path}: ")
    assert not marker.exists()


@pytest.mark.parametrize("given", ["the run folder", "the policy folder"])
def test_eval_refuses_a_pickled_policy_naming_the_file(given, saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved[0], out)
    newest = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    marker = tmp_path / "ran"
    path = plant(newest, "policy/pytorch_model.bin", marker, "policy/model.safetensors")
    model = out if given == "the run folder" else newest / "policy"
    with pytest.raises(SystemExit, match="model weights as a pickle") as refused:
        evaluate.main(["--model", str(model), "--out", str(tmp_path / "eval")])
    assert str(refused.value).startswith("error: ") and str(path) in str(refused.value)
    assert not marker.exists()


def test_the_checkpoint_resumes_when_nothing_was_planted(saved, toy, tmp_path):
    """The same copy, untouched, resumes: the refusals above come from the planted files."""
    out = tmp_path / "run"
    shutil.copytree(saved[0], out)
    train_ppo.cli(toy + ["--max_steps", "3", "--resume", "--out_dir", str(out)])
    logged = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3]
