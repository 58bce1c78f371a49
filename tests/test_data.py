"""data.py: every loader on the real benchmark files, every bad-input message, prompts byte for
byte, option shuffling, train order and left-padded tokenization."""
import collections
import json
import logging
import re
import string
import traceback

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import sources
from data import DataError

# ---------------------------------------------------------------------------------------------
# Real files: exact counts
# ---------------------------------------------------------------------------------------------

# name -> (records, {number of options: how many questions})
REAL_COUNTS = {
    "medqa_dev": (1272, {4: 1272}),
    "medqa_test": (1273, {4: 1273}),
    "medqa5_dev": (1272, {5: 1272}),
    "medqa5_test": (1273, {5: 1273}),
    "mmlu_pro_health": (818, {10: 597, 4: 72, 9: 67, 8: 42, 7: 21, 5: 8, 6: 8, 3: 3}),
    "medmcqa_dev": (4183, {4: 4183}),
    "mmlu_medical": (1089, {4: 1089}),
    "pubmedqa": (500, {3: 500}),
}


@pytest.fixture(scope="module")
def real(data_dir):
    """Each named dataset loaded once for the whole module, from MEDRLVR_DATA (data_dir: skipped
    without it)."""
    return {name: sources.load_dataset(name) for name in REAL_COUNTS}


@pytest.mark.parametrize("name", REAL_COUNTS)
def test_real_dataset_counts(real, name):
    records = real[name]
    count, option_counts = REAL_COUNTS[name]
    assert len(records) == count
    assert dict(collections.Counter(len(record["options"]) for record in records)) == option_counts
    assert len({record["id"] for record in records}) == count  # ids unique
    for record in records:
        assert set(record) == {"id", "question", "options", "answer", "source", "meta"}
        assert record["answer"] in record["options"] and record["question"]


def test_real_dataset_details(real, data_dir):
    medqa = real["medqa_test"]
    assert medqa[16]["id"] == "medqa_test-17" and medqa[0]["source"] == "medqa"
    steps = collections.Counter(record["meta"]["step"] for record in medqa)
    assert steps == {"step1": 679, "step2&3": 594}
    steps = collections.Counter(record["meta"]["step"] for record in real["medqa_dev"])
    assert steps == {"step1": 701, "step2&3": 571}
    # The 4- and 5-option files hold the same questions on the same lines: same ids, same gold
    # text.
    for four, five in zip(medqa, real["medqa5_test"]):
        assert four["id"] == five["id"]
        assert four["options"][four["answer"]] == five["options"][five["answer"]]

    pro = real["mmlu_pro_health"]
    assert pro[0]["id"] == "mmlu_pro-6001" and pro[0]["meta"] == {"subject": "ori_mmlu-virology"}
    subjects = collections.Counter(record["meta"]["subject"] for record in pro)
    assert subjects["ori_mmlu-professional_medicine"] == 254

    medmcqa = real["medmcqa_dev"]
    answers = collections.Counter(record["answer"] for record in medmcqa)
    assert answers == {"A": 1348, "B": 1085, "C": 925, "D": 825}
    assert medmcqa[0]["answer"] == "A" and medmcqa[0]["meta"]["subject"] == "Physiology"

    mmlu = real["mmlu_medical"]
    assert collections.Counter(record["meta"]["subject"] for record in mmlu) == {
        "anatomy": 135, "clinical_knowledge": 265, "college_biology": 144, "college_medicine": 173,
        "medical_genetics": 100, "professional_medicine": 272}
    assert mmlu[0]["id"] == "mmlu_anatomy_test-1" and mmlu[0]["answer"] == "A"

    pubmed = real["pubmedqa"]
    gold_texts = collections.Counter(record["options"][record["answer"]] for record in pubmed)
    assert gold_texts == {"yes": 276, "no": 169, "maybe": 55}
    assert pubmed[0]["id"] == "pubmedqa-12377809"
    assert pubmed[0]["options"] == {"A": "yes", "B": "no", "C": "maybe"}
    assert pubmed[0]["question"].startswith("Context: Dyschesia can be provoked")
    assert pubmed[0]["question"].endswith(
        "\nQuestion: Is anorectal endosonography valuable in dyschesia?")

    # The 1000 expert-labelled items.
    labelled = data.load_mcqa(data_dir / "pubmedqa/ori_pqal.json")
    assert len(labelled) == 1000
    answers = collections.Counter(record["answer"] for record in labelled)
    assert answers == {"A": 552, "B": 338, "C": 110}
    assert len(data.load_mcqa(data_dir / "mmlu_pro_health/validation_5shot.jsonl")) == 5


def test_mmlu_pro_two_schemas_agree_except_two_questions(real, data_dir):
    tiger = data.load_mcqa(data_dir / "mmlu_pro_health/test.tiger_2024-07.jsonl")
    assert len(tiger) == 818
    assert collections.Counter(len(record["options"]) for record in tiger)[10] == 598
    ours = {record["id"]: record for record in real["mmlu_pro_health"]}
    differ = {}
    for theirs in tiger:
        mine = ours[theirs["id"]]
        fields = ("question", "options", "answer", "meta")
        if tuple(theirs[field] for field in fields) != tuple(mine[field] for field in fields):
            differ[theirs["id"]] = (theirs, mine)
    # 6392 (herpes drugs): the answer was corrected from D (Azidothymidine) to B (Acyclovir).
    # 6047: medagents-benchmark's file holds a different question altogether (myasthenia gravis,
    # 7 options) from MMLU-Pro's (Lambert-Eaton, 10 options), both answered
    # "presynaptic/postsynaptic junction".
    assert set(differ) == {"mmlu_pro-6392", "mmlu_pro-6047"}
    tiger_6392, ours_6392 = differ["mmlu_pro-6392"]
    assert (tiger_6392["answer"], ours_6392["answer"]) == ("D", "B")
    assert tiger_6392["options"] == ours_6392["options"]
    assert tiger_6392["question"] == ours_6392["question"]


# ---------------------------------------------------------------------------------------------
# Bad input: file, line and problem in one clear message
# ---------------------------------------------------------------------------------------------

GOOD = {"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "A", "meta_info": "step1"}


def medqa_line(**change):
    return json.dumps({k: v for k, v in {**GOOD, **change}.items() if v is not None})


MEDMCQA = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1, "id": "x1"}
PRO = {"question_id": 1, "question": "Q?", "options": ["a", "b", "c"], "answer": "A",
       "answer_index": 0, "src": "s"}

# (file name, content, line the message must name, words it must contain)
BAD = {
    "malformed json": ("q.jsonl", medqa_line() + '\n{"question": "Q", "options": \n', 2,
                       ["malformed JSON"]),
    "missing field": ("q.jsonl", medqa_line() + "\n" + medqa_line(answer_idx=None), 2,
                      ["missing field 'answer_idx'"]),
    "gold not an option": ("q.jsonl", medqa_line() + "\n" + medqa_line(answer_idx="E"), 2,
                           ["gold answer 'E' is not among the options AB"]),
    "one option": ("q.jsonl", medqa_line(options={"A": "x"}), 1, ["1 option(s)", "at least two"]),
    "no options": ("q.jsonl", medqa_line(options={}), 1, ["0 option(s)"]),
    "empty question": ("q.jsonl", medqa_line() + "\n\n" + medqa_line(question="  \n "), 3,
                       ["empty question"]),
    "duplicate option letter": ("q.jsonl", '{"question": "Q", "options": '
                                           '{"A": "x", "B": "y", "B": "z"}, "answer_idx": "A"}',
                                1, ["duplicate key 'B'"]),
    "question not str": ("q.jsonl", medqa_line(question=42), 1,
                         ["field 'question' should be str, got int"]),
    "options a list": ("q.jsonl", medqa_line(options=["x", "y"]), 1,
                       ["field 'options' should be dict, got list"]),
    "option not str": ("q.jsonl", medqa_line(options={"A": 1, "B": "y"}), 1,
                       ["option A should be str, got int"]),
    "option empty": ("q.jsonl", medqa_line(options={"A": " ", "B": "y"}), 1,
                     ["option A is empty"]),
    "letters out of order": ("q.jsonl", medqa_line(options={"A": "x", "C": "y"}), 1,
                             ["option letters AC should be AB"]),
    "answer text disagrees": ("q.jsonl", medqa_line(answer="y"), 1,
                              ["answer_idx 'A' names 'x'", "'answer' says 'y'"]),
    "line not an object": ("q.jsonl", medqa_line() + "\n[1, 2]", 2,
                           ["expected a JSON object", "list"]),
    "unknown schema": ("q.jsonl", '{"foo": 1}\n{"foo": 2}', 1, ["unrecognised record", "['foo']"]),
    "duplicate id": ("q.jsonl",
                     '{"id": "q1", "question": "Q", "options": {"A": "x", "B": "y"}, '
                     '"answer": "A"}\n\n'
                     '{"id": "q1", "question": "R", "options": {"A": "x", "B": "y"}, '
                     '"answer": "B"}', 3,
                     ["duplicate id 'q1' (first on line 1)"]),
    "generic answer not a letter": ("q.jsonl",
                                    '{"question": "Q", "options": {"A": "x", "B": "y"}, '
                                    '"answer": "x"}',
                                    1, ["gold answer 'x' is not among the options AB"]),
    "empty file": ("q.jsonl", "", 1, ["file is empty"]),
    "blank lines only": ("q.jsonl", "\n  \n\n", 1, ["file is empty"]),
    "not utf-8": ("q.jsonl", medqa_line().encode() + b"\n\xff\xfe garbage\n", 2,
                  ["not UTF-8", "0xff"]),
    # 0x80 follows one b"\n".
    "binary garbage": ("q.jsonl", bytes(range(256)) * 3, 2, ["not UTF-8", "0x80"]),
    "nul bytes": ("q.jsonl", b'{"a": 1}\n\x00\x00\x01', 2, ["NUL byte"]),
    "nested too deep": ("q.jsonl", "[" * 200_000, 1, ["nested too deeply"]),
    "medmcqa cop 0": ("m.json", json.dumps({**MEDMCQA, "cop": 0}), 1,
                      ["cop must be 1-4", "got 0"]),
    "medmcqa cop str": ("m.json", json.dumps({**MEDMCQA, "cop": "1"}), 1,
                        ["field 'cop' should be int, got str"]),
    "medmcqa missing opd": ("m.json",
                            json.dumps({k: v for k, v in MEDMCQA.items() if k != "opd"}), 1,
                            ["missing field 'opd'"]),
    "mmlu-pro letter vs index": ("p.jsonl", json.dumps({**PRO, "answer": "B"}), 1,
                                 ["answer 'B' disagrees with answer_index 0"]),
    "mmlu-pro index range": ("p.jsonl", json.dumps({**PRO, "answer_index": 7, "answer": None}), 1,
                             ["answer_index 7 is outside the 3 options"]),
    "csv too few columns": ("anatomy_test.csv", "Q,a,b,c,d,A\nQ2,a,b,c\n", 2,
                            ["4 columns, expected 6"]),
    "csv bad letter": ("anatomy_test.csv", "Q,a,b,c,d,A\nQ2,a,b,c,d,E\n", 2, ["gold answer 'E'"]),
    "csv header row": ("anatomy_test.csv",
                       "question,choice0,choice1,choice2,choice3,answer\nQ,a,b,c,d,A\n", 1,
                       ["gold answer 'answer'"]),
    "csv bad quoting": ("anatomy_test.csv", 'Q,a,b,c,d,A\n"Q2"x,a,b,c,d,A\n', 2,
                        ["malformed CSV"]),
    "csv row after multi-line field": ("anatomy_test.csv", '"Q\non two lines",a,b,c,d,A\nQ2,a,b\n',
                                       3, ["3 columns, expected 6"]),
    "csv empty question": ("anatomy_test.csv", " ,a,b,c,d,A\n", 1, ["empty question"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_message(tmp_path, case):
    name, content, line, words = BAD[case]
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(DataError) as err:
        data.load_mcqa(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    for word in words:
        assert word in message, message
    assert isinstance(err.value, ValueError)
    # One clear line, not json's or csv's internals chained underneath.
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__
    assert "Traceback" not in "".join(traceback.format_exception_only(err.value))


def pubmed_doc(items: dict) -> str:
    return json.dumps(items, indent=4)


def pubmed_item(**change):
    item = {"QUESTION": "Does it?", "CONTEXTS": ["One.", "Two."], "final_decision": "yes",
            "YEAR": "2001"}
    return {field: value for field, value in {**item, **change}.items() if value is not None}


def line_of_key(text: str, key: str) -> int:
    return text.split("\n").index(f'    "{key}": {{') + 1


def test_pubmedqa_bad_input(tmp_path):
    path = tmp_path / "set.json"
    cases = [
        ({"1": pubmed_item(), "2": pubmed_item(QUESTION=None)}, "2", "missing field 'QUESTION'"),
        ({"1": pubmed_item(), "2": pubmed_item(final_decision="perhaps")}, "2",
         "yes, no or maybe, got 'perhaps'"),
        ({"1": pubmed_item(), "2": pubmed_item(final_decision=None)}, "2",
         "no final_decision for '2'"),
        ({"1": pubmed_item(CONTEXTS="One.")}, "1", "field 'CONTEXTS' should be list"),
    ]
    for items, bad_key, words in cases:
        text = pubmed_doc(items)
        path.write_text(text)
        with pytest.raises(DataError) as err:
            data.load_mcqa(path)
        assert str(err.value).startswith(f"{path}:{line_of_key(text, bad_key)}: ")
        assert words in str(err.value)

    # A syntax error names its own line; a duplicate pmid names the second one and the first.
    text = pubmed_doc({"1": pubmed_item(), "2": pubmed_item()})
    # A trailing comma inside the first item's CONTEXTS.
    broken = text.replace('"Two."\n', '"Two.",\n', 1)
    path.write_text(broken)
    syntax_line = broken.split("\n").index("        ],") + 1  # where json finds the value missing
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{syntax_line}: malformed JSON"):
        data.load_mcqa(path)
    path.write_text(text.replace('"2": {', '"1": {'))
    duplicate = (rf"^{re.escape(str(path))}:{line_of_key(text, '2')}: "
                 r"duplicate key '1' \(first on line 2\)")
    with pytest.raises(DataError, match=duplicate):
        data.load_mcqa(path)
    path.write_text(text.replace('"Does it?"', '"Does it?", "QUESTION": "Again?"', 1))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: duplicate key 'QUESTION'"):
        data.load_mcqa(path)


def test_pubmedqa_labels_from_ground_truth_file(tmp_path):
    (tmp_path / "test_set.json").write_text(pubmed_doc({"7": pubmed_item(final_decision=None),
                                                        "8": pubmed_item(final_decision=None)}))
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"7": "no", "8": "maybe"}))
    records = data.load_mcqa(tmp_path / "test_set.json")
    assert ([(record["id"], record["answer"]) for record in records]
            == [("pubmedqa-7", "B"), ("pubmedqa-8", "C")])
    (tmp_path / "one_line.json").write_text(json.dumps({"9": pubmed_item()}))  # not pretty-printed
    assert ([record["id"] for record in data.load_mcqa(tmp_path / "one_line.json")]
            == ["pubmedqa-9"])
    assert records[0]["question"] == "Context: One. Two.\nQuestion: Does it?"
    (tmp_path / "test_set.json").write_text(pubmed_doc({"7": pubmed_item(final_decision="yes")}))
    with pytest.raises(DataError, match="final_decision 'yes' disagrees with "
                                        "test_ground_truth.json \\('no'\\)"):
        data.load_mcqa(tmp_path / "test_set.json")
    with pytest.raises(DataError, match="'7' maps to str \\(a label file\\? load test_set.json"):
        data.load_mcqa(tmp_path / "test_ground_truth.json")


def test_generic_jsonl_and_missing_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [{"id": "a", "question": " Q1 ", "options": {"A": "x", "B": "y"}, "answer": "B",
              "source": "s", "meta": {"k": 1}},
             {"question": "Q2", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "C"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\r\n\n")
    first, second = data.load_mcqa(path)
    assert first == {"id": "a", "question": "Q1", "options": {"A": "x", "B": "y"}, "answer": "B",
                     "source": "s", "meta": {"k": 1}}
    assert second == {"id": "mine_mine-2", "question": "Q2",
                      "options": {"A": "x", "B": "y", "C": "z"}, "answer": "C",
                      "source": "mine", "meta": {}}
    with pytest.raises(DataError, match="nothere.jsonl:1: cannot read file"):
        data.load_mcqa(tmp_path / "nothere.jsonl")


# ---------------------------------------------------------------------------------------------
# sources.load_dataset: names and folders (tests/test_hub.py: a missing file, the Hub, the demo
# subset)
# ---------------------------------------------------------------------------------------------

def test_load_dataset_paths_and_errors(data_dir):
    assert len(sources.load_dataset("medqa_test", data_dir=str(data_dir))) == 1273
    assert len(sources.load_dataset(str(data_dir / "mmlu_medical/test"))) == 1089  # a folder
    assert len(sources.load_dataset(str(data_dir / "medqa/4_options/dev.jsonl"))) == 1272
    with pytest.raises(DataError, match="not a dataset name"):
        sources.load_dataset("medqa_tset")


# ---------------------------------------------------------------------------------------------
# Prompts, byte for byte
# ---------------------------------------------------------------------------------------------

QUESTION_1 = (
    "A junior orthopaedic surgery resident is completing a carpal tunnel repair with the "
    "department chairman as the attending physician. During the case, the resident inadvertently "
    "cuts a flexor tendon. The tendon is repaired without complication. The attending tells the "
    "resident that the patient will do fine, and there is no need to report this minor "
    "complication that will not harm the patient, as he does not want to make the patient worry "
    "unnecessarily. He tells the resident to leave this complication out of the operative report. "
    "Which of the following is the correct next action for the resident to take?\n"
    "Answer with just one of the letters from the options below.\n"
    "A. Disclose the error to the patient and put it in the operative report\n"
    "B. Tell the attending that he cannot fail to disclose this mistake\n"
    "C. Report the physician to the ethics committee\n"
    "D. Refuse to dictate the operative report"
)
R1_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think><answer> answer here </answer>."
)


def test_prompt_text_byte_for_byte(real):
    assert data.R1_TEMPLATE == R1_INSTRUCTION + "\nUser: {input}\nAssistant:"
    record = real["medqa_test"][0]
    assert record["answer"] == "B"
    assert data.format_question(record) == QUESTION_1
    assert (data.build_prompt(record, "r1")
            == R1_INSTRUCTION + "\nUser: " + QUESTION_1 + "\nAssistant:")
    assert (data.build_prompt(record, "r1_think")
            == R1_INSTRUCTION + "\nUser: " + QUESTION_1 + "\nAssistant: <think>")
    assert data.build_prompt(record, "direct") == QUESTION_1 + "\nAnswer:"
    assert data.build_prompt(record, "cot") == (
        QUESTION_1 + '\nThink step by step, then finish with "The answer is X", where X is the '
        "letter of the correct option.\nAnswer: Let's think step by step.")
    assert data.PROMPT_PREFILL == {"r1": "", "r1_think": "<think>", "r1_chat": "<think>",
                                   "r1_chat_1shot": "<think>", "direct": "", "direct_chat": "",
                                   "cot": ""}
    # Ten options end with "J. ..." (the study's own example goes up to F).
    ten = next(record for record in real["mmlu_pro_health"] if len(record["options"]) == 10)
    assert data.build_prompt(ten, "r1").split("\n")[-2].startswith("J. ")
    with pytest.raises(ValueError, match="unknown prompt style 'r2'"):
        data.build_prompt(record, "r2")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        data.build_prompt(record, "r1_chat")


# ---------------------------------------------------------------------------------------------
# A tiny character-level tokenizer, built here so this file depends on nothing else in the repo
# ---------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # One token a character.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                        special_tokens=[("<s>", 1)])
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_styles(real, char_tokenizer):
    record = real["medqa_test"][0]
    assert data.build_prompt(record, "r1_chat", char_tokenizer) == (
        "<s><|system|>" + R1_INSTRUCTION + "\n<|user|>" + QUESTION_1 + "\n<|assistant|><think>")
    assert (data.build_prompt(record, "direct_chat", char_tokenizer)
            == "<s><|user|>" + QUESTION_1 + "\n<|assistant|>")
    # A template that opens the think block itself (reasoning models) does not get a second one.
    char_tokenizer.chat_template = CHAT_TEMPLATE.replace("<|assistant|>", "<|assistant|><think>\n")
    try:
        prompt = data.build_prompt(record, "r1_chat", char_tokenizer)
    finally:
        char_tokenizer.chat_template = CHAT_TEMPLATE
    assert prompt.endswith("\n<|assistant|><think>\n")
    assert prompt.count("<think>") == 3  # two of them in the instruction


def test_tokenize_prompts_left_pads_and_returns_the_skipped(char_tokenizer, caplog):
    # The last already carries its BOS (as a chat template writes it).
    prompts = ["ab", "abcd", "x" * 50, "<s>abc"]
    with caplog.at_level(logging.DEBUG):
        ids, mask, kept, skipped = data.tokenize_prompts(char_tokenizer, prompts,
                                                         max_prompt_tokens=5)
    assert (kept, skipped) == ([0, 1, 3], [2])
    # The caller reports the skipped prompts in its run's log (experience.training_prompts), once:
    # tokenize_prompts logs nothing of its own.
    assert caplog.records == []
    # [B, P]: BOS + 4 characters.
    assert ids.dtype == torch.long and ids.shape == mask.shape == (3, 5)
    decoded = [char_tokenizer.decode(row[row_mask.bool()]) for row, row_mask in zip(ids, mask)]
    assert decoded == ["<s>ab", "<s>abcd", "<s>abc"]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert ids[0, :2].tolist() == [char_tokenizer.pad_token_id] * 2  # padding on the left
    assert ids[:, -1].tolist() == [char_tokenizer.convert_tokens_to_ids(c) for c in "bdc"]

    ids, mask, kept, skipped = data.tokenize_prompts(char_tokenizer, prompts,
                                                     max_prompt_tokens=None)
    assert ids.shape == (4, 51) and skipped == []
    ids, mask, kept, skipped = data.tokenize_prompts(char_tokenizer, ["abc"], max_prompt_tokens=2)
    assert ids.shape == (0, 0) and kept == [] and skipped == [0]


# ---------------------------------------------------------------------------------------------
# Shuffling and order
# ---------------------------------------------------------------------------------------------

def test_shuffle_options_keeps_gold_text(real):
    moved = 0
    for name in ("medqa_test", "mmlu_pro_health", "medmcqa_dev", "pubmedqa"):
        for record in real[name][:300]:
            shuffled = data.shuffle_options(record, seed=1)
            assert shuffled["options"][shuffled["answer"]] == record["options"][record["answer"]]
            assert sorted(shuffled["options"].values()) == sorted(record["options"].values())
            # Still A, B, C, ... in order.
            assert list(shuffled["options"]) == list(record["options"])
            for new, old in zip(shuffled["options"], shuffled["meta"]["original_letters"]):
                assert shuffled["options"][new] == record["options"][old]
            assert shuffled == data.shuffle_options(record, seed=1)  # seeded
            moved += shuffled["answer"] != record["answer"]
    assert moved > 600  # the gold letter really moves: most of 1200 questions
    ten = next(record for record in real["mmlu_pro_health"] if len(record["options"]) == 10)
    assert data.shuffle_options(ten, 1)["options"] != data.shuffle_options(ten, 2)["options"]
    assert "original_letters" not in ten["meta"]  # the input record is not changed

    # Options that point at other options keep their places.
    record = {"id": "x", "question": "Q",
              "options": {"A": "p", "B": "q", "C": "Both A and B", "D": "r"},
              "answer": "C", "source": "s", "meta": {}}
    assert all(data.shuffle_options(record, seed)["options"] == record["options"]
               for seed in range(5))
    record["options"]["C"] = "All of the above"
    assert data.shuffle_options(record, 3)["options"] == record["options"]
    record["options"]["C"] = "Spinal cord"  # "c or d" inside a word is no reference
    assert any(data.shuffle_options(record, seed)["options"] != record["options"]
               for seed in range(5))


def test_epoch_order():
    first = data.epoch_order(100, seed=0, epoch=0)
    assert sorted(first) == list(range(100))
    assert first == data.epoch_order(100, seed=0, epoch=0)
    assert first != data.epoch_order(100, seed=0, epoch=1)
    assert first != data.epoch_order(100, seed=1, epoch=0)
    assert data.epoch_order(0, 0, 0) == []


# ---------------------------------------------------------------------------------------------
# Whatever the bytes, load_mcqa returns records or raises DataError: never another exception
# ---------------------------------------------------------------------------------------------

FIELDS = ["question", "options", "answer", "answer_idx", "answer_index", "opa", "opb", "opc", "opd",
          "cop", "id", "question_id", "realidx", "src", "meta", "QUESTION", "CONTEXTS",
          "final_decision", "A", "B"]
json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 12) | st.text(max_size=8)
                           | st.sampled_from(["A", "B", "E", "yes", "maybe", ""]),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                               st.sampled_from(FIELDS), inner, max_size=6), max_leaves=12)
json_objects = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)
file_texts = st.one_of(
    st.lists(json_objects.map(json.dumps), min_size=1, max_size=4).map("\n".join),  # JSON lines
    st.dictionaries(st.text(max_size=4), json_objects, max_size=3).map(
        lambda document: json.dumps(document, indent=4)),
    st.lists(st.lists(st.text(max_size=6), max_size=7), max_size=4).map(
        lambda rows: "\n".join(",".join(row) for row in rows)),  # CSV-ish
    st.text(max_size=200),
).map(str.encode) | st.binary(max_size=200)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=file_texts, suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_any_input_gives_records_or_data_error(tmp_path, content, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    try:
        records = data.load_mcqa(path)
    except DataError as e:
        assert str(e).startswith(f"{path}:")
    else:
        for record in records:
            assert record["answer"] in record["options"] and len(record["options"]) >= 2
            assert record["question"].strip()
