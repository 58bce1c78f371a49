"""train_sft.py: which tokens carry the loss, the data order, micro-batching, and end to end on a
tiny model (the loss falls, a resumed run equals an uninterrupted one, a checkpoint answers with the
trained letter)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, trainer_command

import common
import data
import model_zoo
import rollout
import sources
import train_sft
import verifier
from model import load_policy, position_ids_from_mask

# the only metrics allowed to differ between identical runs
TIMING_KEYS = {"time_step", "tokens_per_s"}


def run_sft(*args, torchrun=0):
    """python train_sft.py ARGS in a subprocess (or under torchrun with that many processes), one
    thread each (the machine is shared); fails the test on an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = trainer_command("train_sft.py", args, torchrun=torchrun)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(metrics: list) -> list:
    return [{k: v for k, v in step.items() if k not in TIMING_KEYS} for step in metrics]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset as shipped: tiny-qwen2 on MedQA dev, 8 steps of 8, a checkpoint after every
    step."""
    out = tmp_path_factory.mktemp("sft") / "smoke"
    run_sft("--preset", "smoke", "--out_dir", out)
    return out


# ---- the batch: prompt left padded, target right padded, loss only on the letter and the EOS -----
def test_examples_are_the_direct_prompt_then_space_letter_eos(data_dir):
    _, tok = model_zoo.load_tiny()
    cfg = train_sft.parse_config(["--preset", "smoke", "--train_data", "medqa_dev"])
    examples = train_sft.load_examples(cfg, tok, log=print)
    record = sources.load_dataset("medqa_dev")[0]
    prompt = tok.decode(examples[0]["prompt"])
    assert prompt == data.build_prompt(record, "direct")
    assert prompt.endswith("Answer:")
    letter = tok(" " + record["answer"], add_special_tokens=False)["input_ids"]
    assert examples[0]["target"] == letter + [tok.eos_token_id]


def test_make_batch_puts_loss_weight_on_target_tokens_only():
    pad = 99
    # a target of 3 tokens (" ", "C", EOS), then a shorter prompt and a shorter target
    examples = [{"prompt": [1, 2, 3, 4], "target": [10, 11, 12]},
                {"prompt": [5, 6], "target": [13, 14]}]
    ids, attn, mask = train_sft.make_batch(examples, pad)
    assert ids.tolist() == [[1, 2, 3, 4, 10, 11, 12], [pad, pad, 5, 6, 13, 14, pad]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0]]
    # the last T = 3 columns: targets, never prompt or pad
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ids[:, -3:][mask.bool()].tolist() == [10, 11, 12, 13, 14]


def test_target_logprobs_are_those_of_the_last_tokens_and_the_mask_drops_the_padding():
    """target_logprobs = log-softmax of a full forward at the positions before the last T tokens;
    the masked loss sums exactly the target tokens (no prompt token, no right padding)."""
    torch.manual_seed(0)
    model, _ = model_zoo.load_tiny()
    examples = [{"prompt": [5, 6, 7, 8], "target": [3, 38, 0]},
                {"prompt": [9, 10], "target": [3, 0]}]
    ids, attn, mask = train_sft.make_batch(examples, pad_id=1)
    logp, hit = train_sft.target_logprobs(model, ids, attn, mask.shape[1])  # [2, 3]
    positions = position_ids_from_mask(attn)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits.float()
    full = torch.log_softmax(logits, -1)  # [2, L, V]
    # [2, 3] log pi of the last 3 tokens
    expected = full[:, -4:-1].gather(-1, ids[:, -3:, None]).squeeze(-1)
    assert torch.allclose(logp, expected, atol=1e-5)
    assert torch.equal(hit, full[:, -4:-1].argmax(-1) == ids[:, -3:])
    # the pad column is dropped: row 1 has two target tokens
    masked_loss = (-(logp * mask)).sum()
    target_loss = -(expected[0].sum() + expected[1, :2].sum())
    assert (masked_loss - target_loss).abs() < 1e-4


# ---- the data order and the loss normalisation ---------------------------------------------------
def test_flags_override_the_preset_and_help_prints(capsys):
    cfg = train_sft.parse_config(["--preset", "smoke", "--lr", "1e-4", "--resume"])
    assert (cfg.model, cfg.lr, cfg.resume, cfg.train_batch_size) == ("tiny-qwen2", 1e-4, True, 8)
    with pytest.raises(SystemExit) as e:
        train_sft.parse_config(["--help"])
    assert e.value.code == 0 and "--train_batch_size" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_sft.parse_config(["--prompt_style", "r1"])  # SFT answers directly


def test_step_rows_same_global_batch_for_any_world_and_one_permutation_per_epoch():
    cfg = train_sft.parse_config(["--preset", "smoke", "--train_batch_size", "4"])
    n_examples = 10  # batches of 4 straddle the epoch boundary at 10
    # 20 rows: exactly two epochs
    one_rank = [train_sft.step_rows(cfg, n_examples, s, 0, 1) for s in range(1, 6)]
    two_ranks = [train_sft.step_rows(cfg, n_examples, s, 0, 2)
                 + train_sft.step_rows(cfg, n_examples, s, 1, 2) for s in range(1, 6)]
    assert one_rank == two_ranks
    flat = [i for rows in one_rank for i in rows]
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))
    assert flat[:10] == data.epoch_order(n_examples, cfg.seed, 0)
    assert flat[10:] == data.epoch_order(n_examples, cfg.seed, 1)


def test_micro_batching_does_not_change_the_loss_or_the_gradient():
    """Every micro-batch divides by the target tokens of the whole batch, so the step is the batch's
    token mean."""
    _, tok = model_zoo.load_tiny()
    batch = [{"prompt": list(range(10, 10 + k)), "target": [3, 38 + k % 3, 0] if k % 2 else [38, 0]}
             for k in range(1, 7)]
    stats = {}
    for micro in (1, 4, 6):
        model, _ = model_zoo.load_tiny()
        cfg = train_sft.parse_config(["--preset", "smoke", "--micro_batch_size", str(micro)])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
        trainee = train_sft.Trainee(model.train(), list(model.parameters()), optimizer, scheduler,
                                    tok.pad_token_id)
        run = common.Run(cfg, 0, 1, torch.device("cpu"), None, None)
        stats[micro] = train_sft.train_step(cfg, batch, trainee, run)
    for micro in (4, 6):
        for k in ("loss", "grad_norm", "token_acc", "letter_acc"):
            assert stats[micro][k] == pytest.approx(stats[1][k], rel=1e-5), k


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_preset_lowers_the_training_loss(data_dir, smoke):
    metrics = read_metrics(smoke)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    logged = {"step", "epoch", "loss", "letter_acc", "token_acc", "lr", "grad_norm", "tokens_per_s"}
    assert logged <= set(metrics[0])
    first = sum(m["loss"] for m in metrics[:2]) / 2
    last = sum(m["loss"] for m in metrics[-2:]) / 2
    assert last < first - 0.5, [round(m["loss"], 3) for m in metrics]
    assert metrics[0]["lr"] > metrics[-1]["lr"] > 0  # cosine decay (no warm-up in the smoke preset)


@pytest.mark.slow
def test_resume_from_a_middle_checkpoint_repeats_the_uninterrupted_run(data_dir, smoke, tmp_path):
    """Copy the finished run, keep its checkpoints up to step 4 only (metrics.jsonl still lists 8
    steps, as a killed run may log past its last checkpoint), resume: the metrics and final weights
    are the same."""
    out = tmp_path / "resumed"
    shutil.copytree(smoke, out)
    for ckpt in (out / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > 4:
            shutil.rmtree(ckpt)
    resumed = run_sft("--preset", "smoke", "--out_dir", out, "--resume")
    assert "resuming from" in resumed.stderr and "step_000004" in resumed.stderr
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(smoke))
    straight_policy, _ = load_policy(str(smoke / "checkpoints/step_000008/policy"))
    resumed_policy, _ = load_policy(str(out / "checkpoints/step_000008/policy"))
    pairs = zip(straight_policy.state_dict().values(), resumed_policy.state_dict().values())
    assert all(torch.equal(straight, resumed) for straight, resumed in pairs)


@pytest.mark.slow
def test_resumed_on_two_ranks_under_fsdp2_trains_as_one_process(data_dir, smoke, tmp_path):
    """The single-process run, resumed from step 6 under torchrun with 2 processes (gloo, FSDP2, the
    optimizer state resharded): the same global batches and the same loss normalisation, so steps 7
    and 8 match."""
    out = tmp_path / "two_ranks"
    shutil.copytree(smoke, out)
    for ckpt in (out / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > 6:
            shutil.rmtree(ckpt)
    run_sft("--preset", "smoke", "--out_dir", out, "--resume", torchrun=2)
    got, want = read_metrics(out), read_metrics(smoke)
    assert [m["step"] for m in got] == list(range(1, 9))
    for got_step, want_step in zip(got[6:], want[6:]):
        for k in ("loss", "grad_norm", "token_acc", "letter_acc", "lr", "epoch"):
            assert got_step[k] == pytest.approx(want_step[k], rel=1e-5), (got_step["step"], k)


@pytest.mark.slow
def test_checkpoint_loads_with_load_policy_and_greedy_decoding_answers_the_trained_letter(
        tmp_path, data_dir):
    """Train on questions whose answer is always C (shortened: fast), then decode greedily as
    eval.py does."""
    questions = sources.load_dataset("medqa_dev")[:16]
    records = [{**r, "question": r["question"][:120], "answer": "C"} for r in questions]
    path = tmp_path / "always_c.jsonl"
    fields = ("id", "question", "options", "answer")
    path.write_text("".join(json.dumps({k: r[k] for k in fields}) + "\n" for r in records))
    out = tmp_path / "run"
    run_sft("--preset", "smoke", "--out_dir", out, "--train_data", path, "--max_steps", 16,
            "--min_lr_ratio", 1, "--save_every", 16)
    assert read_metrics(out)[-1]["letter_acc"] == 1.0
    policy, tok = load_policy(str(out / "checkpoints/step_000016/policy"))
    prompts = [data.build_prompt(r, "direct") for r in records[:4]]
    ids, attn, _, _ = data.tokenize_prompts(tok, prompts, None)  # [4, P] left padded, as eval.py
    with torch.no_grad():
        generated = rollout.generate(policy, ids, attn, 8, temperature=0.0,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    responses = [generated.sequences[i, ids.shape[1]:][generated.response_mask[i].bool()]
                 for i in range(4)]
    texts = [tok.decode(response, skip_special_tokens=True) for response in responses]
    # the letter, then it stops
    assert texts == [" C"] * 4 and generated.finish_reason == ["eos"] * 4
    assert all(verifier.extract_letter(t, r["options"]) == "C" for t, r in zip(texts, records))
