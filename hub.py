"""Every named benchmark set on the Hugging Face Hub: its repository, the commit it is pinned to,
its files, and the converter that turns them into this project's records.

sources.load_dataset asks here when a set's files are not in the data folder. Each set is pinned to
one commit of its repository, so a download gives the same questions wherever and whenever it
runs. A converter reuses data.py's own per-schema converter wherever the Hub kept a schema that
data.py reads, and ends in data.check_records, the checks every local record passes: a record from
the Hub equals, field for field, the record load_mcqa gives from the local file of the same set
(where a Hub copy lacks a field, HUB_SETS says so).

Files come through huggingface_hub.hf_hub_download (installed with transformers) into the Hub cache
(HF_HUB_CACHE, else HF_HOME/hub); with HF_HUB_OFFLINE set, only that cache is read. Parquet files
are read with pyarrow (pip install pyarrow), imported only when one is read: the `datasets` library
would bring far more. Whatever stops a download raises HubUnavailable, which sources.py turns into
its embedded fallback or into an error naming the set, the repository, the file and the data folder
path. A problem inside a downloaded file is a DataError "file:row: problem", as for a local file.
"""
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import data
from data import DataError


class HubUnavailable(Exception):
    """A set's files could not be had from the Hub (offline and not in the cache, no network, ...).
    The message completes "dataset X reads this file, and ..."."""


def _parquet_rows(path: Path) -> list[dict]:
    """A parquet file's rows; row n is "line" n in an error message."""
    try:
        import pyarrow.parquet  # only the parquet sets need it
    except ImportError:
        raise DataError(f"{path}:1: reading a parquet file needs pyarrow: pip install pyarrow"
                        ) from None
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}:1: not a readable parquet file ({e})") from None


# ---- One converter per Hub schema: (local paths of its files, stem) -> records -------------------
# `stem` is the name of the set's local file, which line-number ids are made from ("dev" ->
# "medqa_dev-17"), so that a Hub record has the id the local file gives it.

def _read_medqa_jsonl(paths: tuple, stem: str) -> list[dict]:
    """MedQA-USMLE jsonl, the local files' own schema under the release's file names."""
    return data.load_mcqa(paths[0], stem=stem)


def _read_bigbio_medqa(paths: tuple, stem: str) -> list[dict]:
    """bigbio/med_qa's "source" schema: MedQA's own fields, the options a list of {key, value}."""
    path = paths[0]
    numbered = []
    for row_number, row in enumerate(_parquet_rows(path), 1):
        where = (path, row_number)
        options = {}
        for option in data.get_field(row, "options", list, where):
            if not isinstance(option, dict):
                raise data.error_at(*where, f"each option should be {{key, value}}, got {option!r}")
            letter = data.get_field(option, "key", str, where)
            if letter in options:
                raise data.error_at(*where, f"option {letter!r} twice")
            options[letter] = data.get_field(option, "value", str, where)
        fields = {key: row[key] for key in ("question", "answer_idx", "answer", "meta_info")
                  if row.get(key) is not None}
        numbered.append((row_number, data.medqa_fields({**fields, "options": options}, where)))
    return data.check_records(numbered, path, stem)


def _read_mmlu_pro(paths: tuple, stem: str) -> list[dict]:
    """MMLU-Pro's own schema (options a list, answer_index), every category in one file: the set is
    category "health"."""
    path = paths[0]
    numbered = []
    for row_number, row in enumerate(_parquet_rows(path), 1):
        where = (path, row_number)
        if data.get_field(row, "category", str, where) == "health":
            numbered.append((row_number, data.mmlu_pro_fields(row, where)))
    return data.check_records(numbered, path, stem)


def _read_medmcqa(paths: tuple, stem: str) -> list[dict]:
    """MedMCQA's fields; the Hub's `cop` counts the gold option from 0, the original release (and
    data.py's converter) from 1."""
    path = paths[0]
    numbered = []
    for row_number, row in enumerate(_parquet_rows(path), 1):
        where = (path, row_number)
        cop = data.get_field(row, "cop", int, where)
        if cop not in (0, 1, 2, 3):
            raise data.error_at(*where, f"cop must be 0-3 in the Hub copy (0 = opa), got {cop}")
        numbered.append((row_number, data.medmcqa_fields({**row, "cop": cop + 1}, where)))
    return data.check_records(numbered, path, stem)


# A line break as the csv module counts lines when load_mcqa reads a hendrycks CSV.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _read_mmlu(paths: tuple, stem: str) -> list[dict]:
    """cais/mmlu: a parquet file per subject (question, subject, choices, answer 0-3). An id names
    the line its row starts on in hendrycks' CSV, as load_mcqa numbers the local file: a line a
    row, plus the line breaks inside its texts. The stems are the subjects' file names, not
    `stem`."""
    records = []
    for subject, path in zip(data.MMLU_MEDICAL_SUBJECTS, paths):
        numbered = []
        line = 1
        for row_number, row in enumerate(_parquet_rows(path), 1):
            where = (path, row_number)
            question = data.get_field(row, "question", str, where)
            choices = data.get_field(row, "choices", list, where)
            answer = data.get_field(row, "answer", int, where)
            if row.get("subject") not in (None, subject):
                raise data.error_at(*where, f"subject {row['subject']!r} in the {subject} file")
            if len(choices) != 4 or not all(isinstance(choice, str) for choice in choices):
                raise data.error_at(*where, f"choices should be 4 texts, got {str(choices)[:80]}")
            if answer not in (0, 1, 2, 3):
                raise data.error_at(*where, f"answer must be 0-3 (0 = A), got {answer}")
            numbered.append((row_number, {
                "id": f"mmlu_{subject}_test-{line}", "source": "mmlu", "question": question,
                "options": dict(zip("ABCD", choices)), "answer": "ABCD"[answer],
                "meta": {"subject": subject}}))
            line += 1 + sum(len(_LINE_BREAK.findall(text)) for text in (question, *choices))
        records += data.check_records(numbered, path, f"{subject}_test")
    return records


def _pubmedqa_items(path: Path) -> dict:
    """pmid -> (row, record fields) for qiaojin/PubMedQA's pqa_labeled file, in its order."""
    items = {}
    for row_number, row in enumerate(_parquet_rows(path), 1):
        where = (path, row_number)
        pmid = str(data.get_field(row, "pubid", int, where))
        context = data.get_field(row, "context", dict, where)
        contexts = data.get_field(context, "contexts", list, where)
        if not all(isinstance(context, str) for context in contexts):
            raise data.error_at(*where, "field 'context.contexts' should be a list of str")
        if pmid in items:
            raise data.error_at(*where, f"pubid {pmid} twice (first on row {items[pmid][0]})")
        question = data.get_field(row, "question", str, where)
        decision = data.get_field(row, "final_decision", str, where)
        items[pmid] = (row_number, data.pubmedqa_fields(pmid, question, contexts, decision, None,
                                                        where))
    return items


def _read_pubmedqa_labeled(paths: tuple, stem: str) -> list[dict]:
    """The 1000 expert-labelled questions (the local ori_pqal.json)."""
    return data.check_records(_pubmedqa_items(paths[0]).values(), paths[0], stem)


# The official test split (the local test_set.json) is 500 of the 1000 labelled questions, in an
# order of its own: the pmids of test_ground_truth.json, committed (demo_data/README.md).
PUBMEDQA_TEST_PMIDS = Path(__file__).resolve().parent / "demo_data" / "pubmedqa" / "test_pmids.txt"


def _read_pubmedqa_test(paths: tuple, stem: str) -> list[dict]:
    items = _pubmedqa_items(paths[0])
    numbered = []
    for line, text in enumerate(data.read_text(PUBMEDQA_TEST_PMIDS).split("\n"), 1):
        pmid = text.strip()
        if not pmid:
            continue
        if pmid not in items:
            raise DataError(f"{paths[0]}:1: pubid {pmid} of the test split "
                            f"({PUBMEDQA_TEST_PMIDS}:{line}) is not in this file")
        numbered.append(items[pmid])
    return data.check_records(numbered, paths[0], stem)


# ---- The table: every name in sources.DATASETS ---------------------------------------------------

@dataclass(frozen=True)
class HubSet:
    repo: str  # a dataset repository on the Hub
    revision: str  # the commit every download is pinned to
    files: tuple  # paths inside the repository
    read: Callable  # (local paths of `files`, stem) -> records


GBAKER_MEDQA = ("GBaker/MedQA-USMLE-4-options", "0fb93dd23a7339b6dcd27e241cb9b5eca62d4d18")
# The parquet branch (refs/convert/parquet) of bigbio/med_qa, which converted MedQA's own jsonl.
BIGBIO_MEDQA = ("bigbio/med_qa", "e04abdc0672c54547fa1dbe36cfefc000e4f2657")
PUBMEDQA = ("qiaojin/PubMedQA", "549420195d3e611714ae86542ee6a9821affd7ca")
PUBMEDQA_LABELED_FILE = ("pqa_labeled/train-00000-of-00001.parquet",)
HUB_SETS = {
    "medqa_train": HubSet(*GBAKER_MEDQA, ("phrases_no_exclude_train.jsonl",), _read_medqa_jsonl),
    "medqa_test": HubSet(*GBAKER_MEDQA, ("phrases_no_exclude_test.jsonl",), _read_medqa_jsonl),
    # GBaker has no dev file.
    "medqa_dev": HubSet(*BIGBIO_MEDQA, ("med_qa_en_4options_source/validation/0000.parquet",),
                        _read_bigbio_medqa),
    "medqa5_dev": HubSet(*BIGBIO_MEDQA, ("med_qa_en_source/validation/0000.parquet",),
                         _read_bigbio_medqa),
    "medqa5_test": HubSet(*BIGBIO_MEDQA, ("med_qa_en_source/test/0000.parquet",),
                          _read_bigbio_medqa),
    # MMLU-Pro's own release: as the local test.tiger_2024-07.jsonl, which differs from
    # medagents-benchmark's test.jsonl in two questions (tests/test_data.py names them).
    "mmlu_pro_health": HubSet("TIGER-Lab/MMLU-Pro", "497c01e319905c102d71cac17c1eb89be1d79f39",
                              ("data/test-00000-of-00001.parquet",), _read_mmlu_pro),
    "medmcqa_dev": HubSet("openlifescienceai/medmcqa", "91c6572c454088bf71b679ad90aa8dffcd0d5868",
                          ("data/validation-00000-of-00001.parquet",), _read_medmcqa),
    "mmlu_medical": HubSet("cais/mmlu", "c30699e8356da336a370243923dbaf21066bb9fe",
                           tuple(f"{subject}/test-00000-of-00001.parquet"
                                 for subject in data.MMLU_MEDICAL_SUBJECTS), _read_mmlu),
    # qiaojin's copy has no YEAR: meta["year"] is None, where the local files give the year.
    "pubmedqa": HubSet(*PUBMEDQA, PUBMEDQA_LABELED_FILE, _read_pubmedqa_test),
    "pubmedqa_labeled": HubSet(*PUBMEDQA, PUBMEDQA_LABELED_FILE, _read_pubmedqa_labeled),
}


# ---- What sources.py calls -----------------------------------------------------------------------

def describe(name: str) -> str:
    """"Hub <repo>@<commit> <file>", for sources.source_of."""
    hub_set = HUB_SETS[name]
    more = f" and {len(hub_set.files) - 1} more" if len(hub_set.files) > 1 else ""
    return f"Hub {hub_set.repo}@{hub_set.revision} {hub_set.files[0]}{more}"


def _offline() -> bool:
    from huggingface_hub import constants
    # huggingface_hub reads HF_HUB_OFFLINE once, when imported; a later setting counts too.
    later = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return constants.is_offline_mode() or later


def fetch(name: str) -> tuple:
    """The local paths of a set's Hub files, downloaded into the Hub cache unless already there.
    Raises HubUnavailable when they cannot be had."""
    hub_set = HUB_SETS[name]
    parquet = any(file.endswith(".parquet") for file in hub_set.files)
    if parquet and importlib.util.find_spec("pyarrow") is None:
        raise HubUnavailable(f"its Hugging Face Hub copy ({hub_set.repo}) is parquet, which needs "
                             "pyarrow to read: pip install pyarrow")
    from huggingface_hub import hf_hub_download  # comes with transformers
    offline = _offline()
    paths = []
    for file in hub_set.files:
        try:
            paths.append(Path(hf_hub_download(repo_id=hub_set.repo, filename=file,
                                              repo_type="dataset", revision=hub_set.revision,
                                              local_files_only=offline)))
        except Exception as e:  # no network, no such file, offline and not cached: one message
            why = ("HF_HUB_OFFLINE is set, and the file is not in the Hub cache" if offline
                   else f"{type(e).__name__}: {str(e)[:200]}")
            raise HubUnavailable(f"the Hugging Face Hub could not give it (dataset {hub_set.repo}"
                                 f"@{hub_set.revision}, file {file}: {why})") from None
    return tuple(paths)


def read(name: str, paths: tuple, stem: str) -> list[dict]:
    """The records of a set from the paths fetch gave, with the ids its local file `stem` (the
    file's name: "dev" for medqa/4_options/dev.jsonl) gives them."""
    return HUB_SETS[name].read(paths, stem)
