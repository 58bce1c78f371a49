"""Where a named benchmark set is read from: the data folder, else the Hugging Face Hub at a pinned
commit (hub.py), else, with no data folder set, the embedded demo subset (demo_data/).

    records = sources.load_dataset("medqa_dev")  # or a path: any file or folder load_mcqa reads
    sources.source_of("medqa_dev")  # "data folder /x/medqa/4_options/dev.jsonl", for a run's log

DATASETS names every set and where its file sits in the data folder. The data folder is `data_dir`,
else $MEDRLVR_DATA, else ~/.cache/medrlvr/data. A set missing there is downloaded from the Hub into
the Hub cache; offline and uncached, a newcomer with no data folder set gets the embedded subset
with a warning, and a data folder that is set but lacks the file is an error naming it. Reading a
file is data.py's job; the Hub's copies and their converters are hub.py's.
"""
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import data
import hub
from data import DataError

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "~/.cache/medrlvr/data"  # used when neither data_dir nor MEDRLVR_DATA is given
MEDQA_ORIGIN = "github.com/jind11/MedQA, data_clean/questions/US/"
MEDQA4_ORIGIN = MEDQA_ORIGIN + "4_options/phrases_no_exclude_"
PUBMEDQA_ORIGIN = "github.com/pubmedqa/pubmedqa, data/"
# name -> (path under the data folder, where the file comes from besides the Hub)
DATASETS = {
    "medqa_train": ("medqa/4_options/train.jsonl", MEDQA4_ORIGIN + "train.jsonl"),
    "medqa_dev": ("medqa/4_options/dev.jsonl", MEDQA4_ORIGIN + "dev.jsonl"),
    "medqa_test": ("medqa/4_options/test.jsonl", MEDQA4_ORIGIN + "test.jsonl"),
    "medqa5_dev": ("medqa/5_options/dev.jsonl", MEDQA_ORIGIN + "dev.jsonl"),
    "medqa5_test": ("medqa/5_options/test.jsonl", MEDQA_ORIGIN + "test.jsonl"),
    "mmlu_pro_health": ("mmlu_pro_health/test.jsonl",
                        "github.com/xk-huang/medagents-benchmark, data/mmlu-pro/test.jsonl"),
    "medmcqa_dev": ("medmcqa/dev.json", "github.com/medmcqa/medmcqa, the release's dev.json"),
    "mmlu_medical": ("mmlu_medical/test",
                     "github.com/hendrycks/test, data.tar: data/test/<subject>_test.csv"),
    "pubmedqa": ("pubmedqa/test_set.json",
                 PUBMEDQA_ORIGIN + " (test_set.json and test_ground_truth.json)"),
    "pubmedqa_labeled": ("pubmedqa/ori_pqal.json", PUBMEDQA_ORIGIN + "ori_pqal.json"),
}
# Records of three sets, committed in the data folder's layout (demo_data/README.md says which and
# why): what a newcomer gets with neither a data folder nor the Hub. name -> (the set, its full
# size).
DEMO_DATA_DIR = Path(__file__).resolve().parent / "demo_data"
EMBEDDED = {"medqa_dev": ("MedQA-USMLE 4-option dev", 1272),
            "medqa_test": ("MedQA-USMLE 4-option test", 1273),
            "mmlu_pro_health": ("MMLU-Pro health", 818)}
_warned_embedded = set()  # the fallback is announced once per name per process


@dataclass(frozen=True)
class Source:
    description: str  # what source_of reports, e.g. "data folder /x/medqa/4_options/dev.jsonl"
    paths: tuple  # the files to read
    hub_name: str = ""  # set: the files are this Hub set's, converted by hub.read


def _locate(name_or_path: str, data_dir: str | None) -> Source:
    """load_dataset's rule, short of reading: a Hub set is downloaded into the Hub cache here."""
    if name_or_path not in DATASETS:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            files = sorted(child for child in path.iterdir()
                           if child.suffix.lower() in (".csv", ".jsonl"))
            return Source(f"folder {path} ({len(files)} files)", tuple(files))
        if path.exists():
            return Source(f"file {path}", (path,))
        raise DataError(f"{name_or_path}: no such file, "
                        f"and not a dataset name ({', '.join(DATASETS)})")
    name, relative = name_or_path, DATASETS[name_or_path][0]
    configured = data_dir or os.environ.get("MEDRLVR_DATA")
    root = Path(configured or DEFAULT_DATA_DIR).expanduser()
    files = (root / relative,)
    if name == "mmlu_medical":  # six subject files, one benchmark
        files = tuple(root / relative / f"{subject}_test.csv"
                      for subject in data.MMLU_MEDICAL_SUBJECTS)
    missing = [path for path in files if not path.exists()]
    if not missing:
        return Source(f"data folder {root / relative}", files)
    try:
        found = Source(hub.describe(name), hub.fetch(name), name)
    except hub.HubUnavailable as e:
        hub_problem = str(e)
    else:  # a data folder the user chose but that lacks the file deserves a warning
        (log.warning if configured else log.info)("%s: %s is not there; reading %s", name,
                                                  missing[0], found.description)
        return found
    if configured or name not in EMBEDDED:
        raise DataError(f"{missing[0]}: not found; dataset {name!r} reads this file, and "
                        f"{hub_problem}; put it there (source: {DATASETS[name][1]}), point "
                        "MEDRLVR_DATA / data_dir at a folder that has it, or run once online")
    path = DEMO_DATA_DIR / relative
    count = sum(1 for line in data.read_text(path).split("\n") if line.strip())
    if name not in _warned_embedded:
        _warned_embedded.add(name)
        log.warning("%s: using the embedded %d-question subset of %s (%s): no data folder is set "
                    "and %s. Numbers on it are not the benchmark's. For the full set, set "
                    "MEDRLVR_DATA to a folder that has %s, or run once online (the Hub copy is "
                    "then cached)", name, count, EMBEDDED[name][0], path, hub_problem, relative)
    return Source(f"embedded demo subset ({count} of {EMBEDDED[name][1]}) {path}", (path,))


def load_dataset(name_or_path: str, data_dir: str | None = None) -> list[dict]:
    """A named benchmark (DATASETS) under `data_dir` (default: env MEDRLVR_DATA, then
    ~/.cache/medrlvr/data), else the Hub's pinned copy (hub.py), else, with no data folder set, the
    embedded subset (EMBEDDED, with a warning). Or any file / folder of files load_mcqa reads."""
    source = _locate(name_or_path, data_dir)
    if source.hub_name:
        # The Hub's records get the ids the local file would give them ("dev" -> "medqa_dev-17").
        local_stem = Path(DATASETS[source.hub_name][0]).stem
        return hub.read(source.hub_name, source.paths, local_stem)
    return [record for path in source.paths for record in data.load_mcqa(path)]


def source_of(name_or_path: str, data_dir: str | None = None) -> str:
    """Where load_dataset reads from, for a run's log: "data folder <path>", "Hub <repo>@<commit>
    <file>" or "embedded demo subset (164 of 1272) <path>"."""
    return _locate(name_or_path, data_dir).description
