"""train_ppo.py end to end: bad settings, the smoke preset, exact resume, learning, and FSDP2 under
torchrun.

Most runs use the toy task of conftest.py, which a 12-token model learns in seconds: "Pick C" -> the
response must be `C</answer>` after the prefilled `<think></think><answer>`. Subprocesses run with
OMP_NUM_THREADS=1: tiny models are much faster single-threaded on a shared machine, and results do
not depend on thread counts.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, trainer_command

import train_ppo

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
VOLATILE = ("time_", "tokens_per_s")  # wall-clock figures differ between runs; nothing else may


def run(args, out, faults="", torchrun=0, check=True, timeout=300):
    cmd = trainer_command("train_ppo.py", [*args, "--out_dir", out], faults, torchrun)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a, b, rel=0.0):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for k, v in x.items():
            if k.startswith(VOLATILE):
                continue
            if isinstance(v, float) and rel:
                assert y[k] == pytest.approx(v, rel=rel, abs=rel), (x["step"], k)
            else:
                assert y[k] == v, (x["step"], k, v, y[k])


def same_file(a, b, name="rollouts.jsonl"):
    return (a / name).read_text() == (b / name).read_text()


def held_out(toy):
    """Flags of an evaluation every 2 steps, on 8 of the toy questions, 4 tokens each."""
    questions = toy[toy.index("--train_data") + 1]
    return ["--eval_every", "2", "--eval_data", questions, "--eval_limit", "8",
            "--eval_max_new_tokens", "4"]


def eval_lines(out):
    """eval.jsonl without its wall-clock field."""
    lines = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


# ------------------------------------------------------------------------------------------------
def test_bad_settings_stop_at_once_naming_the_flag(capsys):
    cases = ((["--preset", "nope"], "--preset 'nope': unknown"),
             (["--preset", "smoke", "--train_batch_size", "3"], "--train_batch_size 3 must divide"),
             (["--preset", "smoke", "--advantage", "grpo", "--n_samples_per_prompt", "1"],
              "--n_samples_per_prompt must be >= 2"),
             (["--preset", "smoke", "--micro_batch_size", "3"], "--micro_batch_size 3 must divide"),
             (["--preset", "smoke", "--kl_estimator", "k9"], "--kl_estimator 'k9'"),
             (["--preset", "smoke", "--engine", "vllm"],
              "--engine 'vllm': choose one of auto, plain, dynamic, static"),
             (["--preset", "smoke", "--lora_rank", "-1"], "--lora_rank -1: must be >= 0"),
             (["--preset", "smoke", "--lora_rank", "2", "--lora_alpha", "0"],
              "--lora_alpha 0.0: must be > 0"),
             (["--preset", "smoke", "--lora_rank", "2", "--lora_targets", "q_proj,c_attn"],
              "--lora_targets 'q_proj,c_attn': unknown ['c_attn']"),
             (["--preset", "smoke", "--engine", "plain", "--compile_decode", "true"],
              "--compile_decode compiles the static decode step"))
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            train_ppo.parse_config(argv)
        assert e.value.code == 2
        assert words in capsys.readouterr().err


def test_presets_overlay_the_study_defaults():
    cfg = train_ppo.parse_config(["--preset", "paper"])
    assert (cfg.model, cfg.actor_lr, cfg.critic_lr, cfg.kl_coef, cfg.kl_estimator, cfg.gamma,
            cfg.lam, cfg.clip_eps, cfg.value_clip_eps, cfg.temperature, cfg.max_new_tokens,
            cfg.advantage) == ("Qwen/Qwen2.5-3B", 1e-6, 9e-6, 0.01, "k1", 1.0, 1.0, 0.2, 0.2, 1.0,
                               1024, "gae")
    # OpenRLHF v0.5.7-0.6: the sequence mean of token means; generation to EOS or the length
    # limit; old log-probs from a training forward in bf16; the study's evaluation every 4 steps
    assert (cfg.loss_agg, cfg.stop_at_answer, cfg.recompute_logprobs, cfg.dtype) == \
        ("seq-mean", False, "auto", "bfloat16")
    assert train_ppo.recompute_logprobs(cfg)
    assert (cfg.eval_every, cfg.eval_data, cfg.eval_limit) == (4, "medqa_test,mmlu_pro_health", 0)
    assert (cfg.clip_eps_high, cfg.ratio_level, cfg.tis_cap, cfg.filter_groups,
            cfg.overlong_buffer) == (0.0, "token", 0.0, False, 0)  # the study's plain PPO
    cfg = train_ppo.parse_config(["--max_steps", "7", "--resume"])  # demo is the default preset
    assert cfg.model == "smollm2-135m" and cfg.max_steps == 7 and cfg.resume is True


def test_help_lists_the_trainers_own_flags_first(capsys):
    with pytest.raises(SystemExit):
        train_ppo.parse_config(["--help"])
    text = capsys.readouterr().out
    assert text.index("--preset") < text.index("--model") < text.index("--out_dir")
    assert text.index("--forward_token_budget") < text.index("--max_steps")


def test_each_rank_gets_its_slice_of_every_minibatch():
    cfg = train_ppo.parse_config(["--preset", "smoke", "--rollout_batch_size", "8",
                                  "--n_samples_per_prompt", "2", "--train_batch_size", "8"])
    batching = train_ppo.batching(cfg)
    indices = train_ppo.experience.step_prompt_indices
    one_rank = indices(batching, 20, 3, 0, 1)
    two_ranks = [indices(batching, 20, 3, r, 2) for r in (0, 1)]
    # minibatch k (4 prompts) = the same prompts whether one rank holds them or two ranks hold 2
    for k in range(2):
        held_by_two = two_ranks[0][2 * k:2 * k + 2] + two_ranks[1][2 * k:2 * k + 2]
        assert sorted(one_rank[4 * k:4 * k + 4]) == sorted(held_by_two)
    # steps walk through a seeded permutation of the data, a new one each epoch
    seen = [i for s in range(1, 6) for _, i in indices(batching, 20, s, 0, 1)]
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:40]) == list(range(20))


@pytest.mark.slow
def test_smoke_preset_runs_end_to_end_with_a_checkpoint_each_step(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    import checkpoint
    run(["--preset", "smoke"], tmp_path)
    m = metrics(tmp_path)
    assert [x["step"] for x in m] == [1, 2, 3]
    for key in ("reward", "accuracy", "format_rate", "template_copy_rate", "kl", "entropy",
                "policy_loss", "value_loss", "clipfrac", "approx_kl", "explained_variance",
                "actor_grad_norm", "critic_grad_norm", "actor_lr", "time_generate", "time_score",
                "time_train_logprobs", "time_reference", "time_critic", "time_update",
                "tokens_per_s"):
        assert key in m[0], key
    rollouts = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 3 * 4 * 2
    assert {"response", "reward", "gold", "template_copy"} <= set(rollouts[0])
    ckpts = checkpoint.list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step_000001", "step_000002", "step_000003"]
    assert all(checkpoint.verify(c) == [] for c in ckpts)
    AutoModelForCausalLM.from_pretrained(ckpts[-1] / "policy")
    AutoModelForTokenClassification.from_pretrained(ckpts[-1] / "critic")


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(toy, tmp_path):
    flags = toy + held_out(toy)
    run(flags, tmp_path / "straight")
    crashed = run(flags + ["--save_every", "1"], tmp_path / "resumed", faults="raise@3",
                  check=False)
    assert crashed.returncode != 0 and "injected fault at step 3" in crashed.stderr
    run(flags + ["--save_every", "1", "--resume"], tmp_path / "resumed")
    assert_same_metrics(metrics(tmp_path / "straight"), metrics(tmp_path / "resumed"))
    assert same_file(tmp_path / "straight", tmp_path / "resumed")
    # held-out evaluation at steps 0, 2, 4, each once, the same after the resume
    assert [line["step"] for line in eval_lines(tmp_path / "straight")] == [0, 2, 4]
    assert eval_lines(tmp_path / "straight") == eval_lines(tmp_path / "resumed")
    assert eval_lines(tmp_path / "straight")[0]["n"] == 8


@pytest.mark.slow
def test_the_loop_learns_a_small_verifiable_task_and_not_with_lr_zero(toy, tmp_path):
    run(toy + ["--max_steps", "40", "--save_every", "100"], tmp_path / "learn")
    run(toy + ["--max_steps", "15", "--save_every", "100", "--actor_lr", "0", "--critic_lr", "0"],
        tmp_path / "frozen")
    learn, frozen = metrics(tmp_path / "learn"), metrics(tmp_path / "frozen")
    start = sum(m["reward"] for m in learn[:3]) / 3
    assert start < -0.6  # a random 12-token model rarely writes "X</answer>"
    end = sum(m["reward"] for m in learn[-5:]) / 5
    assert end > start + 0.7, [round(m["reward"], 2) for m in learn]
    assert sum(m["format_rate"] for m in learn[-5:]) / 5 > 0.9
    still = sum(m["reward"] for m in frozen[-5:]) / 5
    assert abs(still - start) < 0.2, [round(m["reward"], 2) for m in frozen]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--advantage", "grpo"],
                                   ["--advantage", "drgrpo",
                                    "--loss_agg", "seq-mean-token-sum-norm"],
                                   ["--advantage", "rloo", "--kl_in_reward", "false"],
                                   ["--kl_target", "0.5", "--loss_agg", "seq-mean",
                                    "--entropy_coef", "0.01"],
                                   ["--advantage", "reinforce_pp"],
                                   ["--clip_eps_high", "0.28", "--ratio_level", "sequence",
                                    "--tis_cap", "2", "--overlong_buffer", "2",
                                    "--overlong_penalty", "0.5"]])
def test_other_algorithm_choices_run(toy, tmp_path, flags):
    run(toy + flags + ["--max_steps", "3", "--save_every", "3"], tmp_path)
    m = metrics(tmp_path)
    assert len(m) == 3
    if "--advantage" in flags:  # critic-free: no critic at all
        assert not (tmp_path / "checkpoints" / "step_000003" / "critic").exists()
        assert all("value_loss" not in x for x in m)
    if "--kl_target" in flags:
        assert m[-1]["kl_coef"] != 0.01  # the adaptive controller moved beta
    if "--overlong_buffer" in flags:  # responses of the whole budget (4 tokens) cost 0.5
        long_share = sum(x["truncated_rate"] for x in m) / len(m)
        assert long_share > 0 and all(x["score"] < x["reward"] for x in m if x["truncated_rate"])


@pytest.mark.slow
def test_in_bf16_the_old_logprobs_are_a_training_forwards_and_the_first_kl_is_zero(toy, tmp_path):
    """--dtype bfloat16 (CPU autocast here, as on one GPU): the sampler's log-probs differ from a
    training forward's, so PPO's old log-probs are recomputed (auto), and the reference runs as the
    policy does: on the same weights, at step 1, the KL is exactly 0. The gap is logged."""
    run(toy + ["--dtype", "bfloat16", "--max_steps", "2", "--save_every", "2"], tmp_path)
    m = metrics(tmp_path)
    assert m[0]["kl"] == 0.0 and m[1]["kl"] != 0.0
    assert 0 < m[0]["sampler_gap_mean"] <= m[0]["sampler_gap_max"] < 1
    assert 0 <= m[0]["sampler_ratio_outside_half_to_2"] <= 1
    fp32 = tmp_path / "fp32"
    run(toy + ["--max_steps", "1", "--save_every", "1"], fp32)
    assert metrics(fp32)[0]["sampler_gap_max"] < 1e-4  # fp32: numerics only


@pytest.mark.slow
def test_without_stop_at_answer_a_response_runs_to_eos_or_the_limit(toy, tmp_path):
    """--stop_at_answer false (the study's OpenRLHF): generation does not stop at </answer>, so
    text after it reaches the verifier, which scores it as a broken format."""
    run(toy + ["--stop_at_answer", "false", "--max_new_tokens", "6", "--max_steps", "2",
               "--save_every", "2", "--actor_lr", "0"], tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert {r["finish_reason"] for r in rows} <= {"eos", "length"}
    after = [r for r in rows if "</answer>" in r["response"]
             and r["response"].split("</answer>", 1)[1].strip()]
    assert after, "no response wrote past </answer>: nothing was tested"
    assert all(r["reward"] == -1 and not r["format_ok"] for r in after)


@pytest.mark.slow
def test_dynamic_sampling_replaces_groups_that_scored_alike(toy, tmp_path):
    """--filter_groups (DAPO): a frozen random model scores most groups alike (all -1); further
    prompts are sampled until the batch holds varied groups, and the metrics say what it took."""
    run(toy + ["--advantage", "grpo", "--filter_groups", "--max_sample_rounds", "6",
               "--actor_lr", "0", "--max_steps", "3", "--save_every", "3"], tmp_path)
    m = metrics(tmp_path)
    assert all(x["varied_group_rate"] < 1 for x in m)  # the step's own batch was not enough
    assert all(x["sample_rounds"] > 1 for x in m)
    rows = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    for step in (1, 2, 3):
        groups = {}
        for r in rows:
            if r["step"] == step:
                groups.setdefault(r["row"] // 4, []).append(r["reward"])
        assert len(groups) == 8  # the batch keeps its size
        alike = sum(len(set(rewards)) == 1 for rewards in groups.values())
        assert alike == m[step - 1]["alike_groups_kept"]  # only what the rounds could not fill


@pytest.mark.slow
def test_critic_free_step_with_no_signal_is_skipped(toy, tmp_path):
    # a frozen random model mostly scores -1 on every sample of a group: such a group carries no
    # advantage, and a step where every group does (the KL a loss term, not in the advantages) is
    # skipped
    run(toy + ["--advantage", "grpo", "--n_samples_per_prompt", "2", "--rollout_batch_size", "2",
               "--train_batch_size", "4", "--max_steps", "6", "--save_every", "6",
               "--actor_lr", "0", "--kl_in_reward", "false"], tmp_path)
    skipped = [m for m in metrics(tmp_path) if m.get("skipped") == "all advantages zero"]
    assert skipped and all("policy_loss" not in m for m in skipped)


@pytest.mark.slow
def test_packed_forwards_give_the_padded_run(toy, tmp_path):
    """--pack_samples (each prompt once for its 4 samples, the default) against padded rows: the
    same samples, rewards and losses through 3 steps of PPO with a critic, up to float rounding."""
    run(toy + ["--max_steps", "3", "--save_every", "3"], tmp_path / "packed")
    run(toy + ["--max_steps", "3", "--save_every", "3", "--pack_samples", "false"],
        tmp_path / "padded")
    assert_same_metrics(metrics(tmp_path / "packed"), metrics(tmp_path / "padded"), rel=1e-5)
    assert same_file(tmp_path / "packed", tmp_path / "padded")


@pytest.mark.slow
def test_the_plain_engine_gives_the_fast_engines_run(toy, tmp_path):
    """--engine plain (rollout.generate, the teaching core) samples what the fast engine samples:
    the same responses and rewards, and the same losses up to float rounding."""
    run(toy + ["--max_steps", "3", "--save_every", "3"], tmp_path / "fast")
    run(toy + ["--max_steps", "3", "--save_every", "3", "--engine", "plain"], tmp_path / "plain")
    assert_same_metrics(metrics(tmp_path / "fast"), metrics(tmp_path / "plain"), rel=1e-5)
    assert same_file(tmp_path / "fast", tmp_path / "plain")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_compiled_layers_give_the_eager_run(toy, tmp_path, checkpointing):
    """--compile (torch.compile of every decoder layer for the training forwards; generation is
    untouched) gives the eager run's samples, and its losses up to float rounding, through 2 steps
    of PPO with a critic, with gradient checkpointing off and on (then the checkpoint is compiled
    too: tests/test_compile.py)."""
    flags = toy + ["--max_steps", "2", "--save_every", "2",
                   "--gradient_checkpointing", checkpointing]
    run(flags, tmp_path / "eager")
    run(flags + ["--compile", "true"], tmp_path / "compiled")
    assert_same_metrics(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled"), rel=1e-5)
    assert same_file(tmp_path / "eager", tmp_path / "compiled")


@pytest.mark.slow
def test_two_processes_give_the_same_run_as_one(toy, tmp_path):
    """FSDP2 over 2 gloo ranks vs one plain process, same global batch. fp32 on CPU: every sample is
    identical (per-row sampling noise), and the only difference is summation order (a gradient is
    reduced from two halves instead of summed at once), a relative error ~1e-7 per operation: 1e-5
    over 4 steps is tight yet safe."""
    from transformers import AutoModelForCausalLM
    run(toy + held_out(toy), tmp_path / "one")
    run(toy + held_out(toy), tmp_path / "two", torchrun=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert_same_metrics(one, two, rel=1e-5)
    assert same_file(tmp_path / "one", tmp_path / "two")
    # each rank evaluates its share of the held-out questions: the same evaluation
    assert eval_lines(tmp_path / "one") == eval_lines(tmp_path / "two")
    # the checkpoint written by 2 processes loads in 1 and gives the 1-process run's logits
    ids = torch.tensor([[5, 6, 7, 8, 4, 9, 10]])
    folders = [tmp_path / d / "checkpoints" / "step_000004" / "policy" for d in ("one", "two")]
    logits = [AutoModelForCausalLM.from_pretrained(folder)(ids).logits for folder in folders]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    # and a run saved by 2 processes resumes in 1, continuing exactly
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
    shutil.rmtree(tmp_path / "two_then_one" / "checkpoints" / "step_000004")
    run(toy + ["--resume"], tmp_path / "two_then_one")
    assert_same_metrics(one, metrics(tmp_path / "two_then_one"), rel=1e-5)

# A rank that raises or dies ending the whole job is tested in tests/test_faults.py.
