"""The training-dynamics report: which of the study's six stages each sampled response is in,
step by step.

    python dynamics.py RUN_DIR    # reads RUN_DIR/rollouts.jsonl and metrics.jsonl (train_ppo.py's)

Med-RLVR (Section 4.2.1, Figure 2, Table 3) describes six stages that PPO moves through on MedQA.
This file turns each into a rule on one response, so a run's rollouts can be read as the study
reads its own: per step, the share of responses in each stage, the mean reward, accuracy, format
rate and length. It writes RUN_DIR/dynamics.md (the table, then the latest example of each stage,
like the study's Table 3), RUN_DIR/dynamics.json and, when matplotlib is installed,
RUN_DIR/dynamics.png: a figure like the study's Figure 2 (accuracy and length over steps, with a
coloured band behind each step in the colour of its most common stage), and RUN_DIR/curves.png: the
training curves of RUN_DIR/metrics.jsonl (CURVES: reward, format rate, accuracy, response length,
KL, entropy, a panel each) and, when the run has an eval.jsonl, the held-out accuracy of each set.

The rules. Every response is scored again with verifier.verify(PROMPT_PREFILL[style] + response,
gold, options, rules) under the run's own verifier.Rules from RUN_DIR/config.json (strict_format,
penalize_template_copy, the reward values; the flags stored in rollouts.jsonl are not trusted: the
verifier may have been fixed since).
Text is split at the tags into the PREFIX (before <think>), the THINK block and the rest. The think
block STATES the answer in its first sentence that names the chosen option (its letter as an
answer, "answer is B" / "(B)", or the option's text) in the words of a conclusion ("answer",
"correct", "therefore", "most appropriate", ...: a walk through the options does not count). Its
"reasoning words" are the words before that sentence, or all its words if it never states the
answer. The first rule that matches wins:

 1. format failure        verify() says the format is broken (reward -1): no <think>...</think>
                          <answer>...</answer>, e.g. "The answer is B." (study: around step 0).
 2. step-by-step exploit  the prefix holds >= PREFIX_REASONING_WORDS words of reasoning and the
                          think block fewer than REASONING_WORDS reasoning words: the reasoning
                          moved in front of the tags and <think> holds only the conclusion, e.g.
                          "Step 1: the pain is in the right upper quadrant ... Step 4: so the
                          gallbladder cannot empty. <think>Obstruction of the cystic duct</think>
                          <answer>E</answer>" (study: steps 64-72).
 3. direct answer hacker  no such prefix, and the think block has fewer than REASONING_WORDS
                          reasoning words: it states the answer at once (or holds nothing), e.g.
                          "<think>The most appropriate treatment is Ketotifen eye drops.</think>
                          <answer>B</answer>" (study: steps 12-24).
 4. verbose formatter     not a hack, but the whole response is longer than VERBOSE_CHARS
                          characters, e.g. a 2,000-character think block that restates every
                          option (study: step 4, the length peak at about 2,930 characters).
 5. reintegrated reasoning  real reasoning inside <think> (>= REASONING_WORDS words) that then
                          names the answer at its end: "... the itching, tearing and seasonal
                          pattern point to allergic conjunctivitis, so a mast-cell stabiliser
                          fits: ketotifen eye drops." (study: from step 100).
 6. concise structurer    real reasoning inside <think>, under VERBOSE_CHARS, that leaves the
                          choice to the <answer> tag without naming it in the think block
                          (study: step 8).

So 2 and 3 differ in where the reasoning is (before the tags or nowhere), 3 and 5 in how much
reasoning comes before the answer is named, 5 and 6 in whether the think block names the answer at
all, and 4 catches every long response that is not a hack. `template_copy` (the response copies
the template's own words, "reasoning process here") is counted as a separate flag column, not a
stage.
"""
import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path

from data import PROMPT_PREFILL
from verifier import Rules, verify

# Stage names, in the order of the rules (and of the table's columns).
FORMAT_FAILURE = "format_failure"
STEP_BY_STEP_EXPLOIT = "step_by_step_exploit"
DIRECT_ANSWER_HACKER = "direct_answer_hacker"
VERBOSE_FORMATTER = "verbose_formatter"
REINTEGRATED_REASONING = "reintegrated_reasoning"
CONCISE_STRUCTURER = "concise_structurer"
STAGES = [FORMAT_FAILURE, STEP_BY_STEP_EXPLOIT, DIRECT_ANSWER_HACKER, VERBOSE_FORMATTER,
          REINTEGRATED_REASONING, CONCISE_STRUCTURER]
# The order the study saw them in, for the figure's legend.
STUDY_ORDER = [FORMAT_FAILURE, VERBOSE_FORMATTER, CONCISE_STRUCTURER, DIRECT_ANSWER_HACKER,
               STEP_BY_STEP_EXPLOIT, REINTEGRATED_REASONING]

# Thresholds (see the module docstring). Words are whitespace-separated tokens.
# Fewer reasoning words than this in <think>: no real reasoning there.
REASONING_WORDS = 25
# At least this many words before <think>: the reasoning moved out of it.
PREFIX_REASONING_WORDS = 25
# A response longer than this is verbose: between the study's length peak (about 2,930
# characters) and its trough (about 310-380).
VERBOSE_CHARS = 1500
# Option texts shorter than this ("No", "5") are too ambiguous to look for.
MIN_OPTION_CHARS = 3
# The panels of curves.png: (metrics.jsonl key, as train_ppo.py step_metrics writes it; title).
# Each is a mean over the step's samples, except entropy: the mean over the update's tokens.
CURVES = [("reward", "reward"), ("format_rate", "format rate"),
          ("accuracy", "accuracy (sampled)"), ("response_tokens", "response length (tokens)"),
          ("kl", "KL to the reference (a response's sum)"), ("entropy", "entropy (per token)")]
HELD_OUT_PANEL = "held-out accuracy (greedy)"
# Words that make a sentence naming an option a conclusion rather than a step of a walk through
# the options.
CONCLUSION_CUES = re.compile(r"\b(?:answer|correct|therefore|thus|hence|so|"
                             r"most (?:likely|appropriate|probable)|best|diagnosis is|treatment is|"
                             r"consistent with|indicates|choose|select)\b", re.IGNORECASE)


def split_response(response: str) -> tuple[str, str]:
    """(prefix before the first <think>, text of the think block); empty strings where a tag is
    missing."""
    start = response.find("<think>")
    if start < 0:
        return response, ""
    end = response.find("</think>", start)
    think = response[start + len("<think>"):end if end >= 0 else len(response)]
    return response[:start], think


def answer_position(think: str, pred: str | None, options: dict | None) -> int | None:
    """Character index of the first sentence in the think block that STATES the chosen answer, or
    None.

    A sentence states it when it names the answer (its letter used as an answer: "answer is B",
    "option B", "(B)"; or the chosen option's text, case-insensitive) and also reads as a
    conclusion (CONCLUSION_CUES: "answer", "correct", "therefore", "most appropriate", ...). The
    cue keeps an early walk through the options ("B. Ketotifen: a mast-cell stabiliser") from
    counting as stating the answer."""
    if not pred:
        return None
    letter = re.escape(pred)
    letter_as_answer = re.compile(rf"(?i:answer|option|choice)\s*(?:is|would be|:)?\s*\(?{letter}\b"
                                  rf"|\({letter}\)")
    option_text = (options or {}).get(pred, "").strip().rstrip(".").lower()
    # Sentences, the leading space skipped.
    for sentence_match in re.finditer(r"[^.!?\s][^.!?\n]*[.!?\n]*", think):
        sentence = sentence_match.group(0)
        named = (letter_as_answer.search(sentence)
                 or (len(option_text) >= MIN_OPTION_CHARS and option_text in sentence.lower()))
        if named and CONCLUSION_CUES.search(sentence):
            return sentence_match.start()
    return None


def word_count(text: str) -> int:
    return len(text.split())


def classify(verify_result: dict, response: str, options: dict | None = None) -> str:
    """One response's stage (rules and thresholds in the module docstring). `response` is the text
    the verifier saw (prefill included); `options` lets the think block name the answer by its
    text."""
    if not verify_result["format_ok"]:
        return FORMAT_FAILURE
    prefix, think = split_response(response)
    position = answer_position(think, verify_result.get("pred"), options)
    reasoning_words = word_count(think if position is None else think[:position])
    if word_count(prefix) >= PREFIX_REASONING_WORDS and reasoning_words < REASONING_WORDS:
        return STEP_BY_STEP_EXPLOIT
    if reasoning_words < REASONING_WORDS:
        return DIRECT_ANSWER_HACKER
    if len(response) > VERBOSE_CHARS:
        return VERBOSE_FORMATTER
    if position is not None:
        return REINTEGRATED_REASONING
    return CONCISE_STRUCTURER


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines log (rollouts.jsonl, metrics.jsonl), blank lines skipped."""
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not a JSON line ({e})") from None
    return rows


def run_rules(run_dir: Path) -> Rules:
    """The verifier's rules as the run trained with them (RUN_DIR/config.json holds the trainer's
    flags, named as the fields of Rules), so that a run with strict_format, the template-copy
    penalty or other reward values is judged by its own rules. A rule the config does not name (a
    run older than the rule, or no config.json) keeps the study's default."""
    path = run_dir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    rules = {}
    for field in fields(Rules):
        if field.name in config:
            value = config[field.name]
            is_flag = isinstance(field.default, bool)
            if isinstance(value, bool) != is_flag or not isinstance(value, (int, float)):
                expected = "true or false" if is_flag else "a number"
                raise ValueError(f"{path}: {field.name} is {value!r}, expected {expected}")
            rules[field.name] = value
    return Rules(**rules)


def classify_rows(rows: list[dict], rules: Rules = Rules()) -> list[dict]:
    """Each rollout row, verified again under `rules` and classified: {"step", "stage", "v"
    (verify's dict), "reward", "chars", "tokens", "text"}."""
    out = []
    for row in rows:
        text = PROMPT_PREFILL.get(row.get("prompt_style", ""), "") + row["response"]
        result = verify(text, row["gold"], row.get("options"), rules)
        out.append({"step": int(row["step"]), "stage": classify(result, text, row.get("options")),
                    "v": result, "reward": row.get("reward", result["reward"]),
                    "chars": len(row["response"]), "tokens": row.get("response_tokens"),
                    "text": text})
    return out


def examples(classified: list[dict], max_chars: int = 600) -> dict:
    """stage -> the latest step's first response in that stage (cut to max_chars), like the study's
    Table 3."""
    latest = {}
    for item in classified:
        if item["stage"] not in latest or item["step"] > latest[item["stage"]]["step"]:
            latest[item["stage"]] = {"step": item["step"], "response": item["text"][:max_chars]}
    return {stage: latest[stage] for stage in STAGES if stage in latest}


def step_report(classified: list[dict]) -> list[dict]:
    """One dict per training step: n, share of each stage, template-copy share, mean reward (as
    stored: the reward the policy was trained on), accuracy, format rate, mean response length in
    characters and tokens, and the dominant stage."""
    by_step: dict[int, list[dict]] = {}
    for item in classified:
        by_step.setdefault(item["step"], []).append(item)
    report = []
    for step in sorted(by_step):
        items = by_step[step]
        n = len(items)
        counts = Counter(item["stage"] for item in items)
        tokens = [item["tokens"] for item in items if item["tokens"] is not None]
        report.append({
            "step": step, "n": n,
            "shares": {stage: counts[stage] / n for stage in STAGES},
            "dominant": max(STAGES, key=lambda stage: counts[stage]),  # ties: the earlier rule
            "template_copy": sum(bool(item["v"]["template_copy"]) for item in items) / n,
            "mean_reward": sum(item["reward"] for item in items) / n,
            "accuracy": sum(bool(item["v"]["correct"]) for item in items) / n,
            "format_rate": sum(bool(item["v"]["format_ok"]) for item in items) / n,
            "mean_chars": sum(item["chars"] for item in items) / n,
            "mean_tokens": sum(tokens) / len(tokens) if tokens else None,
        })
    return report


def markdown_table(report: list[dict]) -> str:
    short = {FORMAT_FAILURE: "fmt fail", STEP_BY_STEP_EXPLOIT: "step exploit",
             DIRECT_ANSWER_HACKER: "hacker", VERBOSE_FORMATTER: "verbose",
             REINTEGRATED_REASONING: "reintegrated", CONCISE_STRUCTURER: "concise"}
    head = ["step", "n", *[short[stage] + " %" for stage in STAGES], "tmpl copy %", "reward",
            "acc %", "format %", "chars", "tokens", "dominant"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in report:
        cells = [str(row["step"]), str(row["n"]),
                 *[f"{100 * row['shares'][stage]:.1f}" for stage in STAGES],
                 f"{100 * row['template_copy']:.1f}", f"{row['mean_reward']:+.3f}",
                 f"{100 * row['accuracy']:.1f}", f"{100 * row['format_rate']:.1f}",
                 f"{row['mean_chars']:.0f}",
                 "-" if row["mean_tokens"] is None else f"{row['mean_tokens']:.0f}",
                 short[row["dominant"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_held_out(path: Path) -> dict:
    """{set name: [(step, accuracy), ...]} from a run's eval.jsonl (train_ppo.py --eval_every);
    {} when the run has none."""
    curves: dict[str, list] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                curves.setdefault(row["data"], []).append((row["step"], row["accuracy"]))
    return curves


def held_out_table(curves: dict) -> str:
    """Held-out accuracy (%) by step, a column a set."""
    steps = sorted({step for curve in curves.values() for step, _ in curve})
    lines = ["| step | " + " | ".join(curves) + " |", "|" + " --- |" * (len(curves) + 1)]
    for step in steps:
        cells = [next((f"{100 * acc:.1f}" for s, acc in curve if s == step), "-")
                 for curve in curves.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: list[dict], path: Path, held_out: dict | None = None) -> bool:
    """Figure 2 of the study: accuracy (top) and mean length (bottom) over steps, each step's band
    coloured by its dominant stage; with `held_out` (read_held_out), the held-out accuracy of each
    set too, the study's curve. Returns False (and draws nothing) when matplotlib is not
    installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    colors = dict(zip(STUDY_ORDER,
                      ["#d9d9d9", "#fdd0a2", "#c7e9c0", "#fcbba1", "#dadaeb", "#c6dbef"]))
    steps = [row["step"] for row in report]
    # Each step's band reaches halfway to its neighbours.
    edges = ([steps[0] - 0.5] + [(left + right) / 2 for left, right in zip(steps, steps[1:])]
             + [steps[-1] + 0.5])
    fig, (ax_acc, ax_len) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax in (ax_acc, ax_len):
        for row, lo, hi in zip(report, edges, edges[1:]):
            ax.axvspan(lo, hi, color=colors[row["dominant"]], lw=0)
    ax_acc.plot(steps, [100 * row["accuracy"] for row in report], "o-", color="black", ms=3,
                label="accuracy")
    ax_acc.plot(steps, [100 * row["format_rate"] for row in report], "--", color="gray",
                label="format rate")
    for name, curve in (held_out or {}).items():
        ax_acc.plot([step for step, _ in curve], [100 * acc for _, acc in curve], "s-", ms=4,
                    label=f"held-out accuracy, {name}")
    ax_acc.set_ylabel("% (sampled; held-out: greedy)")
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_len.plot(steps, [row["mean_chars"] for row in report], "o-", color="tab:blue", ms=3)
    ax_len.set_ylabel("mean response length (chars)")
    ax_len.set_xlabel("training step")
    present = [stage for stage in STUDY_ORDER if any(row["dominant"] == stage for row in report)]
    fig.legend([Patch(color=colors[stage]) for stage in present],
               [stage.replace("_", " ") for stage in present],
               loc="upper center", ncol=min(len(present), 3), fontsize=8, title="dominant stage")
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_curves(metrics_rows: list[dict], path: Path, held_out: dict | None = None) -> dict | None:
    """The training curves: one panel per CURVES metric against the step (the steps of
    metrics.jsonl that log it), and with `held_out` (read_held_out) a panel of each set's held-out
    accuracy. Returns the series drawn, read back from the figure's lines ({metrics key, or
    "held_out/SET": (steps, values)}), or None (and draws nothing) when matplotlib is not
    installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [*CURVES, *([("held_out", HELD_OUT_PANEL)] if held_out else [])]
    columns = 4
    panel_rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(panel_rows, columns, figsize=(4 * columns, 3 * panel_rows),
                             sharex=True, squeeze=False)
    drawn = {}
    for ax, (key, title) in zip(axes.flat, panels):
        if key == "held_out":
            lines = [(f"held_out/{name}", name, [step for step, _ in curve],
                      [accuracy for _, accuracy in curve]) for name, curve in held_out.items()]
        else:
            logged = [row for row in metrics_rows if key in row]
            lines = [(key, None, [row["step"] for row in logged], [row[key] for row in logged])]
        for series, label, steps, values in lines:
            (line,) = ax.plot(steps, values, "o-", ms=3, label=label)
            drawn[series] = (line.get_xdata().tolist(), line.get_ydata().tolist())
        if key == "held_out":
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_visible(False)
        elif index + columns >= len(panels):  # the lowest panel of its column: the step axis
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> None:
    # The docstring's first paragraph, as one line.
    description = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("run_dir", type=Path,
                        help="a train_ppo.py output folder holding rollouts.jsonl")
    args = parser.parse_args(argv)
    rows = read_jsonl(args.run_dir / "rollouts.jsonl")
    if not rows:
        sys.exit(f"{args.run_dir / 'rollouts.jsonl'} holds no rollouts")
    classified = classify_rows(rows, run_rules(args.run_dir))
    report = step_report(classified)
    shown = examples(classified)
    table = markdown_table(report)
    example_md = "".join(f"\n**{stage.replace('_', ' ')}** (step {example['step']}):\n\n"
                         f"```\n{example['response']}\n```\n"
                         for stage, example in shown.items())
    held_out = read_held_out(args.run_dir / "eval.jsonl")
    held_out_md = ""
    if held_out:
        held_out_md = f"\n### Held-out accuracy (eval.jsonl, greedy)\n\n{held_out_table(held_out)}"
    (args.run_dir / "dynamics.md").write_text(
        f"{table}{held_out_md}\n### The latest example of each stage\n{example_md}")
    thresholds = {"REASONING_WORDS": REASONING_WORDS,
                  "PREFIX_REASONING_WORDS": PREFIX_REASONING_WORDS,
                  "VERBOSE_CHARS": VERBOSE_CHARS}
    (args.run_dir / "dynamics.json").write_text(json.dumps(
        {"thresholds": thresholds, "steps": report, "examples": shown, "held_out": held_out},
        indent=1))
    print(table)
    print(f"wrote {args.run_dir / 'dynamics.md'} and dynamics.json "
          f"({len(rows)} responses, {len(report)} steps)")
    metrics_path = args.run_dir / "metrics.jsonl"
    metrics_rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
    if not plot(report, args.run_dir / "dynamics.png", held_out):
        print("matplotlib is not installed: no figures (pip install matplotlib)")
        return
    print(f"wrote {args.run_dir / 'dynamics.png'}")
    if metrics_rows:
        plot_curves(metrics_rows, args.run_dir / "curves.png", held_out)
        print(f"wrote {args.run_dir / 'curves.png'}")
    else:
        print(f"{metrics_path} holds no metrics: no curves.png")


if __name__ == "__main__":
    main()
