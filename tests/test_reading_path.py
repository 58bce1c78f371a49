"""The README's Reading path is what runs: every function its table names for `python train_ppo.py`
(the demo preset) is called by a demo-preset run, and every function it names for `--preset paper`
by a paper-preset run (at tiny size, on the CPU with the GPU's sampler: --engine static, bf16)."""
import os
import re
import sys

import pytest
from conftest import ROOT

import train_ppo

NAME = re.compile(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`")


def reading_path_columns() -> tuple[list[str], list[str]]:
    """The functions the README's Reading path table names, for the demo and for the paper run."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reading path"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    demo, paper = [], []
    for row in rows[1:]:  # the header first
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        demo += NAME.findall(cells[2])
        paper += NAME.findall(cells[3].replace("the same", cells[2]))
    return demo, paper


def functions_called(argv) -> set[str]:
    """`module.qualname` of every function of the project's files a train_ppo run calls."""
    called = set()
    root = str(ROOT) + os.sep

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(root) and os.sep + "tests" + os.sep not in path:
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            called.add(f"{module}.{frame.f_code.co_qualname}")

    sys.setprofile(profile)
    try:
        train_ppo.main(argv)
    finally:
        sys.setprofile(None)
    return called


SMALL = ["--max_steps", "1", "--eval_every", "0", "--max_new_tokens", "12",
         "--max_prompt_tokens", "4096", "--train_data", "medqa_dev"]


@pytest.mark.slow
def test_the_readme_reading_path_is_what_each_preset_runs(data_dir, tmp_path):
    demo, paper = reading_path_columns()
    assert len(demo) >= 13 and len(paper) >= 13  # one name a stop at least
    runs = {"demo": ["--preset", "demo", "--model", "tiny-qwen2", *SMALL],
            "paper": ["--preset", "paper", "--model", "tiny-qwen2", "--rollout_batch_size", "4",
                      "--train_batch_size", "4", "--micro_batch_size", "2",
                      "--generate_batch_size", "4", "--device", "cpu", "--dtype", "bfloat16",
                      "--engine", "static", *SMALL]}
    for (name, argv), named in zip(runs.items(), (demo, paper)):
        called = functions_called([*argv, "--out_dir", str(tmp_path / name)])
        missing = [f for f in named if f not in called]
        assert not missing, f"the README names for the {name} run what it never calls: {missing}"
