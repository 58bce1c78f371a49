"""bench.py runs: its generation section and its paper section (the paper's shape scaled down, as
--quick does) on the CPU, each row measured, none failed. A GPU runs the same code at full
size."""
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_quick_bench_of_generation_and_the_paper_section_runs():
    cmd = [sys.executable, "bench.py", "--quick", "--only", "generation,paper", "--out", ""]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    final = max(i for i, line in enumerate(lines) if line.startswith("| section | what |"))
    table = [line for line in lines[final:] if line.startswith("| ")]  # the table printed last
    assert not [line for line in table if "failed" in line], result.stderr[-3000:]
    paper = [line for line in table if line.startswith("| paper |")]
    assert any("engine.generate: useful tokens/s" in line for line in paper)
    assert any("engine-static" in line or "decode='static'" in line for line in table)
    assert sum("MFU" in line for line in paper) == 2  # actor alone, actor + critic
    assert any(line.startswith("| paper | update |") for line in paper)  # the step's phases
    assert any("peak RSS of the step" in line for line in paper)
