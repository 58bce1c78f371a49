"""Shared test setup: where the real data lives, and the toy task the training-run tests share."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is flat files at the top level, not a package

# The real benchmark files are never committed (demo_data/ holds a small subset); CI sets
# MEDRLVR_DATA, and a checkout next to ../shared works too. MEDRLVR_DATA set but empty: no data, as
# on a newcomer's machine.
if "MEDRLVR_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["MEDRLVR_DATA"] = str(ROOT.parent / "shared" / "data")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HAVE_DATA = bool(os.environ.get("MEDRLVR_DATA")) and Path(os.environ["MEDRLVR_DATA"]).is_dir()
NO_DATA = "needs the real benchmark files: set MEDRLVR_DATA to the shared data folder (see README)"


def need_data():
    """Skip the calling test without the real data; under MEDRLVR_REQUIRE_DATA=1 (.ci/run sets it)
    fail it instead, so that CI never passes by skipping. Tests get it through `data_dir`."""
    if HAVE_DATA:
        return
    if os.environ.get("MEDRLVR_REQUIRE_DATA") == "1":
        pytest.fail(f"{NO_DATA} (MEDRLVR_REQUIRE_DATA=1: no skipping)", pytrace=False)
    pytest.skip(NO_DATA)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real benchmark folder (MEDRLVR_DATA); see need_data when there is none."""
    need_data()
    return Path(os.environ["MEDRLVR_DATA"])


# The toy task of the training-run tests (test_train_ppo.py, test_faults.py): a 12-token model
# learns "Pick C" -> "C</answer>" after the prefilled "<think></think><answer>", in seconds.
TOY_QUESTIONS = [{"id": f"q{i}", "question": f"Pick {'ABCD'[i % 4]}",
                  "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer": "ABCD"[i % 4],
                  "source": "toy", "meta": {}} for i in range(16)]


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """train_ppo.py flags of a 4-step run of the toy task (add --out_dir; override any flag)."""
    import model
    import model_zoo
    folder = tmp_path_factory.mktemp("toy")
    tiny, tokenizer = model_zoo.load_tiny(chars="ABCD:", seed=0)
    model.save_model(tiny, tokenizer, folder / "tiny")
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY_QUESTIONS))
    return ["--preset", "smoke", "--model", str(folder / "tiny"),
            "--train_data", str(folder / "toy.jsonl"), "--prompt_style", "direct",
            "--prefill", "<think></think><answer>", "--rollout_batch_size", "8",
            "--n_samples_per_prompt", "4", "--train_batch_size", "16", "--micro_batch_size", "4",
            "--max_new_tokens", "4", "--actor_lr", "3e-3", "--critic_lr", "3e-3",
            "--ppo_epochs", "2", "--max_steps", "4", "--save_every", "2"]


def trainer_command(script: str, args: list, faults: str = "", torchrun: int = 0) -> list:
    """The command line of a training run: `python script args`, under torchrun with that many
    processes, and through tests/launch_with_faults.py when faults are to be injected."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    if faults:
        launcher += [str(ROOT / "tests" / "launch_with_faults.py"), faults]
    return [*launcher, str(ROOT / script), *map(str, args)]
