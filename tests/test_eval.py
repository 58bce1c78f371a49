"""eval.py: bootstrap figures, scoring per prompt style, results aggregation, the compare table,
end to end; sampled evaluation (pass@k, maj@n)."""
import itertools
import json
import math
import sys
import time
from fractions import Fraction

import numpy as np
import pytest

import eval as evaluation  # `eval` itself would hide the builtin
from sources import load_dataset

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


# --------------------------------------------------------------------------------------------------
# Sampled evaluation

def test_pass_at_k_equals_brute_force_over_every_k_subset():
    """pass@k = the share of the C(n, k) subsets of k samples that hold a correct one, counted."""
    for n in range(1, 8):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hits = sum(any(correct[i] for i in subset) for subset in subsets)
                exact = Fraction(hits, len(subsets))
                assert evaluation.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    # Large n, where C(n, k) itself would overflow a float: the closed form in exact integers.
    exact = 1 - Fraction(math.comb(2000 - 13, 500), math.comb(2000, 500))
    assert evaluation.pass_at_k(2000, 13, 500) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_ks_are_one_the_powers_of_two_and_n():
    assert evaluation.pass_at_ks(1) == [1]
    assert evaluation.pass_at_ks(4) == [1, 2, 4]
    assert evaluation.pass_at_ks(6) == [1, 2, 4, 6]
    assert evaluation.pass_at_ks(16) == [1, 2, 4, 8, 16]


def test_majority_vote_ties_and_samples_without_a_letter():
    assert evaluation.majority_vote(["B", "C", "B", None]) == "B"
    # A tie goes to the tied letter sampled first.
    assert evaluation.majority_vote(["C", "B", "B", "C"]) == "C"
    assert evaluation.majority_vote(["B", "A", "A", "B", "D"]) == "B"
    # No letter, no vote: three samples without one do not outvote a single "D".
    assert evaluation.majority_vote([None, None, None, "D"]) == "D"
    assert evaluation.majority_vote([None, None]) is None
    assert evaluation.majority_vote([]) is None


def sampled_preds(questions):
    """predict()-like rows: [(id, gold, [predicted letter or None per sample], meta)]."""
    preds = []
    for question_id, gold, letters, meta in questions:
        for sample, letter in enumerate(letters):
            preds.append({"id": question_id, "gold": gold, "pred": letter, "sample": sample,
                          "correct": letter == gold, "format_ok": letter is not None,
                          "reward": float(letter == gold), "response": "x" * 3,
                          "response_tokens": 2, "n_options": 4, "meta": meta})
    return preds


def explicit_bootstrap_std(values, seed=0):
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(values), size=(evaluation.BOOTSTRAP_RESAMPLES, len(values)))
    return np.std([np.mean([values[i] for i in row]) for row in resamples])


def test_sampled_metrics_on_hand_made_questions():
    preds = sampled_preds([
        ("q1", "B", ["B", "C", "B", None], {"step": "step1"}),  # 2 of 4 right; the vote: B, right
        ("q2", "A", ["C", "A", "A", "C"], {"step": "step1"}),  # 2 of 4 right; a tie: C, wrong
        ("q3", "D", [None, None, None, None], {"step": "step2&3"}),  # no vote: wrong
    ])
    result = evaluation.sampled_metrics(preds, 4, seed=3)
    assert (result["n"], result["samples"], result["num_samples"]) == (3, 12, 4)
    assert result["accuracy"] == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert result["pass@1"] == pytest.approx(result["accuracy"])
    # pass@2 with 2 of 4 right: 1 - C(2, 2) / C(4, 2) = 5/6.
    assert result["pass@2"] == pytest.approx((5 / 6 + 5 / 6 + 0) / 3)
    assert result["pass@4"] == pytest.approx(2 / 3)
    assert result["maj@4"] == pytest.approx(1 / 3)
    assert result["no_letter_rate"] == pytest.approx(5 / 12)
    assert result["format_rate"] == pytest.approx(7 / 12)
    # Error bars over questions: resample the 3 questions, not the 12 samples.
    assert result["accuracy_std"] == pytest.approx(explicit_bootstrap_std([0.5, 0.5, 0.0], 3))
    assert result["pass@2_std"] == pytest.approx(explicit_bootstrap_std([5 / 6, 5 / 6, 0.0], 3))
    assert result["maj@4_std"] == pytest.approx(explicit_bootstrap_std([1.0, 0.0, 0.0], 3))
    by_step = evaluation.breakdowns(preds, seed=3, num_samples=4)["by_step"]
    assert (by_step["step1"]["n"], by_step["step1"]["pass@4"], by_step["step1"]["maj@4"]) == (
        2, 1.0, 0.5)
    assert by_step["step2&3"]["pass@4"] == 0.0
    with pytest.raises(ValueError, match="not 4 samples per question"):
        evaluation.sampled_metrics(preds[:-1], 4)


def test_sampling_flags_are_checked(tmp_path, capsys):
    wrong = [(["--num_samples", "4"], "--num_samples 4 needs --temperature > 0"),
             (["--num_samples", "0", "--temperature", "1"], "--num_samples must be at least 1"),
             (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or positive")]
    for flags, message in wrong:
        with pytest.raises(SystemExit):
            evaluation.parse_args(["--out", str(tmp_path), *flags])
        assert message in capsys.readouterr().err


def test_sampled_eval_end_to_end(toy, tmp_path, capsys):
    """4 sampled answers to each of the 16 toy questions from a random 12-token model: every sample
    in predictions.jsonl; results.json agrees with it; the same samples from a second run, from
    another --batch_size and from --engine plain; and --compare takes a greedy and a sampled folder
    together."""
    model_path = toy[toy.index("--model") + 1]
    data_path = toy[toy.index("--train_data") + 1]

    def run(out, *flags):
        evaluation.main(["--model", model_path, "--data", data_path, "--prompt", "direct",
                         "--max_new_tokens", "1", "--device", "cpu", "--out", str(out), *flags])
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        return json.loads((out / "results.json").read_text())["sets"][data_path], preds

    sampling = ["--num_samples", "4", "--temperature", "1", "--seed", "5"]
    result, preds = run(tmp_path / "sampled", *sampling, "--batch_size", "3")
    assert len(preds) == 16 * 4
    assert [(p["id"], p["sample"]) for p in preds] == [(f"q{i}", j) for i in range(16)
                                                       for j in range(4)]
    assert (result["n"], result["samples"], result["num_samples"]) == (16, 64, 4)
    by_question = [preds[i:i + 4] for i in range(0, 64, 4)]
    assert result["accuracy"] == pytest.approx(np.mean([p["correct"] for p in preds]))
    assert result["pass@1"] == pytest.approx(result["accuracy"])
    # pass@4 of 4 samples: the share of questions with a correct one.
    any_correct = [any(p["correct"] for p in samples) for samples in by_question]
    assert result["pass@4"] == pytest.approx(np.mean(any_correct))
    assert result["pass@4"] >= result["pass@2"] >= result["pass@1"] > 0
    assert result["pass@4"] > result["pass@1"]
    assert result["maj@4"] == pytest.approx(np.mean(
        [evaluation.majority_vote([p["pred"] for p in samples]) == samples[0]["gold"]
         for samples in by_question]))
    # Sampled, not greedy: the samples of a question differ.
    assert any(len({p["response"] for p in samples}) > 1 for samples in by_question)

    def without_seconds(set_result):
        return {key: value for key, value in set_result.items() if key != "seconds"}

    again, preds_again = run(tmp_path / "again", *sampling, "--batch_size", "3")
    other_batch, preds_other_batch = run(tmp_path / "batch16", *sampling, "--batch_size", "16")
    assert preds_again == preds == preds_other_batch
    # rollout.generate samples the same tokens from the same noise.
    _, preds_plain = run(tmp_path / "plain", *sampling, "--batch_size", "16", "--engine", "plain")
    assert [p["response"] for p in preds_plain] == [p["response"] for p in preds]
    assert without_seconds(again) == without_seconds(result) == without_seconds(other_batch)
    _, preds_other_seed = run(tmp_path / "seed6", *sampling[:-1], "6")
    assert [p["response"] for p in preds_other_seed] != [p["response"] for p in preds]

    greedy, greedy_preds = run(tmp_path / "greedy")
    assert len(greedy_preds) == 16 and "sample" not in greedy_preds[0]
    assert "pass@1" not in greedy and greedy["n"] == 16
    capsys.readouterr()
    evaluation.main(["--compare", str(tmp_path / "greedy"), str(tmp_path / "sampled")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].startswith("| greedy (direct) | ")
    expected = f"{evaluation.pct(result['accuracy'])} ± {evaluation.pct(result['accuracy_std'])}"
    assert lines[3] == f"| sampled (direct, mean of 4 samples at T=1) | {expected} |"
