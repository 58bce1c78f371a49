"""The Med-RLVR reward: a rule-based verifier for multiple-choice answers. Standard library only.

    reward = -1.0  the format is broken                          (format_reward)
              0.0  the format holds, but the letter is not gold  (wrong_reward; also: no letter,
                   several letters, a letter outside the options)
             +1.0  the format holds and the letter is gold       (correct_reward)

The whole reward is here: verify(response, gold, options, rules) takes the values above and the
two optional rules (strict_format, penalize_template_copy) as one Rules record, whose defaults are
the study's.

`response` is everything after the prompt; where the prompt ends in a prefilled "<think>", the
caller prepends it (verify(PROMPT_PREFILL[style] + generated_text, ...)). Decode the response
without special tokens (EOS, pad): anything left after </answer> breaks the format.

FORMAT (tags are case-sensitive, exactly as the prompt shows them; `<Think>` or `< think>` is not
a tag):
  1. each of <think>, </think>, <answer>, </answer> appears exactly once (so nesting and repeats
     fail);
  2. in that order;
  3. only whitespace between </think> and <answer>;
  4. only whitespace after </answer>;
  5. text before <think> is allowed, as the study's validator allowed it (the "step-by-step
     exploit"); Rules(strict_format=True) refuses it (a whitespace-only prefix is still fine).
  6. with Rules(penalize_template_copy=True) only: no template copy (the flag below). A small
     model's first hack is to fill in the prompt's placeholders, tags and all; this rule scores it
     as a broken format (reason "template copy"; pred and the flags still say what it wrote).
  An empty think or answer part is not a format failure (an empty answer simply names no letter).

THE LETTER inside <answer> (extract_letter; the same rules serve direct-answer prompts). Markdown
`*` is dropped first. Then, first rule that applies:
  1. Bare letter: the answer is one letter, alone or wrapped: B, B., B), (B), [B], {B}; lower case
     too (b, (b)): nothing else is there for it to mean.
  2. Option text: with `options` given, the answer equals exactly one option's text (compared after
     collapsing whitespace, ignoring case and a trailing period).
  3. Letters only: the answer is nothing but capital letters, punctuation and "or"/"and": one
     distinct letter names it ("A A"); two or more ("ABCD", "B or C", "A, B") is a hedge: no
     letter.
  4. Letter tokens in prose. A token is a capital letter with no letter or digit on either side
     ("B12", "DNA", "T-cell" are not tokens). Strong tokens:
       - the answer starts with a label: "B. text", "B) text", "B: text", "(B) text" (lower case
         too); or a line starts with an upper-case label (an option list), or holds the letter
         alone
         ("C\n\nExplanation: ...");
       - wrapped: "(B)", "[B]", "{B}" (so "\\boxed{B}" works);
       - after a keyword: "option B", "choice B", "answer is B", "Answer: B", "answer would be B";
       - linked to another token: "B or C", "B and C", "B, C", "B/C" (both letters count).
     Weak tokens (used only when there is no strong one): a token followed by the end of the
     answer, by punctuation (. ) : ; , ] }) that is not followed by a letter or digit ("I.V." is
     no token), or by " is" ("B is correct").
     The answer's letter is the one distinct letter among the strong tokens (else among the weak
     ones); two or more distinct letters: no letter.
  A capital followed by a space and a word is NOT a token: this is the article trap ("A 45-year-old
  man ...", "I think ...", "Group A strep"). Lower-case letters count only in rules 1 and 2 and in a
  label at the very start ("b. ketotifen"); in prose ("the answer is b", "a patient") they do not.
  The letter must be one of the question's options (the keys of `options`, or `letters`; A-J when
  neither is given), else no letter.
  Long texts: an answer (or, for answer_in_think, a think part) over 4,000 characters is read only
  from its first and last 2,000 characters, so the regexes (all short and anchored, or run on a
  window of at most 64 characters around a letter) stay linear and cheap.

FLAGS (for logging; the reward uses none of them, but for template_copy under rule 6):
  answer_in_think          the "direct answer hacker": the predicted option's letter (as a token,
                           rule 4, strong or weak) or its text (>= 3 characters, case-insensitive)
                           is already stated inside <think>. Only when the format holds and a
                           letter was read.
  reasoning_outside_think  the "step-by-step exploit": at least 20 non-whitespace characters before
                           the first <think>.
  template_copy            the response repeats the prompt's placeholders: "reasoning process here"
                           anywhere, or an answer part that is just "answer here"
                           (case-insensitive).
  think_chars, answer_chars, prefix_chars: raw lengths of the parts; 0 unless the four tags appear
  once each and in order. reason: "" when the format holds, else a short description of the first
  problem.
"""
import re
from dataclasses import dataclass

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# Up to 10 options (MMLU-Pro) when the caller gives no options.
DEFAULT_LETTERS = "ABCDEFGHIJ"
# Longer texts are read from their first and last MAX_SCAN // 2 characters.
MAX_SCAN = 4000
# Non-whitespace characters before <think> that count as reasoning there.
MIN_PREFIX_REASONING = 20
# Shorter option texts are not searched for inside <think>.
MIN_OPTION_TEXT = 3

# Used with fullmatch: "B", "(b)", "B.", "[B].".
_BARE = re.compile(r"[(\[{]?\s*([A-Za-z])\s*[)\]}]?\s*[.:)]?")
_LETTER_WORDS = re.compile(r"[A-Z]+")  # fullmatch on one word of rule 3
_SPLIT = re.compile(r"[\s.,;:/&()\[\]{}-]+")
# Used with match (anchored at the start of the answer).
_START_LABEL = re.compile(r"(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])[.):])[.:)]*(?=\s|$)")
_TOKEN = re.compile(r"(?<![A-Za-z0-9])[A-Z](?![A-Za-z0-9])")
_KEYWORD = re.compile(r"(?:option|choice|answer|letter)s?\s*(?:is|would be|will be|=|:|-)?"
                      r"\s*[(\[{]?$")
# Used with match (anchored just after the letter).
_LINK_AFTER = re.compile(r"[.)\]]?\s*(?:or|and|,|/|&)\s*[(\[]?[A-Z](?![A-Za-z0-9])")
_LINK_BEFORE = re.compile(r"(?<![A-Za-z0-9])[A-Z][.)\]]?\s*(?:or|and|,|/|&)\s*[(\[]?$")
_IS_AFTER = re.compile(r"\s+is\b")  # match at 0
_LINE_END = re.compile(r"[ \t.):\]}]*(?:\n|\Z)")  # match at 0, on <= 64 characters
_TEMPLATE = re.compile(r"reasoning process here|<answer>\s*answer here\s*</answer>")


def _window(text: str) -> str:
    """The text itself, or its first and last MAX_SCAN // 2 characters: keeps every regex cheap."""
    if len(text) <= MAX_SCAN:
        return text
    half = MAX_SCAN // 2
    return text[:half] + "\n" + text[-half:]


def _norm(text: str) -> str:
    """Option-text comparison key: whitespace collapsed, case folded, no trailing period."""
    return " ".join(str(text).split()).casefold().rstrip(".").strip()


def _letter_tokens(text: str) -> tuple[set, set]:
    """(strong, weak) sets of capital letters standing as tokens in `text` (rule 4 of the module
    docstring)."""
    strong, weak = set(), set()
    label = _START_LABEL.match(text)
    if label:
        strong.add((label.group(1) or label.group(2)).upper())
    for token in _TOKEN.finditer(text):
        pos, letter = token.start(), token.group()
        before, after = text[max(0, pos - 24):pos], text[pos + 1:pos + 16]
        punct_ok = after[:1] in ".):;,]}" and not after[1:2].isalnum()
        # Is the letter alone on its line ("C\n\nExplanation: ...")?
        ahead = text[pos + 1:pos + 65]
        alone = _LINE_END.match(ahead) and ("\n" in ahead or pos + 65 >= len(text))
        # Does only whitespace or a bracket precede it on its line?
        behind = text[max(0, pos - 64):pos]
        at_line_start = (not behind.rsplit("\n", 1)[-1].strip(" \t([{")
                         and ("\n" in behind or pos <= 64))
        if ((at_line_start and (alone or (after[:1] in ".):" and not after[1:2].strip())))
                or (before[-1:] in "([{" and after[:1] in ")]}")
                or _KEYWORD.search(before.lower())
                or _LINK_AFTER.match(after) or _LINK_BEFORE.search(before)):
            strong.add(letter)
        elif not after or punct_ok or _IS_AFTER.match(after):
            weak.add(letter)
    return strong, weak


def extract_letter(text, options=None, letters=None):
    """The option letter a free-text answer names, or None (see the module docstring, rules 1-4).

    options: {"A": text, ...} (enables rule 2 and limits the letters to its keys); letters: the
    allowed letters as a string, e.g. "ABCD" (default: the keys of options, else A-J).
    """
    if not isinstance(text, str):
        return None
    if letters is not None:
        allowed = set(str(letters).upper())
    elif isinstance(options, dict) and options:
        allowed = {str(letter).strip().upper() for letter in options}
    else:
        allowed = set(DEFAULT_LETTERS)
    answer = _window(text).replace("*", "").strip()
    if not answer:
        return None
    pred = None
    bare = _BARE.fullmatch(answer)
    if bare:  # rule 1
        pred = bare.group(1).upper()
    else:
        matches = []
        if isinstance(options, dict):  # rule 2
            answer_key = _norm(answer)
            matches = [str(letter).strip().upper() for letter, option_text in options.items()
                       if _norm(option_text) == answer_key]
        words = [word for word in _SPLIT.split(answer) if word and word not in ("or", "and")]
        if len(matches) == 1:
            pred = matches[0]
        elif words and all(_LETTER_WORDS.fullmatch(word) for word in words):  # rule 3
            found = set("".join(words))
            pred = found.pop() if len(found) == 1 else None
        else:  # rule 4
            strong, weak = _letter_tokens(answer)
            found = strong or weak
            pred = found.pop() if len(found) == 1 else None
    return pred if pred in allowed else None


def _format(response: str, strict: bool):
    """(reason, parts): reason is "" when the format holds; parts = (prefix, think, answer) once
    the four tags appear exactly once each and in order, else None."""
    for tag in TAGS:
        count = response.count(tag)
        if count != 1:
            return ("missing " + tag if count == 0 else f"{count} {tag} tags"), None
    think_open, think_close, answer_open, answer_close = (response.find(tag) for tag in TAGS)
    if not think_open < think_close < answer_open < answer_close:
        return "tags out of order", None
    prefix = response[:think_open]
    think = response[think_open + len("<think>"):think_close]
    answer = response[answer_open + len("<answer>"):answer_close]
    parts = (prefix, think, answer)
    if response[think_close + len("</think>"):answer_open].strip():
        return "text between </think> and <answer>", parts
    if response[answer_close + len("</answer>"):].strip():
        return "text after </answer>", parts
    if strict and prefix.strip():
        return "text before <think> (strict)", parts
    return "", parts


def _states_answer(think: str, pred: str, options) -> bool:
    """Is the chosen option (its letter as a token, or its text) already stated inside <think>?"""
    strong, weak = _letter_tokens(_window(think))
    if pred in strong or pred in weak:
        return True
    if isinstance(options, dict) and pred in options:
        option_text = _norm(options[pred])
        return len(option_text) >= MIN_OPTION_TEXT and option_text in _norm(_window(think))
    return False


@dataclass(frozen=True)
class Rules:
    """What verify() rewards; the defaults are the study's. The names are train_ppo.py's flags."""
    strict_format: bool = False  # format rule 5: refuse text before <think>
    penalize_template_copy: bool = False  # format rule 6: a template copy breaks the format
    format_reward: float = -1.0
    wrong_reward: float = 0.0
    correct_reward: float = 1.0


def verify(response, gold, options=None, rules=Rules()) -> dict:
    """The reward and its parts for one response (see the module docstring). Never raises on a
    string; a non-string response gets rules.format_reward."""
    out = {"reward": float(rules.format_reward), "format_ok": False, "pred": None,
           "correct": False, "answer_in_think": False, "reasoning_outside_think": False,
           "template_copy": False, "think_chars": 0, "answer_chars": 0, "prefix_chars": 0,
           "reason": ""}
    if not isinstance(response, str):
        out["reason"] = "response is not a string"
        return out
    out["template_copy"] = bool(_TEMPLATE.search(response.casefold()))
    think_start = response.find("<think>")
    if think_start > 0:  # the step-by-step exploit: reasoning written before <think>
        reasoning_chars = len("".join(response[:think_start].split()))
        out["reasoning_outside_think"] = reasoning_chars >= MIN_PREFIX_REASONING
    reason, parts = _format(response, rules.strict_format)
    out["reason"] = reason
    if parts is not None:
        prefix, think, answer = parts
        out.update(prefix_chars=len(prefix), think_chars=len(think), answer_chars=len(answer))
    if reason:
        return out
    gold = gold.strip().upper() if isinstance(gold, str) else None
    pred = extract_letter(answer, options)
    out.update(format_ok=True, pred=pred, correct=pred is not None and pred == gold)
    out["reward"] = float(rules.correct_reward if out["correct"] else rules.wrong_reward)
    out["answer_in_think"] = pred is not None and _states_answer(think, pred, options)
    if rules.penalize_template_copy and out["template_copy"]:  # format rule 6
        out.update(reward=float(rules.format_reward), format_ok=False, correct=False,
                   reason="template copy (the prompt's placeholders filled in)")
    return out


def compute_score(response, gold, options=None, rules=Rules()) -> float:
    """The Med-RLVR reward alone: format_reward (-1), wrong_reward (0) or correct_reward (+1)."""
    return verify(response, gold, options, rules)["reward"]
