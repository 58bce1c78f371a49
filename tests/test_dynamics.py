"""dynamics.py: each stage rule on hand-written responses (the study's examples), the per-step
report, and the training curves drawn from metrics.jsonl and eval.jsonl."""
import json
import sys

import pytest

import dynamics
from dynamics import (
    CONCISE_STRUCTURER,
    DIRECT_ANSWER_HACKER,
    FORMAT_FAILURE,
    REINTEGRATED_REASONING,
    STAGES,
    STEP_BY_STEP_EXPLOIT,
    VERBOSE_FORMATTER,
    classify,
)
from verifier import Rules, verify

# The study's Table 3 cases, reconstructed: an allergic-conjunctivitis question (gold B, Ketotifen)
# and a gallbladder question (gold E, cystic duct).
EYE = {"A": "Artificial tears", "B": "Ketotifen eye drops", "C": "Oral prednisone",
       "D": "Topical erythromycin"}
GALL = {"A": "Acute pancreatitis", "B": "Peptic ulcer", "C": "Hepatitis A",
        "D": "Choledocholithiasis", "E": "Obstruction of the cystic duct"}
EYE_REASONING = ("The patient has itchy, watery eyes every spring, with conjunctival injection and "
                 "no discharge or pain. This seasonal pattern with itching points to allergic "
                 "conjunctivitis, an IgE mediated reaction with mast cell degranulation in the "
                 "conjunctiva.")
GALL_STEPS = ("Step 1: the patient has colicky right upper quadrant pain after fatty meals. "
              "Step 2: the pain lasts a few hours and resolves. Step 3: there is no fever or "
              "jaundice, so there is no cholangitis. Step 4: the gallbladder contracts against a "
              "blocked outlet. ")


def has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def stage(response, gold, options):
    return classify(verify(response, gold, options), response, options)


def test_format_failure_short_untagged_answer():
    assert stage("The answer is B.", "B", EYE) == FORMAT_FAILURE
    assert stage("<think>allergy</think> B", "B", EYE) == FORMAT_FAILURE  # no <answer> tag


def test_step_by_step_exploit_reasoning_before_think():
    response = GALL_STEPS + "<think>Obstruction of the cystic duct</think><answer>E</answer>"
    assert stage(response, "E", GALL) == STEP_BY_STEP_EXPLOIT
    # The same think block without the reasoning in front is a direct answer hack.
    assert (stage("<think>Obstruction of the cystic duct</think><answer>E</answer>", "E", GALL)
            == DIRECT_ANSWER_HACKER)


def test_direct_answer_hacker_states_answer_in_short_think():
    response = ("<think>The most appropriate treatment for this patient is Ketotifen eye drops."
                "</think><answer>B</answer>")
    assert stage(response, "B", EYE) == DIRECT_ANSWER_HACKER
    # Stating the answer first and justifying it afterwards is the same hack: no reasoning before
    # the answer.
    response = f"<think>The answer is B. {EYE_REASONING}</think><answer>B</answer>"
    assert stage(response, "B", EYE) == DIRECT_ANSWER_HACKER
    # A think block with no reasoning at all, too.
    assert stage("<think>Let me think.</think><answer>B</answer>", "B", EYE) == DIRECT_ANSWER_HACKER


def test_verbose_formatter_long_but_not_a_hack():
    walk = " ".join(f"Option {letter}, {text}, should be weighed against the history, the exam "
                    "and the season." for letter, text in EYE.items())
    response = (f"<think>{EYE_REASONING} {walk * 4} Therefore the answer is B.</think>"
                "<answer>B</answer>")
    assert len(response) > dynamics.VERBOSE_CHARS
    assert stage(response, "B", EYE) == VERBOSE_FORMATTER
    # A long response whose think states the answer at once is still a hack, not verbose.
    response = f"<think>The answer is B. {walk * 4}</think><answer>B</answer>"
    assert stage(response, "B", EYE) == DIRECT_ANSWER_HACKER


def test_reintegrated_reasoning_concludes_inside_think():
    response = (f"<think>{EYE_REASONING} So the most appropriate treatment is a mast cell "
                "stabiliser: Ketotifen eye drops.</think><answer>B</answer>")
    assert stage(response, "B", EYE) == REINTEGRATED_REASONING
    # The same by letter.
    response = f"<think>{EYE_REASONING} Therefore the answer is (B).</think><answer>B</answer>"
    assert stage(response, "B", EYE) == REINTEGRATED_REASONING


def test_concise_structurer_reasons_but_leaves_choice_to_answer_tag():
    response = (f"<think>{EYE_REASONING} A topical antihistamine with mast cell stabilising action "
                "fits.</think><answer>B</answer>")
    assert stage(response, "B", EYE) == CONCISE_STRUCTURER
    # A walk through the options that names the chosen one early, without concluding, is not a
    # hack.
    response = ("<think>B. Ketotifen eye drops: an antihistamine. A. Artificial tears: only "
                f"lubricate. {EYE_REASONING}</think><answer>B</answer>")
    assert stage(response, "B", EYE) == CONCISE_STRUCTURER


def test_answer_position_needs_a_conclusion():
    assert dynamics.answer_position("Ketotifen eye drops are an option.", "B", EYE) is None
    assert (dynamics.answer_position("First. So it is Ketotifen eye drops.", "B", EYE)
            == len("First. "))
    assert dynamics.answer_position("The answer is B.", "B", EYE) == 0
    assert dynamics.answer_position("The answer is B.", None, EYE) is None


def test_step_report_exact_shares(tmp_path):
    """A hand-written rollouts.jsonl: two steps, known stages, exact shares and means."""
    hack = "The most appropriate treatment is Ketotifen eye drops.</think><answer>B</answer>"
    concise = f"{EYE_REASONING} A topical antihistamine fits.</think><answer>A</answer>"
    # prompt_style r1_chat: the prompt already holds "<think>", the response starts inside it.
    rollouts = [
        (0, "The answer is B.", 3), (0, "B", 1),
        (0, "<think>Ketotifen</think><answer>B</answer>", 12), (0, concise, 40),
        (1, hack, 15), (1, hack, 15), (1, concise, 40),
        (1, "<think>I think.</think><answer>C</answer>", 9),
    ]
    with open(tmp_path / "rollouts.jsonl", "w") as f:
        for index, (step, response, n_tokens) in enumerate(rollouts):
            opens_think = response.startswith("<think>") or not response.endswith("</answer>")
            style = "r1" if opens_think else "r1_chat"
            result = verify(("<think>" if style == "r1_chat" else "") + response, "B", EYE)
            f.write(json.dumps({"step": step, "id": f"q{index}", "prompt": "...",
                                "response": response, "gold": "B", "options": EYE,
                                "reward": result["reward"], "pred": result["pred"],
                                "format_ok": result["format_ok"], "answer_in_think": False,
                                "reasoning_outside_think": False, "template_copy": False,
                                "response_tokens": n_tokens, "prompt_style": style}) + "\n")
    dynamics.main([str(tmp_path)])
    assert (tmp_path / "dynamics.png").exists() == has_matplotlib()
    report = json.loads((tmp_path / "dynamics.json").read_text())["steps"]
    assert [row["step"] for row in report] == [0, 1]
    step0, step1 = report
    assert step0["shares"] == {**dict.fromkeys(STAGES, 0.0), FORMAT_FAILURE: 0.5,
                               DIRECT_ANSWER_HACKER: 0.25, CONCISE_STRUCTURER: 0.25}
    assert step1["shares"] == {**dict.fromkeys(STAGES, 0.0), DIRECT_ANSWER_HACKER: 0.75,
                               CONCISE_STRUCTURER: 0.25}
    assert step0["dominant"] == FORMAT_FAILURE and step1["dominant"] == DIRECT_ANSWER_HACKER
    assert step0["format_rate"] == 0.5 and step1["format_rate"] == 1.0
    # Correct needs the format (reward +1).
    assert step0["accuracy"] == 0.25 and step1["accuracy"] == 0.5
    assert step0["mean_reward"] == pytest.approx((-1 - 1 + 1 + 0) / 4)
    assert step1["mean_reward"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert step0["mean_tokens"] == pytest.approx((3 + 1 + 12 + 40) / 4)
    assert step1["mean_chars"] == pytest.approx(
        (2 * len(hack) + len(concise) + len(rollouts[-1][1])) / 4)
    table = (tmp_path / "dynamics.md").read_text().split("\n\n")[0]
    assert table.count("\n") == 3 and "| 1 | 4 |" in table  # header, rule, two steps
    shown = json.loads((tmp_path / "dynamics.json").read_text())["examples"]
    assert list(shown) == [FORMAT_FAILURE, DIRECT_ANSWER_HACKER, CONCISE_STRUCTURER]
    # The latest step's first.
    assert shown[DIRECT_ANSWER_HACKER] == {"step": 1, "response": "<think>" + hack}


def test_run_config_sets_the_verifier_rules(tmp_path):
    """A run trained with strict_format judged its step-by-step exploits as format failures: so
    does the report."""
    response = GALL_STEPS + "<think>Obstruction of the cystic duct</think><answer>E</answer>"
    row = {"step": 0, "id": "q", "prompt": "", "response": response, "gold": "E", "options": GALL,
           "reward": -1.0, "response_tokens": 60, "prompt_style": "r1"}
    shares = dynamics.step_report(dynamics.classify_rows([row]))[0]["shares"]
    assert shares[STEP_BY_STEP_EXPLOIT] == 1.0
    (tmp_path / "config.json").write_text(json.dumps({"strict_format": True,
                                                      "format_reward": -0.5, "lr": 1e-6}))
    rules = dynamics.run_rules(tmp_path)
    assert rules == Rules(strict_format=True, format_reward=-0.5)
    shares = dynamics.step_report(dynamics.classify_rows([row], rules))[0]["shares"]
    assert shares[FORMAT_FAILURE] == 1.0


def test_run_config_sets_the_template_copy_rule_and_old_configs_keep_the_default(tmp_path):
    """A run trained with --penalize_template_copy scored a template copy as a broken format: so
    does the report. A config.json from before the flag existed (or none) keeps the study's rule."""
    response = "<think>reasoning process here</think><answer>B</answer>"
    row = {"step": 0, "id": "q", "prompt": "", "response": response, "gold": "B", "options": EYE,
           "reward": -1.0, "response_tokens": 9, "prompt_style": "r1"}
    assert dynamics.run_rules(tmp_path) == Rules()  # no config.json
    config = {"strict_format": False, "format_reward": -1.0, "wrong_reward": 0.0,
              "correct_reward": 1.0}  # an old run's flags
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dynamics.run_rules(tmp_path) == Rules()
    (judged,) = dynamics.classify_rows([row], dynamics.run_rules(tmp_path))
    assert judged["v"]["reward"] == 1.0 and judged["stage"] == DIRECT_ANSWER_HACKER
    (tmp_path / "config.json").write_text(json.dumps({**config, "penalize_template_copy": True}))
    assert dynamics.run_rules(tmp_path) == Rules(penalize_template_copy=True)
    (judged,) = dynamics.classify_rows([row], dynamics.run_rules(tmp_path))
    assert judged["v"]["reward"] == -1.0 and judged["stage"] == FORMAT_FAILURE


@pytest.mark.parametrize("key,value", [("penalize_template_copy", "yes"),
                                       ("strict_format", 1), ("format_reward", True),
                                       ("correct_reward", "1.0")])
def test_a_config_rule_of_the_wrong_type_names_the_file_and_the_flag(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps({key: value}))
    with pytest.raises(ValueError, match=rf"config.json: {key} is {value!r}, expected"):
        dynamics.run_rules(tmp_path)


def test_held_out_accuracy_from_eval_jsonl_joins_the_report(tmp_path):
    """train_ppo.py --eval_every writes eval.jsonl: its accuracy curve (the study's) goes into
    dynamics.md, dynamics.json and the figure."""
    response = "<think>Itching means allergy.</think><answer>B</answer>"
    row = {"id": "q0", "prompt": "...", "response": response, "gold": "B", "options": EYE,
           "reward": 1.0, "pred": "B", "format_ok": True, "answer_in_think": False,
           "reasoning_outside_think": False, "template_copy": False, "response_tokens": 9,
           "prompt_style": "r1"}
    (tmp_path / "rollouts.jsonl").write_text(
        "".join(json.dumps({**row, "step": step}) + "\n" for step in (1, 2, 3, 4)))
    evaluated = [(0, "medqa_test", 0.25), (0, "mmlu_pro_health", 0.125), (4, "medqa_test", 0.5)]
    (tmp_path / "eval.jsonl").write_text("".join(
        json.dumps({"step": step, "data": name, "accuracy": acc, "n": 8}) + "\n"
        for step, name, acc in evaluated))
    curves = dynamics.read_held_out(tmp_path / "eval.jsonl")
    assert curves == {"medqa_test": [(0, 0.25), (4, 0.5)], "mmlu_pro_health": [(0, 0.125)]}
    assert dynamics.held_out_table(curves).splitlines()[2:] == ["| 0 | 25.0 | 12.5 |",
                                                                "| 4 | 50.0 | - |"]
    dynamics.main([str(tmp_path)])
    assert "### Held-out accuracy (eval.jsonl, greedy)" in (tmp_path / "dynamics.md").read_text()
    saved = json.loads((tmp_path / "dynamics.json").read_text())["held_out"]
    assert saved == {"medqa_test": [[0, 0.25], [4, 0.5]], "mmlu_pro_health": [[0, 0.125]]}
    assert (tmp_path / "dynamics.png").exists() == has_matplotlib()
    assert dynamics.read_held_out(tmp_path / "no_such_file.jsonl") == {}


def write_curve_run(folder):
    """A run folder with rollouts.jsonl, metrics.jsonl (as train_ppo.py writes it: step 3 skipped
    its update, so it logs no entropy) and eval.jsonl; returns the metrics rows written."""
    response = "<think>Itching means allergy.</think><answer>B</answer>"
    rollout_row = {"id": "q0", "prompt": "...", "response": response, "gold": "B", "options": EYE,
                   "reward": 1.0, "response_tokens": 9, "prompt_style": "r1"}
    (folder / "rollouts.jsonl").write_text(
        "".join(json.dumps({**rollout_row, "step": step}) + "\n" for step in (1, 2, 3)))
    metrics_rows = [
        {"step": 1, "reward": -0.75, "format_rate": 0.25, "accuracy": 0.0, "response_tokens": 67.5,
         "kl": 0.0004, "entropy": 3.7, "time_step": 42.0},
        {"step": 2, "reward": -0.5625, "format_rate": 0.375, "accuracy": 0.0625,
         "response_tokens": 89.75, "kl": 0.21, "entropy": 3.6, "time_step": 40.0},
        {"step": 3, "reward": 0.125, "format_rate": 0.875, "accuracy": 0.5,
         "response_tokens": 35.25, "kl": 0.7, "time_step": 39.0},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics_rows))
    evaluated = [(0, "medqa_test", 0.0625), (2, "medqa_test", 0.25), (0, "mmlu_pro_health", 0.125)]
    (folder / "eval.jsonl").write_text("".join(
        json.dumps({"step": step, "data": name, "accuracy": acc, "n": 16}) + "\n"
        for step, name, acc in evaluated))
    return metrics_rows


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib is optional")
def test_training_curves_draw_the_logged_metrics(tmp_path, capsys):
    metrics_rows = write_curve_run(tmp_path)
    dynamics.main([str(tmp_path)])
    assert f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().out
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    held_out = dynamics.read_held_out(tmp_path / "eval.jsonl")
    drawn = dynamics.plot_curves(metrics_rows, tmp_path / "again.png", held_out)
    # What the figure's lines hold is exactly what metrics.jsonl and eval.jsonl hold.
    assert drawn == {
        "reward": ([1, 2, 3], [-0.75, -0.5625, 0.125]),
        "format_rate": ([1, 2, 3], [0.25, 0.375, 0.875]),
        "accuracy": ([1, 2, 3], [0.0, 0.0625, 0.5]),
        "response_tokens": ([1, 2, 3], [67.5, 89.75, 35.25]),
        "kl": ([1, 2, 3], [0.0004, 0.21, 0.7]),
        "entropy": ([1, 2], [3.7, 3.6]),  # step 3 logged none
        "held_out/medqa_test": ([0, 2], [0.0625, 0.25]),
        "held_out/mmlu_pro_health": ([0], [0.125]),
    }
    # Without eval.jsonl: no held-out panel.
    assert "held_out/medqa_test" not in dynamics.plot_curves(metrics_rows, tmp_path / "c.png")


def test_training_curves_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is optional: without it (simulated), one line says so, the report is still
    written and no figure is."""
    metrics_rows = write_curve_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert dynamics.plot_curves(metrics_rows, tmp_path / "curves.png") is None
    dynamics.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("matplotlib is not installed") == 1
    assert (tmp_path / "dynamics.md").is_file()
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "dynamics.png").exists()
