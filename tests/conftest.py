"""Shared test setup: where the real data lives, and the toy task the training-run tests share."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is flat files at the top level, not a package

# The real benchmark files are never committed; CI sets MEDRLVR_DATA, and a checkout next to
# ../shared works too.
if "MEDRLVR_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["MEDRLVR_DATA"] = str(ROOT.parent / "shared" / "data")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def data_dir() -> Path:
    d = os.environ.get("MEDRLVR_DATA")
    if not d or not Path(d).is_dir():
        pytest.fail("MEDRLVR_DATA must point at the shared benchmark data (see README)")
    return Path(d)


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
