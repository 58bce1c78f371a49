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
Which file a named benchmark ("medqa_dev") is read from, the data folder, the Hugging Face Hub or
the embedded demo subset, is sources.py's business; this file imports no other file of the project.

Bad input is never dropped or guessed around: it raises `DataError` with "file:line: problem".
Blank lines are skipped (they hold no record); every other line must be a valid record.
"""
import csv
import io
import json
import random
import re
from pathlib import Path

import torch

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A data file that cannot be read as multiple-choice questions.

    The message is always "file:line: problem"."""


def error_at(path, line: int, problem: str) -> DataError:
    """The DataError for a problem at `line` of `path` (a parquet file's row: hub.py)."""
    # Callers `raise error_at(...) from None` inside except blocks: the user sees one clear line,
    # not json's or csv's internal traceback.
    return DataError(f"{path}:{line}: {problem}")


# ---- Reading text and JSON with line numbers -----------------------------------------------------

def read_text(path: Path) -> str:
    """A text file's contents; a file that is unreadable, not UTF-8, binary or empty is a DataError
    naming its line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error_at(path, 1, f"cannot read file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate the byte-order mark spreadsheet tools write
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        problem = f"not UTF-8 text (byte 0x{raw[e.start]:02x}): binary or another encoding"
        raise error_at(path, line, problem) from None
    if "\x00" in text:  # valid UTF-8, but no text format holds NUL bytes
        raise error_at(path, text[: text.index("\x00")].count("\n") + 1,
                       "NUL byte: binary data, not text")
    if not text.strip():
        raise error_at(path, 1, "file is empty: no records")
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
        raise error_at(path, line + e.lineno - 1,
                       f"malformed JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:  # from _unique_keys
        raise error_at(path, line, str(e)) from None
    except RecursionError:
        raise error_at(path, line, "malformed JSON: nested too deeply") from None


def _json_members(text: str, path):
    """(line, key, value) for each member of a top-level JSON object (PubMedQA's {pmid: {...}}
    layout), decoded one member at a time so that a problem inside a member can name its line."""
    # A syntax check of the whole document first: its errors carry the line.
    _loads(text, path, 1, unique_keys=False)
    if not text.lstrip().startswith("{"):
        raise error_at(path, 1,
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
            raise error_at(path, line, str(e)) from None
        if key in first_line_of:
            raise error_at(path, line,
                           f"duplicate key {key!r} (first on line {first_line_of[key]})")
        first_line_of[key] = line
        yield line, key, value


def get_field(obj: dict, key: str, kind, where, optional=False):
    """obj[key] checked for presence and type; `where` = (path, line) for the error. `kind`: a type
    or a tuple of types; optional=True gives None for a missing or null field."""
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise error_at(*where, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        got = f"{type(value).__name__} {str(value)[:40]!r}"
        raise error_at(*where, f"field {key!r} should be {want}, got {got}")
    return value


# ---- One converter per schema: raw object -> record fields (checked later, in one place) ---------
# Each takes the raw object and `where` = (path, line) for its errors; hub.py reuses them on the Hub
# copies that kept a schema read here. check_records turns the fields into records.

def medqa_fields(obj: dict, where) -> dict:
    """MedQA-USMLE, and MMLU-Pro as medagents-benchmark ships it (`realidx`, `src`)."""
    rec = {"question": get_field(obj, "question", str, where),
           "options": get_field(obj, "options", dict, where),
           "answer": get_field(obj, "answer_idx", str, where), "meta": {}}
    # The gold option's text: a free consistency check.
    answer_text = get_field(obj, "answer", str, where, optional=True)
    gold_text = rec["options"].get(rec["answer"])
    if (answer_text is not None and isinstance(gold_text, str)
            and gold_text.strip() != answer_text.strip()):
        raise error_at(*where, f"answer_idx {rec['answer']!r} names {gold_text!r}, "
                               f"but field 'answer' says {answer_text!r}")
    rec["source"] = "mmlu_pro" if "realidx" in obj else "medqa"
    if "realidx" in obj:
        rec["id"] = f"mmlu_pro-{get_field(obj, 'realidx', (int, str), where)}"
    if "meta_info" in obj:
        rec["meta"]["step"] = get_field(obj, "meta_info", str, where)  # "step1" | "step2&3"
    if "src" in obj:
        rec["meta"]["subject"] = get_field(obj, "src", str, where)  # e.g. "ori_mmlu-virology"
    return rec


def mmlu_pro_fields(obj: dict, where) -> dict:
    """MMLU-Pro's own schema: options as a list, gold as a 0-based `answer_index` and a letter
    `answer`."""
    options = get_field(obj, "options", list, where)
    index = get_field(obj, "answer_index", int, where)
    if not 0 <= index < len(options):
        raise error_at(*where, f"answer_index {index} is outside the {len(options)} options")
    letter = get_field(obj, "answer", str, where, optional=True)
    if letter is not None and letter != LETTERS[index]:
        raise error_at(*where, f"answer {letter!r} disagrees with answer_index {index} "
                               f"({LETTERS[index]!r})")
    return {"id": f"mmlu_pro-{get_field(obj, 'question_id', (int, str), where)}",
            "source": "mmlu_pro", "question": get_field(obj, "question", str, where),
            "options": dict(zip(LETTERS, options)), "answer": LETTERS[index],
            "meta": {"subject": get_field(obj, "src", str, where)}}


def medmcqa_fields(obj: dict, where) -> dict:
    cop = get_field(obj, "cop", int, where)
    # This release counts from 1 (its explanations say "Ans-a" where cop == 1).
    if cop not in (1, 2, 3, 4):
        raise error_at(*where, f"cop must be 1-4 (1 = opa), got {cop}")
    meta = {"subject": obj.get("subject_name"), "choice_type": obj.get("choice_type")}
    return {"id": f"medmcqa-{get_field(obj, 'id', str, where)}", "source": "medmcqa",
            "question": get_field(obj, "question", str, where),
            "options": {letter: get_field(obj, f"op{letter.lower()}", str, where)
                        for letter in "ABCD"},
            "answer": "ABCD"[cop - 1], "meta": meta}


def generic_fields(obj: dict, where) -> dict:
    rec = {"question": get_field(obj, "question", str, where),
           "options": get_field(obj, "options", dict, where),
           "answer": get_field(obj, "answer", str, where),
           "meta": get_field(obj, "meta", dict, where, optional=True) or {}}
    if obj.get("id") is not None:
        rec["id"] = str(get_field(obj, "id", (str, int), where))
    if obj.get("source") is not None:
        rec["source"] = get_field(obj, "source", str, where)
    return rec


# The field that tells each JSON-lines schema apart, checked in this order.
_SCHEMAS = (("opa", medmcqa_fields), ("answer_index", mmlu_pro_fields),
            ("answer_idx", medqa_fields), ("answer", generic_fields))


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
            raise error_at(path, line,
                           f"expected a JSON object on this line, got {type(obj).__name__}")
        convert = convert or next((converter for key, converter in _SCHEMAS if key in obj),
                                  None)
        if convert is None:
            raise error_at(path, line, f"unrecognised record with fields {sorted(obj)}; "
                                       "expected MedQA (options, answer_idx), MMLU-Pro (options "
                                       "list, answer_index), MedMCQA (opa..opd, cop) or generic "
                                       "(question, options, answer)")
        yield line, convert(obj, (path, line))


# The named set mmlu_medical: the medical subjects of MMLU, one file each (sources.py, hub.py).
MMLU_MEDICAL_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                         "medical_genetics", "professional_medicine")


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
                raise error_at(path, line, f"CSV row has {len(row)} columns, expected 6 "
                                           "(question, A, B, C, D, answer letter; no header row)")
            yield line, {"question": row[0], "options": dict(zip("ABCD", row[1:5])),
                         "answer": row[5].strip(), "source": "mmlu", "meta": {"subject": subject}}
    except csv.Error as e:
        raise error_at(path, start, f"malformed CSV: {e}") from None


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


def _pubmedqa_records(text: str, path: Path):
    """Each PubMedQA item becomes: question = "Context: <abstract>\\nQuestion: <question>",
    options yes / no / maybe. Labels: the item's final_decision, checked against
    test_ground_truth.json if present."""
    truth_path = path.with_name("test_ground_truth.json")
    truth = {}
    if truth_path.exists() and truth_path.resolve() != path.resolve():
        truth_members = _json_members(read_text(truth_path), truth_path)
        truth = {pmid: label for _, pmid, label in truth_members}
    for line, pmid, item in _json_members(text, path):
        where = (path, line)
        if not isinstance(item, dict):
            hint = " (a label file? load test_set.json next to it)" if isinstance(item, str) else ""
            raise error_at(path, line, "expected PubMedQA's "
                                       "{pmid: {QUESTION, CONTEXTS, final_decision}}, "
                                       f"but {pmid!r} maps to {type(item).__name__}{hint}")
        contexts = get_field(item, "CONTEXTS", list, where)
        if not all(isinstance(c, str) for c in contexts):
            raise error_at(path, line, "field 'CONTEXTS' should be a list of str")
        decision = get_field(item, "final_decision", str, where, optional=True) or truth.get(pmid)
        if decision is None:
            raise error_at(path, line,
                           f"no final_decision for {pmid!r}, and no label in {truth_path.name}")
        if pmid in truth and truth[pmid] != decision:
            raise error_at(path, line, f"final_decision {decision!r} disagrees with "
                                       f"{truth_path.name} ({truth[pmid]!r})")
        question = get_field(item, "QUESTION", str, where)
        yield line, pubmedqa_fields(pmid, question, contexts, decision, item.get("YEAR"), where)


def pubmedqa_fields(pmid: str, question: str, contexts: list, decision: str, year, where) -> dict:
    """One PubMedQA item as record fields (hub.py builds the Hub's copy with it too)."""
    letter_of = {option: letter for letter, option in PUBMEDQA_OPTIONS.items()}
    if decision not in letter_of:
        raise error_at(*where, f"final_decision should be yes, no or maybe, got {decision!r}")
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
        raise error_at(path, line, "empty question")
    if len(options) < 2:
        raise error_at(path, line, f"{len(options)} option(s); a question needs at least two")
    if "".join(options) != LETTERS[: len(options)]:
        raise error_at(path, line, f"option letters {''.join(options)} should be "
                                   f"{LETTERS[:len(options)]} (A, B, ... in order)")
    for letter, text in options.items():
        if not isinstance(text, str):
            raise error_at(path, line, f"option {letter} should be str, got {type(text).__name__}")
        if not text.strip():
            raise error_at(path, line, f"option {letter} is empty")
    if answer not in options:
        raise error_at(path, line,
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
    text = read_text(path)
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
            raise error_at(path, line, f"duplicate id {record['id']!r} "
                                       f"(first on line {line_of_id[record['id']]})")
        line_of_id[record["id"]] = line
        records.append(record)
    if not records:
        raise error_at(path, 1, "no records (only blank lines)")
    return records


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
    the caller to report (experience.training_prompts logs the count in the run's log).

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
    width = max((len(ids) for ids in kept_ids), default=0)
    input_ids = torch.full((len(kept_ids), width), pad_id, dtype=torch.long)  # [B, P]
    attention_mask = torch.zeros((len(kept_ids), width), dtype=torch.long)  # [B, P]
    for row, ids in enumerate(kept_ids):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask, kept, skipped
