"""eval.py: bootstrap figures, scoring per prompt style, results aggregation, the compare table,
end to end."""
import json
import math
import sys
import time

import numpy as np
import pytest

import eval as evaluation  # `eval` itself would hide the builtin
from data import load_dataset

OPTIONS = {"A": "Artificial tears", "B": "Ketotifen eye drops", "C": "Oral prednisone",
           "D": "Topical erythromycin"}
RECORD = {"id": "q1", "question": "?", "options": OPTIONS, "answer": "B", "source": "test",
          "meta": {}}


def test_bootstrap_std_equals_explicit_loop():
    correct = np.random.default_rng(1).random(301) < 0.4  # [n] a fake 0/1 correctness vector
    rng = np.random.default_rng(7)
    resamples = rng.integers(0, len(correct), size=(1000, len(correct)))
    direct = np.std([correct[resamples[i]].mean() for i in range(1000)])  # one resample at a time
    assert evaluation.bootstrap_std(correct, 1000, seed=7) == pytest.approx(direct, abs=1e-15)
    # Seeded: the same figure again, from a list this time.
    from_list = evaluation.bootstrap_std(list(correct), 1000, seed=7)
    assert evaluation.bootstrap_std(correct, 1000, seed=7) == from_list


def test_bootstrap_std_close_to_binomial():
    n, p = 818, 0.4
    correct = np.arange(n) < round(p * n)
    # The std of a mean of n Bernoulli(p): ~1.7 points, the study's bars.
    expected = math.sqrt(p * (1 - p) / n)
    assert evaluation.bootstrap_std(correct) == pytest.approx(expected, rel=0.1)
    assert evaluation.bootstrap_std([1] * 50) == 0.0 and evaluation.bootstrap_std([]) == 0.0


def test_score_r1_uses_prefill_and_verifier():
    # "<think>" was in the prompt.
    response = "Allergic conjunctivitis.</think><answer>B</answer>"
    scored = evaluation.score(response, RECORD, "r1_chat")
    flags = (scored["format_ok"], scored["pred"], scored["correct"], scored["reward"])
    assert flags == (True, "B", True, 1.0)
    scored = evaluation.score("The answer is B.", RECORD, "r1")
    assert scored["format_ok"] is False and scored["reward"] == -1.0 and not scored["correct"]


def test_score_direct_and_cot_read_the_letter():
    scored = evaluation.score("B", RECORD, "direct")
    flags = (scored["format_ok"], scored["pred"], scored["correct"], scored["reward"])
    assert flags == (True, "B", True, 1.0)
    scored = evaluation.score("I am not sure.", RECORD, "direct")
    # format rate = a letter was found
    assert (scored["format_ok"], scored["pred"], scored["reward"]) == (False, None, 0.0)
    scored = evaluation.score("Option A is tempting, but itching means allergy. The answer is B.",
                              RECORD, "cot")
    assert (scored["pred"], scored["correct"]) == ("B", True)


def fake_preds(flags, meta=None):
    return [{"correct": correct, "format_ok": format_ok, "pred": pred, "reward": float(correct),
             "response": "x" * 10, "response_tokens": 7, "meta": (meta or {})}
            for correct, format_ok, pred in flags]


def test_metrics_and_breakdowns():
    preds = fake_preds([(True, True, "A"), (False, True, "C"), (False, False, None),
                        (True, True, "B")])
    for pred, step in zip(preds, ["step1", "step1", "step2&3", "step2&3"]):
        pred["meta"] = {"step": step}
    metrics = evaluation.metrics(preds)
    rates = (metrics["n"], metrics["accuracy"], metrics["format_rate"], metrics["no_letter_rate"])
    assert rates == (4, 0.5, 0.75, 0.25)
    assert metrics["mean_response_chars"] == 10 and metrics["mean_response_tokens"] == 7
    for pred, n_options in zip(preds, [4, 4, 5, 10]):
        pred["n_options"] = n_options
    chance = (1 / 4 + 1 / 4 + 1 / 5 + 1 / 10) / 4  # the mean of 1 / options
    assert evaluation.metrics(preds)["chance"] == pytest.approx(chance)
    breakdowns = evaluation.breakdowns(preds)
    assert set(breakdowns) == {"by_step"}
    assert breakdowns["by_step"]["step1"]["accuracy"] == 0.5
    assert breakdowns["by_step"]["step2&3"]["n"] == 2


def write_run(path, prompt, sets):
    path.mkdir()
    set_results = {name: {"n": 100, "accuracy": accuracy, "accuracy_std": std, "chance": 0.25}
                   for name, (accuracy, std) in sets.items()}
    results = {"config": {"prompt": prompt}, "sets": set_results}
    (path / "results.json").write_text(json.dumps(results))


def test_compare_table(tmp_path, capsys):
    write_run(tmp_path / "base", "direct",
              {"medqa_test": (0.235, 0.012), "mmlu_pro_health": (0.251, 0.015)})
    write_run(tmp_path / "ppo", "r1", {"medqa_test": (0.492, 0.014)})
    evaluation.main(["--compare", str(tmp_path / "base"), str(tmp_path / "ppo")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| run | medqa_test | mmlu_pro_health |"
    assert lines[2] == "| base (direct) | 23.5 ± 1.2 | 25.1 ± 1.5 |"
    assert lines[3] == "| ppo (r1) | 49.2 ± 1.4 | - |"
    assert lines[4] == "| random guess | 25.0 | 25.0 |"


@pytest.mark.slow
def test_eval_end_to_end_tiny_model(tmp_path):
    """results.json agrees with predictions.jsonl, on a random tiny model and 8 real MedQA
    questions."""
    out = tmp_path / "run"
    started = time.time()
    evaluation.main(["--model", "tiny-qwen2", "--data", "medqa_test", "--prompt", "r1",
                     "--limit", "8", "--out", str(out), "--max_new_tokens", "16",
                     "--batch_size", "3", "--device", "cpu"])
    assert time.time() - started < 60
    results = json.loads((out / "results.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    medqa = results["sets"]["medqa_test"]
    assert medqa["n"] == len(preds) == 8
    assert medqa["accuracy"] == pytest.approx(np.mean([p["correct"] for p in preds]))
    assert medqa["mean_reward"] == pytest.approx(np.mean([p["reward"] for p in preds]))
    assert medqa["format_rate"] == pytest.approx(np.mean([p["format_ok"] for p in preds]))
    # The data set's order is restored after the length-sorted batches.
    assert [p["id"] for p in preds] == [r["id"] for r in load_dataset("medqa_test")[:8]]
    assert medqa["chance"] == 0.25  # medqa_test has four options
    assert set(medqa["by_step"]) <= {"step1", "step2&3"}
    assert sum(group["n"] for group in medqa["by_step"].values()) == 8


def test_compare_plot_optional(tmp_path, monkeypatch):
    """With matplotlib: a PNG. Without it (simulated): no plot, no error."""
    write_run(tmp_path / "a", "r1", {"medqa_test": (0.3, 0.01), "mmlu_pro_health": (0.2, 0.02)})
    write_run(tmp_path / "b", "direct", {"medqa_test": (0.4, 0.01)})
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    try:
        import matplotlib  # noqa: F401
        assert evaluation.compare_plot(dirs, str(tmp_path / "c.png"))
        assert (tmp_path / "c.png").stat().st_size > 1000
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert evaluation.compare_plot(dirs, str(tmp_path / "d.png")) is False
    assert not (tmp_path / "d.png").exists()


def test_score_reads_only_the_answer_not_an_invented_continuation():
    scored = evaluation.score(" B\n\nQuestion: A 45-year-old man ...\nA. x\nB. y\nAnswer: C",
                              RECORD, "direct")
    assert scored["pred"] == "B"
    scored = evaluation.score("B. Ketotifen eye drops\n\nExplanation: A and C are wrong.", RECORD,
                              "direct")
    assert scored["pred"] == "B"
    scored = evaluation.score("A. Artificial tears\nB. Ketotifen eye drops\nC. Oral", RECORD,
                              "direct_chat")
    assert scored["pred"] is None
    scored = evaluation.score("The answer is not obvious. Itching means allergy. The answer is B."
                              "\nQuestion: ... The answer is C.", RECORD, "cot")
    assert scored["pred"] == "B"


def test_resolve_model_finds_the_newest_policy_of_a_run(tmp_path):
    for step in (2, 10):
        (tmp_path / "run" / "checkpoints" / f"step_{step:06d}" / "policy").mkdir(parents=True)
    newest = str(tmp_path / "run" / "checkpoints" / "step_000010" / "policy")
    assert evaluation.resolve_model(str(tmp_path / "run")) == newest
    assert evaluation.resolve_model(str(tmp_path / "run" / "checkpoints")) == newest
    step_policy = evaluation.resolve_model(str(tmp_path / "run" / "checkpoints" / "step_000002"))
    assert step_policy.endswith("step_000002/policy")
    assert evaluation.resolve_model("smollm2-135m") == "smollm2-135m"
