"""The code a GPU runs, run on the CPU: the paper preset at tiny size in bf16 with the GPU's
sampler (--engine static: static shapes, one padded prefill, the host looking every 8 steps; only
graph replay and the kernels differ on a GPU), in one process (bf16 autocast over fp32 weights, the
sampler's own bf16 copy of them) and under torchrun (gloo, FSDP2's bf16 mixed precision); and the
static step built once for a whole run, evaluations included.

Before the sampler kept its KV cache in the compute dtype, the one-process run crashed at its first
sample (an fp32 cache written with bf16 keys: index_copy_'s dtype error)."""
import json
import math
import os
import subprocess

import pytest
from conftest import ROOT, trainer_command

import static_decode
import train_ppo

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_paper(model: str) -> list[str]:
    """The paper preset (GAE with a critic, bf16, KL in the reward, held-out evaluation) at tiny
    size: small batches and lengths, 2 steps, an evaluation at step 0 and after each step."""
    return ["--preset", "paper", "--model", model, "--train_data", "medqa_dev",
            "--rollout_batch_size", "4", "--train_batch_size", "4", "--micro_batch_size", "2",
            "--generate_batch_size", "4", "--max_new_tokens", "24", "--max_steps", "2",
            "--eval_every", "1", "--eval_data", "medqa_test", "--eval_limit", "4",
            "--eval_max_new_tokens", "16", "--device", "cpu", "--dtype", "bfloat16",
            "--engine", "static"]


def strict_json_lines(path) -> list[dict]:
    """Every line of a jsonl file, read by a reader that refuses NaN and Infinity."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def check_run(out):
    metrics = strict_json_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        numbers = [v for v in m.values() if isinstance(v, float)]
        assert all(math.isfinite(v) for v in numbers), m
        assert "skipped" not in m and "policy_loss" in m and "value_loss" in m
        # the sampler (bf16 weights of its own) and a bf16 training forward agree to bf16 precision
        assert m["sampler_gap_mean"] < 0.02 and m["sampler_gap_max"] < 0.5, m
    assert metrics[0]["kl"] == 0.0  # the reference runs as the policy runs: the first KL is 0
    evals = strict_json_lines(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2] and all(e["n"] == 4 for e in evals)
    assert strict_json_lines(out / "rollouts.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-llama"])
def test_the_paper_preset_in_bf16_with_the_gpu_sampler_runs_end_to_end(model, data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = trainer_command("train_ppo.py", [*tiny_paper(model), "--out_dir", str(out)])
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(out)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-llama"])
def test_the_same_under_torchrun_with_fsdp2_bf16_mixed_precision(model, data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = trainer_command("train_ppo.py", [*tiny_paper(model), "--out_dir", str(out)],
                          torchrun=2)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(out)


def test_a_run_builds_its_static_step_once(data_dir, tmp_path, monkeypatch):
    """3 training steps and 2 held-out evaluations (steps 0 and 2, other prompts and lengths) with
    --engine static: the run builds one static step, and each (rows, span) it prepares (on a GPU:
    captures as a CUDA graph) is prepared once; everything after the first sampling call that
    needed a shape reuses it."""
    monkeypatch.setattr(static_decode, "SPAN_MULTIPLE", 16)  # the span grows within a call
    built, runs = [], []
    init, run = static_decode.StaticStep.__init__, static_decode.StaticStep.run

    def counted_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    def counted_run(self, rows, span):
        runs.append((len(built), rows, span))
        return run(self, rows, span)

    monkeypatch.setattr(static_decode.StaticStep, "__init__", counted_init)
    monkeypatch.setattr(static_decode.StaticStep, "run", counted_run)
    train_ppo.main(["--preset", "smoke", "--engine", "static", "--max_steps", "3", "--eval_every",
                    "2", "--eval_data", "medqa_test", "--eval_limit", "6", "--eval_max_new_tokens",
                    "12", "--save_every", "3", "--out_dir", str(tmp_path / "run")])
    evals = strict_json_lines(tmp_path / "run" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2]
    assert len(built) == 1, "the static step was built again"
    shapes = built[0].shapes_built
    assert len(shapes) == len(set(shapes)) and len(runs) > len(shapes)  # replayed, never rebuilt
    assert {(rows, span) for _, rows, span in runs} == set(shapes)
