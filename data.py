"""Benchmark files -> multiple-choice records -> prompts -> left-padded token batches.

Every dataset becomes a list of the same record:

    {"id": "medqa_test-17", "question": str, "options": {"A": str, "B": str, ...},
     "answer": "B", "source": "medqa", "meta": {"step": "step1"}}

`load_mcqa(path)` detects the format from the file itself:
  - MedQA-USMLE jsonl (4 or 5 options; `answer_idx` letter; `meta_info` -> meta["step"]),
  - MMLU-Pro as medagents-benchmark ships it (same dict-of-options layout plus `realidx`, `src`),
  - MMLU-Pro's own schema (options as a list, `answer_index` 0-based, `question_id`, `src`),
  - MedMCQA json lines (`opa`..`opd`, `cop` 1-4 as in the original release; the Hub copy uses 0-3),
  - hendrycks MMLU CSV (no header: question, A, B, C, D, answer letter; subject from the file name),
  - PubMedQA (ori_pqal.json / test_set.json: {pmid: {QUESTION, CONTEXTS, final_decision}};
    labels may instead come from test_ground_truth.json next to it) as a 3-option question:
    A. yes, B. no, C. maybe,
  - generic jsonl: one record as above a line (`id`, `source`, `meta` optional).
`load_dataset(name)` finds a named benchmark under the data folder, else on the Hugging Face Hub
(hub.py), else, with no data folder set, in the embedded demo subset (demo_data/).

Bad input is never dropped or guessed around: it raises `DataError` with "file:line: problem".
Blank lines are skipped (they hold no record); every other line must be a valid record.
"""
import csv
import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A data file that cannot be read as multiple-choice questions.

    The message is always "file:line: problem"."""


def _error(path, line: int, problem: str) -> DataError:
    # Callers `raise _error(...) from None` inside except blocks: the user sees one clear line,
    # not json's or csv's internal traceback.
    return DataError(f"{path}:{line}: {problem}")


# ---- Reading text and JSON with line numbers -----------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _error(path, 1, f"cannot read file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate the byte-order mark spreadsheet tools write
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        problem = f"not UTF-8 text (byte 0x{raw[e.start]:02x}): binary or another encoding"
        raise _error(path, line, problem) from None
    if "\x00" in text:  # valid UTF-8, but no text format holds NUL bytes
        raise _error(path, text[: text.index("\x00")].count("\n") + 1,
                     "NUL byte: binary data, not text")
    if not text.strip():
        raise _error(path, 1, "file is empty: no records")
    return text


def _unique_keys(pairs):
    """json object hook: the stdlib keeps the last of two equal keys, so a duplicate option letter
    would pass unseen."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in a JSON object "
                             "(e.g. the same option letter twice)")
        out[key] = value
    return out


def _loads(text: str, path, line: int, unique_keys=True):
    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except json.JSONDecodeError as e:
        raise _error(path, line + e.lineno - 1,
                     f"malformed JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:  # from _unique_keys
        raise _error(path, line, str(e)) from None
    except RecursionError:
        raise _error(path, line, "malformed JSON: nested too deeply") from None


def _json_members(text: str, path):
    """(line, key, value) for each member of a top-level JSON object (PubMedQA's {pmid: {...}}
    layout), decoded one member at a time so that a problem inside a member can name its line."""
    # A syntax check of the whole document first: its errors carry the line.
    _loads(text, path, 1, unique_keys=False)
    if not text.lstrip().startswith("{"):
        raise _error(path, 1,
                     "expected a JSON object ({id: record, ...}) or one JSON object per line")
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    # In valid JSON only whitespace, ',' and ':' sit between keys and values.
    separators = re.compile(r"[\s,:]*")
    pos = text.index("{") + 1  # just after the opening brace
    line = 1  # the line that `pos` is on
    counted = 0  # the newlines before this position are already counted in `line`
    first_line_of = {}
    while True:
        pos = separators.match(text, pos).end()
        if text[pos] == "}":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        key, pos = decoder.raw_decode(text, pos)
        try:
            value, pos = decoder.raw_decode(text, separators.match(text, pos).end())
        except ValueError as e:
            raise _error(path, line, str(e)) from None
        if key in first_line_of:
            raise _error(path, line, f"duplicate key {key!r} (first on line {first_line_of[key]})")
        first_line_of[key] = line
        yield line, key, value


def _get(obj: dict, key: str, kind, where, optional=False):
    """obj[key] checked for presence and type; `where` = (path, line) for the error."""
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise _error(*where, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        got = f"{type(value).__name__} {str(value)[:40]!r}"
        raise _error(*where, f"field {key!r} should be {want}, got {got}")
    return value


# ---- One converter per schema: raw object -> record fields (checked later, in one place) ---------

def _from_medqa(obj: dict, where) -> dict:
    """MedQA-USMLE, and MMLU-Pro as medagents-benchmark ships it (`realidx`, `src`)."""
    rec = {"question": _get(obj, "question", str, where),
           "options": _get(obj, "options", dict, where),
           "answer": _get(obj, "answer_idx", str, where), "meta": {}}
    # The gold option's text: a free consistency check.
    answer_text = _get(obj, "answer", str, where, optional=True)
    gold_text = rec["options"].get(rec["answer"])
    if (answer_text is not None and isinstance(gold_text, str)
            and gold_text.strip() != answer_text.strip()):
        raise _error(*where, f"answer_idx {rec['answer']!r} names {gold_text!r}, "
                             f"but field 'answer' says {answer_text!r}")
    rec["source"] = "mmlu_pro" if "realidx" in obj else "medqa"
    if "realidx" in obj:
        rec["id"] = f"mmlu_pro-{_get(obj, 'realidx', (int, str), where)}"
    if "meta_info" in obj:
        rec["meta"]["step"] = _get(obj, "meta_info", str, where)  # "step1" | "step2&3"
    if "src" in obj:
        rec["meta"]["subject"] = _get(obj, "src", str, where)  # e.g. "ori_mmlu-virology"
    return rec


def _from_mmlu_pro(obj: dict, where) -> dict:
    """MMLU-Pro's own schema: options as a list, gold as a 0-based `answer_index` and a letter
    `answer`."""
    options = _get(obj, "options", list, where)
    index = _get(obj, "answer_index", int, where)
    if not 0 <= index < len(options):
        raise _error(*where, f"answer_index {index} is outside the {len(options)} options")
    letter = _get(obj, "answer", str, where, optional=True)
    if letter is not None and letter != LETTERS[index]:
        raise _error(*where, f"answer {letter!r} disagrees with answer_index {index} "
                             f"({LETTERS[index]!r})")
    return {"id": f"mmlu_pro-{_get(obj, 'question_id', (int, str), where)}", "source": "mmlu_pro",
            "question": _get(obj, "question", str, where), "options": dict(zip(LETTERS, options)),
            "answer": LETTERS[index], "meta": {"subject": _get(obj, "src", str, where)}}


def _from_medmcqa(obj: dict, where) -> dict:
    cop = _get(obj, "cop", int, where)
    # This release counts from 1 (its explanations say "Ans-a" where cop == 1).
    if cop not in (1, 2, 3, 4):
        raise _error(*where, f"cop must be 1-4 (1 = opa), got {cop}")
    meta = {"subject": obj.get("subject_name"), "choice_type": obj.get("choice_type")}
    return {"id": f"medmcqa-{_get(obj, 'id', str, where)}", "source": "medmcqa",
            "question": _get(obj, "question", str, where),
            "options": {letter: _get(obj, f"op{letter.lower()}", str, where)
                        for letter in "ABCD"},
            "answer": "ABCD"[cop - 1], "meta": meta}


def _from_generic(obj: dict, where) -> dict:
    rec = {"question": _get(obj, "question", str, where),
           "options": _get(obj, "options", dict, where),
           "answer": _get(obj, "answer", str, where),
           "meta": _get(obj, "meta", dict, where, optional=True) or {}}
    if obj.get("id") is not None:
        rec["id"] = str(_get(obj, "id", (str, int), where))
    if obj.get("source") is not None:
        rec["source"] = _get(obj, "source", str, where)
    return rec


# The field that tells each JSON-lines schema apart, checked in this order.
_SCHEMAS = (("opa", _from_medmcqa), ("answer_index", _from_mmlu_pro), ("answer_idx", _from_medqa),
            ("answer", _from_generic))


def _jsonl_records(text: str, path):
    """One JSON object a line. The schema is chosen once, from the first record, so a later broken
    line gets a precise message ("missing field 'answer_idx'") rather than "unknown format".
    split("\\n"), not splitlines(): JSON strings may hold U+2028, which splitlines() takes for a
    line break."""
    convert = None
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        obj = _loads(raw, path, line)
        if not isinstance(obj, dict):
            raise _error(path, line,
                         f"expected a JSON object on this line, got {type(obj).__name__}")
        convert = convert or next((converter for key, converter in _SCHEMAS if key in obj),
                                  None)
        if convert is None:
            raise _error(path, line, f"unrecognised record with fields {sorted(obj)}; "
                                     "expected MedQA (options, answer_idx), MMLU-Pro (options "
                                     "list, answer_index), MedMCQA (opa..opd, cop) or generic "
                                     "(question, options, answer)")
        yield line, convert(obj, (path, line))


def _mmlu_csv_records(text: str, path: Path):
    subject = re.sub(r"_(test|dev|val)$", "", path.stem)  # anatomy_test.csv -> "anatomy"
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    # A quoted field may span lines: a row starts on the line after the previous row ended.
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != 6:
                raise _error(path, line, f"CSV row has {len(row)} columns, expected 6 "
                                         "(question, A, B, C, D, answer letter; no header row)")
            yield line, {"question": row[0], "options": dict(zip("ABCD", row[1:5])),
                         "answer": row[5].strip(), "source": "mmlu", "meta": {"subject": subject}}
    except csv.Error as e:
        raise _error(path, start, f"malformed CSV: {e}") from None


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


def _pubmedqa_records(text: str, path: Path):
    """Each PubMedQA item becomes: question = "Context: <abstract>\\nQuestion: <question>",
    options yes / no / maybe. Labels: the item's final_decision, checked against
    test_ground_truth.json if present."""
    truth_path = path.with_name("test_ground_truth.json")
    truth = {}
    if truth_path.exists() and truth_path.resolve() != path.resolve():
        truth_members = _json_members(_read_text(truth_path), truth_path)
        truth = {pmid: label for _, pmid, label in truth_members}
    for line, pmid, item in _json_members(text, path):
        where = (path, line)
        if not isinstance(item, dict):
            hint = " (a label file? load test_set.json next to it)" if isinstance(item, str) else ""
            raise _error(path, line, "expected PubMedQA's "
                                     "{pmid: {QUESTION, CONTEXTS, final_decision}}, "
                                     f"but {pmid!r} maps to {type(item).__name__}{hint}")
        contexts = _get(item, "CONTEXTS", list, where)
        if not all(isinstance(c, str) for c in contexts):
            raise _error(path, line, "field 'CONTEXTS' should be a list of str")
        decision = _get(item, "final_decision", str, where, optional=True) or truth.get(pmid)
        if decision is None:
            raise _error(path, line,
                         f"no final_decision for {pmid!r}, and no label in {truth_path.name}")
        if pmid in truth and truth[pmid] != decision:
            raise _error(path, line, f"final_decision {decision!r} disagrees with "
                                     f"{truth_path.name} ({truth[pmid]!r})")
        yield line, pubmedqa_fields(pmid, _get(item, "QUESTION", str, where), contexts, decision,
                                    item.get("YEAR"), where)


def pubmedqa_fields(pmid: str, question: str, contexts: list, decision: str, year, where) -> dict:
    """One PubMedQA item as record fields (hub.py builds the Hub's copy with it too)."""
    letter_of = {option: letter for letter, option in PUBMEDQA_OPTIONS.items()}
    if decision not in letter_of:
        raise _error(*where, f"final_decision should be yes, no or maybe, got {decision!r}")
    abstract = " ".join(c.strip() for c in contexts)
    return {"id": f"pubmedqa-{pmid}", "source": "pubmedqa",
            "question": f"Context: {abstract}\nQuestion: {question}",
            "options": dict(PUBMEDQA_OPTIONS), "answer": letter_of[decision],
            "meta": {"pmid": pmid, "year": year}}


# ---- load_mcqa: format detection, the checks every record must pass, ids ---------------------

def _check(rec: dict, path, line: int) -> dict:
    """The rules every record obeys, whatever its source; strips surrounding whitespace from
    texts."""
    question, options, answer = rec["question"].strip(), rec["options"], rec["answer"]
    if not question:
        raise _error(path, line, "empty question")
    if len(options) < 2:
        raise _error(path, line, f"{len(options)} option(s); a question needs at least two")
    if "".join(options) != LETTERS[: len(options)]:
        raise _error(path, line, f"option letters {''.join(options)} should be "
                                 f"{LETTERS[:len(options)]} (A, B, ... in order)")
    for letter, text in options.items():
        if not isinstance(text, str):
            raise _error(path, line, f"option {letter} should be str, got {type(text).__name__}")
        if not text.strip():
            raise _error(path, line, f"option {letter} is empty")
    if answer not in options:
        raise _error(path, line,
                     f"gold answer {answer!r} is not among the options {''.join(options)}")
    return {"id": rec["id"], "question": question,
            "options": {letter: text.strip() for letter, text in options.items()},
            "answer": answer, "source": rec["source"], "meta": rec["meta"]}


def _is_json_document(text: str) -> bool:
    """True for one JSON object spanning the file ({pmid: item, ...}: PubMedQA), False for JSON
    lines."""
    try:
        # JSON lines fail fast here: "Extra data" right after the first line.
        whole = json.loads(text)
    except (ValueError, RecursionError):
        # Broken either way; a lone "{" on the first line means a document.
        return next(line.strip() for line in text.split("\n") if line.strip()) == "{"
    # A dict with record fields is a one-line jsonl file, not a document.
    return isinstance(whole, dict) and not {"question", "options"} & set(whole)


def load_mcqa(path, stem: str | None = None) -> list[dict]:
    """All records of one file, in file order. `stem` stands in for the file's own name in the
    default ids and sources (a Hub copy of a file under another name keeps the local ids).

    Raises DataError("file:line: problem") on any bad input."""
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() == ".csv":
        numbered_records = _mmlu_csv_records(text, path)
    elif _is_json_document(text):
        numbered_records = _pubmedqa_records(text, path)
    else:
        numbered_records = _jsonl_records(text, path)
    return check_records(numbered_records, path, stem or path.stem)


def check_records(numbered_records, path, stem: str) -> list[dict]:
    """(line, fields) pairs -> checked records with unique ids; `path` and the line (a parquet
    file's row) name the place of any problem."""
    records, line_of_id = [], {}
    for line, fields in numbered_records:
        fields.setdefault("source", stem)
        # "medqa_test-17": line 17 of medqa's test file.
        fields.setdefault("id", f"{fields['source']}_{stem}-{line}")
        record = _check(fields, path, line)
        if record["id"] in line_of_id:
            raise _error(path, line, f"duplicate id {record['id']!r} "
                                     f"(first on line {line_of_id[record['id']]})")
        line_of_id[record["id"]] = line
        records.append(record)
    if not records:
        raise _error(path, 1, "no records (only blank lines)")
    return records


# ---- load_dataset: a name -> the data folder, else the Hub (hub.py), else the embedded subset ---

DEFAULT_DATA_DIR = "~/.cache/medrlvr/data"  # used when neither data_dir nor MEDRLVR_DATA is given
MEDQA_ORIGIN = "github.com/jind11/MedQA, data_clean/questions/US/"
MEDQA4_ORIGIN = MEDQA_ORIGIN + "4_options/phrases_no_exclude_"
MMLU_MEDICAL_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                         "medical_genetics", "professional_medicine")
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
# The first records of three sets, committed in the data folder's layout (demo_data/README.md): what
# a newcomer gets with neither a data folder nor the Hub. name -> (the set, its full size).
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
        files = tuple(root / relative / f"{subject}_test.csv" for subject in MMLU_MEDICAL_SUBJECTS)
    missing = [path for path in files if not path.exists()]
    if not missing:
        return Source(f"data folder {root / relative}", files)
    import hub  # only here: hub.py builds on this module's converters
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
    count = sum(1 for line in _read_text(path).split("\n") if line.strip())
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
        import hub
        return hub.read(source.hub_name, source.paths)
    return [record for path in source.paths for record in load_mcqa(path)]


def source_of(name_or_path: str, data_dir: str | None = None) -> str:
    """Where load_dataset reads from, for a run's log: "data folder <path>", "Hub <repo>@<commit>
    <file>" or "embedded demo subset (200 of 1272) <path>"."""
    return _locate(name_or_path, data_dir).description


# ---- Prompts -------------------------------------------------------------------------------------

# The study's template, DeepSeek-R1's text, exactly. R1_INSTRUCTION is its first paragraph alone,
# the system message of the chat variant.
R1_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think><answer> answer here </answer>."
)
R1_TEMPLATE = R1_INSTRUCTION + "\nUser: {input}\nAssistant:"
ANSWER_INSTRUCTION = "Answer with just one of the letters from the options below."
COT_INSTRUCTION = ('Think step by step, then finish with "The answer is X", '
                   "where X is the letter of the correct option.")

# style -> the text the prompt already put into the assistant's mouth. The verifier always sees
# PROMPT_PREFILL[style] + generated_text, so a prefilled "<think>" still counts as the response's
# own.
PROMPT_PREFILL = {
    # The study's prompt: ends "Assistant:", the model must open <think> itself.
    "r1": "",
    # The same, ending "Assistant: <think>": helps a small base model find the format.
    "r1_think": "<think>",
    # Instruct models: chat template, system = R1 instruction, the reply starts <think>.
    "r1_chat": "<think>",
    # r1_chat after one worked example (the CPU demo: a 135M model needs it).
    "r1_chat_1shot": "<think>",
    # The study's direct-answer baseline and SFT format: "...\nAnswer:" -> " B".
    "direct": "",
    # A direct answer through an instruct model's chat template.
    "direct_chat": "",
    # The study's chain-of-thought baseline: reason, then "The answer is X".
    "cot": "",
}
PROMPT_STYLES = tuple(PROMPT_PREFILL)


# The worked example of the r1_chat_1shot style (hand-written, in none of the benchmark sets).
# Without it a 135M instruct model almost never closes its <think> and opens <answer>, and RL has
# nothing to reinforce.
ONE_SHOT_RECORD = {"question": "A 24-year-old woman has itchy, watery eyes and sneezing every "
                               "spring. Which is the most appropriate first treatment?",
                   "options": {"A": "Oral prednisone", "B": "Intravenous antibiotics",
                               "C": "A nasal antihistamine spray", "D": "Surgery"}}
ONE_SHOT_ANSWER = ("<think> Seasonal itching, tearing and sneezing point to allergic rhinitis. "
                   "Steroids by mouth, antibiotics and surgery are not first-line; a topical "
                   "antihistamine is. </think><answer> C </answer>")


def format_question(record: dict) -> str:
    """The study's {input}: the question, the answer instruction, then one "A. text" line per
    option."""
    lines = [record["question"], ANSWER_INSTRUCTION]
    lines += [f"{letter}. {text}" for letter, text in record["options"].items()]
    return "\n".join(lines)


def _chat(tokenizer, messages: list[dict], style: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt style {style!r} needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt(record: dict, style: str = "r1", tokenizer=None) -> str:
    """The prompt text for one record.

    The SFT target of the "direct" style is " " + record["answer"]."""
    question = format_question(record)
    if style == "r1":
        return R1_TEMPLATE.format(input=question)
    if style == "r1_think":
        return R1_TEMPLATE.format(input=question) + " <think>"
    if style == "r1_chat":
        text = _chat(tokenizer, [{"role": "system", "content": R1_INSTRUCTION},
                                 {"role": "user", "content": question}], style)
        # Some templates (reasoning models) already open the think block; never write it twice.
        return text if text.rstrip().endswith("<think>") else text + "<think>"
    if style == "r1_chat_1shot":
        text = _chat(tokenizer, [{"role": "system", "content": R1_INSTRUCTION},
                                 {"role": "user", "content": format_question(ONE_SHOT_RECORD)},
                                 {"role": "assistant", "content": ONE_SHOT_ANSWER},
                                 {"role": "user", "content": question}], style)
        return text if text.rstrip().endswith("<think>") else text + "<think>"
    if style == "direct":
        return f"{question}\nAnswer:"
    if style == "direct_chat":
        return _chat(tokenizer, [{"role": "user", "content": question}], style)
    if style == "cot":
        return f"{question}\n{COT_INSTRUCTION}\nAnswer: Let's think step by step."
    raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")


# ---- Option shuffling, train order, tokenization -------------------------------------------------

# "All of the above", "Both A and B": options that point at other options' places lose their meaning
# when the places move, so such a question keeps its order.
_POINTS_AT_OPTIONS = re.compile(r"(?i)\b(all|none|both|neither) of (the )?(above|these|following)\b"
                                r"|\b[a-j](\s*[,&]\s*|\s+(and|or)\s+)[a-j]\b")


def shuffle_options(record: dict, seed: int) -> dict:
    """A copy of `record` with its options in a seeded random order; the gold letter follows its
    text. The order depends on (seed, record id) only, not on where the record sits in a list;
    meta["original_letters"] maps the new letters back to the old ones."""
    # order[i]: the old letter of the option that becomes LETTERS[i].
    order = list(record["options"])
    if not any(_POINTS_AT_OPTIONS.search(text) for text in record["options"].values()):
        random.Random(f"shuffle:{seed}:{record['id']}").shuffle(order)
    return {**record,
            "options": {LETTERS[i]: record["options"][letter] for i, letter in enumerate(order)},
            "answer": LETTERS[order.index(record["answer"])],
            "meta": {**record["meta"], "original_letters": "".join(order)}}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of range(n): a different order each epoch, the same on every rerun."""
    order = list(range(n))
    random.Random(f"epoch_order:{seed}:{epoch}").shuffle(order)
    return order


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int | None):
    """Token ids of `prompts`, LEFT padded (generation appends on the right, so every row's last
    prompt token sits in the same column). Prompts longer than max_prompt_tokens are left out,
    never cut: a cut question is a different question. Their indices come back in `skipped` for
    the caller to report, and a warning logs the count.

    Returns (input_ids [B, P] long, attention_mask [B, P] long, kept: list[int],
    skipped: list[int])."""
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else tokenizer.eos_token_id)
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
    bos_token = getattr(tokenizer, "bos_token", None)
    kept_ids, kept, skipped = [], [], []
    for index, prompt in enumerate(prompts):
        # A chat template already wrote the BOS token into the text: do not add a second one.
        add_special = not (bos_token and prompt.startswith(bos_token))
        ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            skipped.append(index)
        else:
            kept.append(index)
            kept_ids.append(ids)
    if skipped:
        log.warning("tokenize_prompts: left out %d of %d prompts longer than %d tokens",
                    len(skipped), len(prompts), max_prompt_tokens)
    width = max((len(ids) for ids in kept_ids), default=0)
    input_ids = torch.full((len(kept_ids), width), pad_id, dtype=torch.long)  # [B, P]
    attention_mask = torch.zeros((len(kept_ids), width), dtype=torch.long)  # [B, P]
    for row, ids in enumerate(kept_ids):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask, kept, skipped
