"""verifier.py case by case: every format rule, every answer form, the traps, the flags, its
speed, and hostile strings (odd gold labels and option tables, tags split by whitespace, long
repeated patterns)."""
import ast
import random
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier import Rules, compute_score, extract_letter, verify

OPTS = {"A": "Fluorometholone eye drops", "B": "Ketotifen eye drops",
        "C": "Latanoprost eye drops", "D": "Warm compresses"}
TEN = {k: f"option {k}" for k in "ABCDEFGHIJ"}  # an MMLU-Pro sized question


def tagged(answer, think=" thinking ", prefix=""):
    """A well-formed response around `answer`."""
    return f"{prefix}<think>{think}</think><answer>{answer}</answer>"


# (id, response, gold, options, the Rules fields that differ from the study's, the exact reward)
CASES = [
    # --- format: what holds
    ("ok", tagged("B"), "B", None, {}, 1.0),
    ("ok wrong letter", tagged("B"), "C", None, {}, 0.0),
    ("gold lower case", tagged("B"), "b", None, {}, 1.0),
    ("whitespace between and after", "<think>x</think> \n\t<answer>B</answer>\n \n", "B", None,
     {}, 1.0),
    ("empty think", "<think></think><answer>B</answer>", "B", None, {}, 1.0),
    ("empty answer: no letter", "<think>x</think><answer></answer>", "B", None, {}, 0.0),
    ("text before think allowed", tagged("B", prefix="Step 1: reasoning goes here. "), "B", None,
     {}, 1.0),
    ("text before think, strict", tagged("B", prefix="Step 1: reasoning goes here. "), "B", None,
     {"strict_format": True}, -1.0),
    ("whitespace before think, strict", tagged("B", prefix=" \n "), "B", None,
     {"strict_format": True}, 1.0),
    # --- format: what breaks it
    ("no tags at all", "B", "B", None, {}, -1.0),
    ("empty response", "", "B", None, {}, -1.0),
    ("missing <think>", "x</think><answer>B</answer>", "B", None, {}, -1.0),
    ("missing </think>", "<think>x<answer>B</answer>", "B", None, {}, -1.0),
    ("missing <answer>", "<think>x</think>B</answer>", "B", None, {}, -1.0),
    ("missing </answer>", "<think>x</think><answer>B", "B", None, {}, -1.0),
    ("two <think>", "<think><think>x</think><answer>B</answer>", "B", None, {}, -1.0),
    ("two </answer>", tagged("B") + "</answer>", "B", None, {}, -1.0),
    ("two full blocks", tagged("B") + tagged("B"), "B", None, {}, -1.0),
    ("nested think", "<think>a<think>b</think>c</think><answer>B</answer>", "B", None, {}, -1.0),
    ("answer before think", "<answer>B</answer><think>x</think>", "B", None, {}, -1.0),
    ("close before open", "</think>x<think><answer>B</answer>", "B", None, {}, -1.0),
    ("answer inside think", "<think>x<answer>B</answer></think>", "B", None, {}, -1.0),
    ("text between", "<think>x</think> so <answer>B</answer>", "B", None, {}, -1.0),
    ("text after", tagged("B") + " done", "B", None, {}, -1.0),
    ("EOS token left after", tagged("B") + "<|endoftext|>", "B", None, {}, -1.0),
    ("capitalised tag", "<Think>x</Think><answer>B</answer>", "B", None, {}, -1.0),
    ("upper-case tags", "<THINK>x</THINK><ANSWER>B</ANSWER>", "B", None, {}, -1.0),
    ("tag split by space", "< think>x</think><answer>B</answer>", "B", None, {}, -1.0),
    ("tag with trailing space", "<think >x</think><answer>B</answer>", "B", None, {}, -1.0),
    ("non-string None", None, "B", None, {}, -1.0),
    ("non-string int", 12, "B", None, {}, -1.0),
    ("non-string bytes", tagged("B").encode(), "B", None, {}, -1.0),
    # --- every accepted answer form (gold B)
    *[(f"form {a!r}", tagged(a), "B", OPTS, {}, 1.0) for a in [
        "B", "B.", "(B)", "B)", "[B]", " B \n", "B: Ketotifen eye drops",
        "B. Ketotifen eye drops", "B) Ketotifen", "(B) Ketotifen eye drops", "**B**",
        "**B. Ketotifen eye drops**", "Option B", "option B", "The answer is B",
        "The answer is B.", "The correct answer is (B).", "Answer: B", "Answer: **B**",
        "The best choice is B", "\\boxed{B}", "B is correct",
        "The answer is (B) Ketotifen, not vitamin A", "B. Vitamin A.", "I think the answer is B",
        "Ketotifen eye drops", "ketotifen  EYE drops.", "The patient needs B"]],
    ("option text needs options", tagged("Ketotifen eye drops"), "B", None, {}, 0.0),
    ("option text must be exact", tagged("Ketotifen"), "B", OPTS, {}, 0.0),
    # --- several letters, letters outside the options, no letter: wrong, never a format failure
    *[(f"hedge {a!r}", tagged(a), "B", OPTS, {}, 0.0) for a in [
        "B or C", "B and C", "B, C", "B/C", "A, B, C, D", "ABCD", "AB", "A B", "(B) or (C)",
        "Option B or option C", "Both A and B", "A. Fluorometholone\nB. Ketotifen", "b or c"]],
    ("letter outside the options", tagged("E"), "B", OPTS, {}, 0.0),
    ("E is fine without options", tagged("E"), "E", None, {}, 1.0),
    ("J is the last default letter", tagged("J"), "J", None, {}, 1.0),
    ("K is never a default letter", tagged("K"), "K", None, {}, 0.0),
    ("no letter: prose", tagged("I am not sure"), "B", OPTS, {}, 0.0),
    ("no letter: placeholder", tagged(" answer here "), "B", OPTS, {}, 0.0),
    ("no letter: abbreviation", tagged("ACE inhibitors"), "A", None, {}, 0.0),
    ("no letter: B12 is not a token", tagged("vitamin B12"), "B", None, {}, 0.0),
    ("no letter: I.V. is not a token", tagged("I.V. fluids"), "I", TEN, {}, 0.0),
    # --- lower case: a lone letter or a leading label counts, letters in prose do not
    ("lower lone", tagged("b"), "B", OPTS, {}, 1.0),
    ("lower wrapped", tagged("(b)"), "B", OPTS, {}, 1.0),
    ("lower with period", tagged("b."), "B", OPTS, {}, 1.0),
    ("lower leading label", tagged("b. ketotifen eye drops"), "B", OPTS, {}, 1.0),
    ("lower in prose", tagged("the answer is b"), "B", OPTS, {}, 0.0),
    ("lower after option", tagged("option b"), "B", OPTS, {}, 0.0),
    # --- the article / pronoun trap
    ("article A", tagged("A 45-year-old man with itchy eyes"), "A", OPTS, {}, 0.0),
    ("lower article a", tagged("a patient with allergy"), "A", OPTS, {}, 0.0),
    ("article then letter", tagged("A patient like this needs option C"), "C", OPTS, {}, 1.0),
    ("article is not a hedge", tagged("A patient like this needs C"), "C", OPTS, {}, 1.0),
    ("pronoun I", tagged("I think it is D"), "D", TEN, {}, 1.0),
    ("pronoun I is not a letter", tagged("I think so"), "I", TEN, {}, 0.0),
    ("lone I is a letter", tagged("I"), "I", TEN, {}, 1.0),
    ("lone A is a letter", tagged("A"), "A", OPTS, {}, 1.0),
    ("Group A strep", tagged("Group A streptococcus"), "A", None, {}, 0.0),
    # --- reward values are parameters (the study's ablation penalises wrong answers)
    ("ablation: wrong", tagged("C"), "B", None, {"wrong_reward": -1.0}, -1.0),
    ("ablation: correct", tagged("B"), "B", None, {"wrong_reward": -1.0}, 1.0),
    ("custom format", "nope", "B", None, {"format_reward": -2.0}, -2.0),
    ("custom correct", tagged("B"), "B", None, {"correct_reward": 2.0}, 2.0),
    ("custom wrong", tagged("B or C"), "B", None, {"wrong_reward": -0.5}, -0.5),
]


@pytest.mark.parametrize("response,gold,options,kwargs,reward", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_reward_table(response, gold, options, kwargs, reward):
    out = verify(response, gold, options, Rules(**kwargs))
    assert out["reward"] == reward, out
    assert compute_score(response, gold, options, Rules(**kwargs)) == reward
    assert out["format_ok"] == (out["reason"] == "")
    # With the ablation's -1 for wrong, -1 no longer means "format".
    if "wrong_reward" not in kwargs:
        assert out["format_ok"] == (reward != kwargs.get("format_reward", -1.0))


@pytest.mark.parametrize("response,reason", [
    (tagged("B"), ""),
    (tagged("B", prefix="long reasoning before the think tag"), ""),
    ("x</think><answer>B</answer>", "missing <think>"),
    ("<think>x<answer>B</answer>", "missing </think>"),
    ("<think>x</think>B</answer>", "missing <answer>"),
    ("<think>x</think><answer>B", "missing </answer>"),
    ("<think><think>x</think><answer>B</answer>", "2 <think> tags"),
    (tagged("B") + "</answer></answer>", "3 </answer> tags"),
    ("<answer>B</answer><think>x</think>", "tags out of order"),
    ("<think>x</think> so <answer>B</answer>", "text between </think> and <answer>"),
    (tagged("B") + " done", "text after </answer>"),
    (None, "response is not a string"),
])
def test_reason(response, reason):
    assert verify(response, "B")["reason"] == reason


def test_reason_strict():
    out = verify(tagged("B", prefix="Reasoning first. "), "B", rules=Rules(strict_format=True))
    assert out["reason"] == "text before <think> (strict)" and not out["format_ok"]
    assert out["pred"] is None and out["correct"] is False


def test_verify_keys_and_pred():
    out = verify(tagged("The answer is C"), "B", OPTS)
    assert set(out) == {"reward", "format_ok", "pred", "correct", "answer_in_think",
                        "reasoning_outside_think", "template_copy", "think_chars", "answer_chars",
                        "prefix_chars", "reason"}
    assert out["format_ok"] and out["pred"] == "C" and out["correct"] is False
    assert out["reason"] == ""
    assert verify(tagged("B or C"), "B", OPTS)["pred"] is None
    assert verify(tagged("E"), "B", OPTS)["pred"] is None
    assert verify("B", "B")["pred"] is None  # no format, no prediction


def test_lengths():
    out = verify("pre<think>abcd</think> <answer> B </answer>", "B")
    assert (out["prefix_chars"], out["think_chars"], out["answer_chars"]) == (3, 4, 3)
    out = verify("<think>abcd</think><answer>B</answer> trailing", "B")  # parts still measured
    assert (out["think_chars"], out["answer_chars"], out["format_ok"]) == (4, 1, False)
    out = verify("no tags here", "B")
    assert (out["prefix_chars"], out["think_chars"], out["answer_chars"]) == (0, 0, 0)


@pytest.mark.parametrize("think,answer,options,flag", [
    # the study's example of the direct answer hacker: the option's text stated in <think>
    ("The most appropriate treatment is ketotifen eye drops.", "B", OPTS, True),
    ("So the answer is B.", "B", OPTS, True),
    ("Option B fits best", "B", None, True),
    ("Itchy eyes suggest (B).", "B", OPTS, True),
    ("Itchy, watery eyes in spring suggest an allergy.", "B", OPTS, False),
    ("Ruling out (C) first.", "B", OPTS, False),                  # another option's letter
    ("Ketotifen eye drops", "B", None, False),                     # text needs the options
    ("A 45-year-old with itchy eyes.", "A", OPTS, False),          # the article is not the letter
    ("The answer is B.", "B or C", OPTS, False),                    # no prediction, no flag
])
def test_answer_in_think(think, answer, options, flag):
    assert verify(tagged(answer, think=think), "B", options)["answer_in_think"] is flag


@pytest.mark.parametrize("prefix,flag", [
    ("", False),
    (" \n", False),
    ("Okay, let me see.", False),
    ("x" * 19 + " \n  ", False),      # 19 non-space characters: below the threshold
    ("x" * 20, True),                 # 20: at it
    ("Step 1: itchy eyes and sneezing in spring point to allergic conjunctivitis.\n", True),
])
def test_reasoning_outside_think(prefix, flag):
    out = verify(tagged("B", think="Ketotifen", prefix=prefix), "B", OPTS)
    assert out["reasoning_outside_think"] is flag and out["reward"] == 1.0  # allowed by default
    assert out["prefix_chars"] == len(prefix)
    strict = verify(tagged("B", think="Ketotifen", prefix=prefix), "B", OPTS,
                    Rules(strict_format=True))
    assert strict["reasoning_outside_think"] is flag  # still flagged when strict refuses it


@pytest.mark.parametrize("response,flag", [
    ("<think> reasoning process here </think><answer> answer here </answer>", True),
    ("<think> Reasoning process here </think><answer>B</answer>", True),
    ("<think>x</think><answer>answer here</answer>", True),
    # A broken format still counts.
    ("<think> reasoning process here </think><answer> answer here </answer><think>", True),
    (tagged("B"), False),
    (tagged("B", think="the answer here is B"), False),
])
def test_template_copy(response, flag):
    assert verify(response, "B")["template_copy"] is flag


@pytest.mark.parametrize("response,gold,reward_without_rule,format_reason", [
    ("<think> reasoning process here </think><answer>B</answer>", "B", 1.0, ""),
    ("<think> Reasoning process here </think><answer>C</answer>", "B", 0.0, ""),
    ("<think>x</think><answer> answer here </answer>", "B", 0.0, ""),
    ("<think> reasoning process here </think><answer>B</answer> more", "B", -2.0,
     "text after </answer>"),
    (tagged("B", think="the answer here is B"), "B", 1.0, ""),  # no template copy
])
def test_penalize_template_copy_scores_a_template_copy_as_a_broken_format(
        response, gold, reward_without_rule, format_reason):
    """Without the rule a template copy is only flagged; under it (train_ppo.py
    --penalize_template_copy) the response gets format_reward, no more format_ok nor correct, and
    the reason says why; the letter it read and the flags stay."""
    study = Rules(format_reward=-2.0)
    rule = Rules(format_reward=-2.0, penalize_template_copy=True)
    plain, ruled = verify(response, gold, OPTS, study), verify(response, gold, OPTS, rule)
    assert plain["reward"] == reward_without_rule and plain["reason"] == format_reason
    assert compute_score(response, gold, OPTS, rule) == ruled["reward"]
    if not plain["template_copy"]:
        assert ruled == plain
        return
    assert ruled["reward"] == -2.0 and not ruled["format_ok"] and not ruled["correct"]
    template_reason = "template copy (the prompt's placeholders filled in)"
    assert ruled["reason"] == (format_reason or template_reason)
    unchanged = ("pred", "answer_in_think", "reasoning_outside_think", "template_copy",
                 "think_chars", "answer_chars", "prefix_chars")
    assert {k: ruled[k] for k in unchanged} == {k: plain[k] for k in unchanged}


def test_extract_letter_direct_answers():
    # eval.py reads direct-answer generations with it
    assert extract_letter(" B. Ketotifen") == "B"
    assert extract_letter("B") == "B"
    assert extract_letter("C\n\nExplanation: ...", OPTS) == "C"
    assert extract_letter("E", OPTS) is None
    assert extract_letter("E", letters="ABCDE") == "E"
    assert extract_letter("B", letters="ACD") is None
    assert extract_letter("Ketotifen eye drops", OPTS) == "B"
    assert extract_letter(None) is None and extract_letter("") is None


def test_stdlib_only():
    tree = ast.parse(Path(__file__).resolve().parent.parent.joinpath("verifier.py").read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    assert names <= set(sys.stdlib_module_names), names


# --- properties: never raises, always one of the three rewards

PIECES = ["<think>", "</think>", "<answer>", "</answer>", "< think>", "<Think>", "A", "B", "C", "J",
          "a", "b", "(", ")", ".", ":", "**", " ", "\n", "or", "Option ", "answer is ", "\\boxed{",
          "}", "A 45-year-old", "I ", "reasoning process here", "Ketotifen eye drops"]


def _check(response, gold, options, rules):
    out = verify(response, gold, options, rules)
    assert out["reward"] in (-1.0, 0.0, 1.0)
    assert out["format_ok"] == (out["reward"] != -1.0)
    assert out["correct"] == (out["reward"] == 1.0)
    assert out["pred"] is None or out["pred"] in (options or "ABCDEFGHIJ")
    assert (out["reason"] == "") == out["format_ok"]


# the two optional rules, on or off; the rewards the study's
ANY_RULES = st.builds(Rules, strict_format=st.booleans(), penalize_template_copy=st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(["A", "B", "E"]), st.sampled_from([None, OPTS]), ANY_RULES)
def test_property_arbitrary_text(response, gold, options, rules):
    _check(response, gold, options, rules)
    assert extract_letter(response, options) in (None, *(options or "ABCDEFGHIJ"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map("".join),
       st.sampled_from(["A", "B", "J"]), st.sampled_from([None, OPTS, TEN]), ANY_RULES)
def test_property_tag_soup(response, gold, options, rules):
    _check(response, gold, options, rules)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(PIECES[6:]), max_size=20).map("".join),
       st.sampled_from([None, OPTS]))
def test_property_wellformed_never_format_failure(answer, options):
    assert verify(tagged(answer), "B", options)["reward"] in (0.0, 1.0)


# --- adversarial inputs: each call well under a second (a guard against catastrophic
# backtracking)

MB = 1_000_000
_rng = random.Random(0)
ADVERSARIAL = {
    "10k <think>": "<think>" * 10_000 + "</think><answer>B</answer>",
    "10k full blocks": tagged("B") * 10_000,
    "nested tags": "<think><answer>" * 50_000 + "</answer></think>" * 50_000,
    "split tags": "< think>< /think>< answer>" * 40_000,
    "1 MB answer of letters": tagged("B " * (MB // 2)),
    "1 MB answer of hedges": tagged("A or (B), option C, answer is D. " * (MB // 32)),
    "1 MB answer, no spaces": tagged("A" * MB),
    "1 MB think": tagged("B", think="The answer is (B). " * (MB // 19)),
    "1 MB prefix": tagged("B", prefix="x " * (MB // 2)),
    "1 MB whitespace between": "<think>x</think>" + " " * MB + "<answer>B</answer>",
    "1 MB after answer": tagged("B") + "\n" * MB,
    "1 MB template": "reasoning process here " * (MB // 23),
    "1 MB random garbage": "".join(_rng.choice("<>/thinkanswer ABCD().:*\n\t") for _ in range(MB)),
    "1 MB random unicode": "".join(chr(_rng.randrange(1, 0x2FFF)) for _ in range(MB)),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_fast(name):
    response = ADVERSARIAL[name]
    for options, strict in [(None, False), (OPTS, True)]:
        start = time.perf_counter()
        out = verify(response, "B", options, Rules(strict_format=strict))
        assert time.perf_counter() - start < 0.5, name
        assert out["reward"] in (-1.0, 0.0, 1.0)
    start = time.perf_counter()
    extract_letter(response, OPTS)
    assert time.perf_counter() - start < 0.5, name


# =================================================================================================
# The verifier under fire: odd gold labels and option tables, split tags, long repeated patterns
# =================================================================================================
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
odd_gold = (st.none() | st.integers() | st.text(max_size=3)
            | st.sampled_from(["A", "b", " C ", "AB", ""]))
odd_options = st.none() | st.lists(st.text(max_size=5), max_size=4) | st.dictionaries(
    st.text(max_size=3) | st.integers(),
    st.none() | st.integers() | st.text(max_size=20) | st.sampled_from(TAGS),
    max_size=12)


def _three_rewards(response, gold, options, strict=False):
    out = verify(response, gold, options, Rules(strict_format=strict))
    assert out["reward"] in (-1.0, 0.0, 1.0)
    assert (out["reason"] == "") == out["format_ok"]
    return out


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60)
       | st.lists(st.sampled_from(TAGS + ["B", " ", "\n", "x"]), max_size=12).map("".join),
       odd_gold, odd_options, st.booleans())
def test_verifier_any_gold_and_options(response, gold, options, strict):
    """Callers pass records from any file: odd gold labels and option tables never make it raise."""
    _three_rewards(response, gold, options, strict)
    _three_rewards(f"<think>x</think><answer>{response}</answer>", gold, options, strict)
    extract_letter(response, options)
    extract_letter(response, options, letters=gold if isinstance(gold, str) else None)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(range(4)), st.data(),
       st.sampled_from([" ", "\n", "\t", "\r\n", "\u00a0", "\u200b", "  \n "]))
def test_verifier_a_tag_split_by_whitespace_is_no_tag(which, data, space):
    tag = TAGS[which]
    cut = data.draw(st.integers(1, len(tag) - 1))
    parts = ["<think>", "B is it", "</think>", "<answer>", "B", "</answer>"]
    parts[[0, 2, 3, 5][which]] = tag[:cut] + space + tag[cut:]
    out = _three_rewards("".join(parts), "B", None)
    assert out["reward"] == -1.0 and out["reason"] == f"missing {tag}"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(TAGS + ["< think>", "<think ", "B", "(B)", "B or C", "answer is ",
                                        " ", "\n", "*", "\\boxed{", "}", "A 45-year-old", "."]),
                min_size=1, max_size=6).map("".join),
       st.integers(1_000, 60_000), st.sampled_from(["", "<think>x</think><answer>", "<think>"]))
def test_verifier_repeated_patterns_stay_fast(pattern, times, head):
    """Any short pattern repeated into a long response (hundreds of KB): catastrophic regex
    backtracking would show up here as seconds per call."""
    times = min(times, 400_000 // len(pattern))  # up to 400 KB
    response = head + pattern * times + ("</answer>" if head.endswith("<answer>") else "")
    for options, strict in ((None, False), ({"A": "x", "B": "y", "C": pattern}, True)):
        start = time.perf_counter()
        _three_rewards(response, "B", options, strict)
        extract_letter(response, options)
        assert time.perf_counter() - start < 1.0, (pattern, times)


def test_verifier_huge_option_texts_and_many_options_stay_fast():
    options = {chr(ord("A") + i): ("x " * 100_000) + chr(ord("A") + i) for i in range(26)}
    response = "<think>" + "x " * 100_000 + "</think><answer>" + options["C"] + "</answer>"
    start = time.perf_counter()
    _three_rewards(response, "C", options)
    assert time.perf_counter() - start < 2.0
