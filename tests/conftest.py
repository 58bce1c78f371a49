"""Shared test setup: where the real data lives, and a clean torch state for every test."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is flat files at the top level, not a package

# The real benchmark files are never committed; CI sets MEDRLVR_DATA, and a checkout next to ../shared works too.
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
