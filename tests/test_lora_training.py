"""LoRA training end to end (lora.py through roles.py in the trainers): step 0 is the base, only
the adapters and the value head learn, the sampler's merged weights sample what the adapted policy
computes, a run resumes exactly and gives the same run on 2 ranks, what it saves loads in PEFT and
eval.py, both trainers learn with it, and bad --lora_* flags stop the run naming the flag.

Most runs are the toy task of conftest.py with rank-2 adapters; the runs several tests read are
made once per module (fixtures below).
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, trainer_command
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Phi3Config

import common
import eval as evaluation
import experience
import lora
import model_zoo
import roles
import samplers
import train_ppo
import train_sft
from model import load_policy, response_batch, response_logprobs, save_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
VOLATILE = ("time_", "tokens_per_s")  # wall-clock figures differ between runs; nothing else may
LORA = ["--lora_rank", "2"]


# --------------------------------------------------------------------------------------------------
# Helpers: runs in a subprocess, and the roles of a run built in this process
# --------------------------------------------------------------------------------------------------
def train(script, args, out, torchrun=0):
    """python SCRIPT ARGS --out_dir OUT in a subprocess (under torchrun with that many processes);
    fails the test on an error."""
    cmd = trainer_command(script, [*args, "--out_dir", out], torchrun=torchrun)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_same_metrics(a, b, rel=0.0):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert set(x) == set(y), x["step"]
        for k, v in x.items():
            if k.startswith(VOLATILE):
                continue
            if isinstance(v, float) and rel:
                assert y[k] == pytest.approx(v, rel=rel, abs=rel), (x["step"], k)
            else:
                assert y[k] == v, (x["step"], k, v, y[k])


def held_out(toy):
    """Flags of an evaluation every 2 steps, on 8 of the toy questions, 4 tokens each."""
    return ["--eval_every", "2", "--eval_data", toy_data(toy), "--eval_limit", "8",
            "--eval_max_new_tokens", "4"]


def toy_data(toy):
    return toy[toy.index("--train_data") + 1]


def toy_base(toy):
    return toy[toy.index("--model") + 1]


def load_roles(flags, out, resume_from=None):
    """(cfg, run, roles.Models) of train_ppo.py `flags`, loaded in this process as main does."""
    cfg = train_ppo.parse_config([*flags, "--out_dir", str(out)])
    run = common.Run(cfg, rank=0, world=1, device=torch.device("cpu"), out=Path(out),
                     resume_from=resume_from)
    return cfg, run, roles.load(cfg, run)


def ready_to_train(cfg, run, models):
    """The training questions, with the run's sampler and optimizers added, as train_ppo.main does
    before its loop."""
    questions = experience.load_questions(cfg, models.tokenizer, run.log)
    train_ppo.add_sampler(cfg, models, questions.longest + cfg.max_new_tokens)
    train_ppo.add_optimizers(cfg, models, cfg.max_steps)
    return questions


def ppo_step(cfg, run, models, questions, step):
    """Step `step` of train_ppo.main's loop in this process: its metrics (no checkpoint, no log)."""
    timer = common.PhaseTimer(run.device, train_ppo.PHASES)
    return train_ppo.ppo_step(cfg, run, models, questions, step, cfg.kl_coef, timer)[0]


def randomize_adapter(base, name, seed=1):
    """B starts at zero, which hides every mistake in B A: give each B values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.adapter_parameters(base, name)[1::2]:
            b.copy_(torch.randn(b.shape, generator=generator, dtype=b.dtype) * 0.3)


def some_ids(vocab, seed=0, shape=(3, 9)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits_of(module, ids):
    with torch.no_grad():
        return module(input_ids=ids).logits


@pytest.fixture(scope="module")
def gae_flags(toy):
    """The toy task with rank-2 adapters: PPO with a critic (GAE, the toy's default), PPO's old
    log-probs from a training forward, a held-out evaluation every 2 steps."""
    return toy + LORA + ["--recompute_logprobs", "true"] + held_out(toy)


@pytest.fixture(scope="module")
def gae_run(gae_flags, tmp_path_factory):
    """A 4-step LoRA run of the toy task with a critic, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("lora") / "straight"
    train("train_ppo.py", gae_flags, out)
    return out


# --------------------------------------------------------------------------------------------------
# Step 0: the adapted model is the base
# --------------------------------------------------------------------------------------------------
def test_at_step_0_the_policy_and_the_reference_give_the_bases_logits(toy, tmp_path):
    """B = 0: the policy Role (base + adapters) and the reference Role (adapters off) of freshly
    loaded LoRA roles give the logits of the base loaded on its own, to the bit."""
    cfg, _, models = load_roles(toy + LORA, tmp_path)
    base = load_policy(cfg.model)[0]
    ids = some_ids(base.config.vocab_size)
    expected = logits_of(base, ids)
    assert torch.equal(logits_of(models.policy, ids), expected)
    assert torch.equal(logits_of(models.reference, ids), expected)
    # two roles of one base, not one role twice: moving the policy's adapters moves the policy only
    randomize_adapter(models.base, "policy")
    assert not torch.allclose(logits_of(models.policy, ids), expected, atol=1e-3)
    assert torch.equal(logits_of(models.reference, ids), expected)


@pytest.mark.slow
def test_the_first_kl_of_a_lora_run_is_exactly_zero(gae_run):
    """The reference is the base with the adapters off, the policy at step 1 the base plus B A = 0:
    old log-probs from a training forward equal the reference's to the bit."""
    first, second = read_lines(gae_run / "metrics.jsonl")[:2]
    assert first["kl"] == 0.0 and first["kl_sum"] == 0.0
    assert second["kl"] != 0.0  # once the adapters moved, the policy left the reference


def test_in_bf16_the_first_kl_is_exactly_zero_too(toy, tmp_path):
    """paper_lora's compute dtype: the base in bf16, the adapters in fp32. The sampler's log-probs
    differ from a training forward's (so they are recomputed: --recompute_logprobs auto), and
    the training forward with B A = 0 rounds as the reference's does."""
    cfg, run, models = load_roles(toy + LORA + ["--dtype", "bfloat16"], tmp_path)
    assert models.base.dtype == torch.bfloat16 and train_ppo.recompute_logprobs(cfg)
    questions = ready_to_train(cfg, run, models)
    metrics = ppo_step(cfg, run, models, questions, 1)
    assert metrics["kl"] == 0.0 and metrics["kl_sum"] == 0.0
    assert metrics["sampler_gap_max"] > 0


# --------------------------------------------------------------------------------------------------
# What trains: the adapters and the value head, nothing else
# --------------------------------------------------------------------------------------------------
def test_only_the_adapters_and_the_value_head_get_gradients_change_and_have_adamw_state(
        toy, tmp_path):
    """One step of a LoRA run with a critic, in process: at every optimizer step each adapter
    parameter (and the value head) of that optimizer holds a gradient and no base weight does;
    after the step every adapter and the head changed, every base weight is bitwise as loaded, and
    AdamW holds state for the adapters and the head only."""
    cfg, run, models = load_roles(toy + LORA, tmp_path)
    head = models.critic.score.weight
    named = {**dict(models.base.named_parameters()), "score.weight": head}
    owners = {role: {n for n in named if f".lora_A.{role}." in n or f".lora_B.{role}." in n}
              for role in ("policy", "critic")}
    owners["critic"].add("score.weight")
    layers = models.base.config.num_hidden_layers
    assert len(owners["policy"]) == 2 * len(lora.ALL_TARGETS) * layers  # A and B of each linear
    trained = owners["policy"] | owners["critic"]
    frozen = [p for n, p in named.items() if n not in trained]
    assert not any(p.requires_grad for p in frozen)
    before = {n: p.detach().clone() for n, p in named.items()}
    questions = ready_to_train(cfg, run, models)
    with_grad = {"policy": [], "critic": []}  # at each optimizer step: the names holding a grad

    def recorder(role):
        def record(optimizer, args, kwargs):
            with_grad[role].append({n for n, p in named.items() if p.grad is not None})
        return record

    for role, optimizer in models.optimizers.items():
        optimizer.register_step_pre_hook(recorder(role))
    assert "skipped" not in ppo_step(cfg, run, models, questions, 1)
    samples = cfg.rollout_batch_size * cfg.n_samples_per_prompt
    updates = samples // cfg.train_batch_size * cfg.ppo_epochs
    assert len(with_grad["policy"]) == len(with_grad["critic"]) == updates > 1
    for role, seen in with_grad.items():
        for names in seen:
            assert owners[role] <= names <= trained  # each of its own holds one; no base weight
    for name, p in named.items():
        if name in trained:
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
    name_of = {id(p): n for n, p in named.items()}
    for role, optimizer in models.optimizers.items():
        assert {name_of[id(p)] for p in optimizer.state} == owners[role]
        assert {name_of[id(p)] for group in optimizer.param_groups
                for p in group["params"]} == owners[role]


# --------------------------------------------------------------------------------------------------
# The sampler: merged weights sample what the adapted policy computes
# --------------------------------------------------------------------------------------------------
def test_every_sampler_gives_the_adapted_policys_logprobs_of_what_it_samples(toy, tmp_path):
    """With non-zero adapters, the engine's own weights loaded from roles.sampler_weights (W +
    (alpha / r) B A, merged) and the plain sampler's adapters applied token by token: each one's
    log-probs of its samples are the policy Role's training forward's, in fp32 to 1e-5."""
    cfg, run, models = load_roles(toy + LORA, tmp_path)
    randomize_adapter(models.base, "policy")
    questions = experience.load_questions(cfg, models.tokenizer, run.log)
    prompts = experience.step_prompts(questions, train_ppo.batching(cfg), 1, 0, 1)
    sequences = {}
    for choice in ("plain", "dynamic", "static"):
        sampler = samplers.make_sampler(choice, models.base, torch.float32, own_weights=True,
                                        max_rows=cfg.generate_batch_size,
                                        max_len=questions.longest + cfg.max_new_tokens)
        sampler.load_weights(roles.sampler_weights(models))
        rolled = experience.sample_responses(sampler, models.tokenizer, prompts,
                                             train_ppo.sampling(cfg), 1)
        mask = rolled.response_mask  # [N, T]
        batch = response_batch(rolled.sequences, rolled.attention_mask, mask, packed=False)
        with torch.no_grad():
            policy = response_logprobs(models.policy, batch, cfg.temperature) * mask
            reference = response_logprobs(models.reference, batch, cfg.temperature) * mask
        torch.testing.assert_close(rolled.logprobs * mask, policy, atol=1e-5, rtol=1e-5,
                                   msg=lambda text: f"--engine {choice}: {text}")
        assert (policy - reference).abs().max() > 0.1, choice  # the adapters count here
        sequences[choice] = rolled.sequences
    # and from the same noise the three draw the same tokens
    assert torch.equal(sequences["plain"], sequences["dynamic"])
    assert torch.equal(sequences["plain"], sequences["static"])


# --------------------------------------------------------------------------------------------------
# A LoRA run resumes exactly, and runs the same on 2 ranks
# --------------------------------------------------------------------------------------------------
def saved_tensors(out, step=4):
    """Every tensor of checkpoint `step`'s adapters and value head, by file and name."""
    folder = out / "checkpoints" / f"step_{step:06d}"
    return {f"{path.parent.name}/{path.name}/{name}": tensor
            for path in sorted(folder.glob("*/*.safetensors")) if path.parent.name != "optim"
            for name, tensor in load_file(path).items()}


def eval_lines(out):
    """eval.jsonl without its wall-clock field."""
    return [{k: v for k, v in line.items() if k != "seconds"}
            for line in read_lines(out / "eval.jsonl")]


@pytest.mark.slow
def test_a_resumed_lora_run_equals_an_uninterrupted_one(gae_flags, gae_run, tmp_path):
    """The 4-step run stopped after its step-2 checkpoint (its logs run on past it, as a killed
    run's may) and resumed: every metric, every rollout, the held-out evaluations and the saved
    adapters, value head and AdamW state are the uninterrupted run's, to the bit."""
    out = tmp_path / "resumed"
    shutil.copytree(gae_run, out)
    shutil.rmtree(out / "checkpoints" / "step_000004")
    resumed = train("train_ppo.py", gae_flags + ["--resume"], out)
    assert "resuming from" in resumed.stderr and "step_000002" in resumed.stderr
    assert_same_metrics(read_lines(gae_run / "metrics.jsonl"), read_lines(out / "metrics.jsonl"))
    assert (gae_run / "rollouts.jsonl").read_text() == (out / "rollouts.jsonl").read_text()
    assert [line["step"] for line in eval_lines(out)] == [0, 2, 4]
    assert eval_lines(gae_run) == eval_lines(out)
    straight, again = saved_tensors(gae_run), saved_tensors(out)
    assert straight.keys() == again.keys() and len(straight) == 4 * 7 * 2 + 1  # A, B x2; head
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    for role in ("policy", "critic"):
        state = [load_file(o / "checkpoints/step_000004/optim" / f"{role}.safetensors")
                 for o in (gae_run, out)]
        assert state[0].keys() == state[1].keys()
        assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])


@pytest.mark.slow
def test_two_ranks_give_the_lora_run_of_one(gae_flags, gae_run, tmp_path):
    """FSDP2 over 2 gloo ranks, each decoder layer's base weights and adapters sharded together:
    the same samples and held-out answers as one process, and its numbers up to summation order
    (test_train_ppo.test_two_processes_give_the_same_run_as_one says why 1e-5)."""
    train("train_ppo.py", gae_flags, tmp_path, torchrun=2)
    one, two = read_lines(gae_run / "metrics.jsonl"), read_lines(tmp_path / "metrics.jsonl")
    assert_same_metrics(one, two, rel=1e-5)
    assert (gae_run / "rollouts.jsonl").read_text() == (tmp_path / "rollouts.jsonl").read_text()
    assert eval_lines(gae_run) == eval_lines(tmp_path)
    straight, sharded = saved_tensors(gae_run), saved_tensors(tmp_path)
    assert straight.keys() == sharded.keys()
    for name in straight:
        torch.testing.assert_close(sharded[name], straight[name], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# What a run saved: PEFT loads it, eval.py merges it
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_peft_loads_the_policy_a_run_saved_as_eval_and_the_trainer_see_it(
        toy, gae_flags, gae_run, tmp_path):
    """The run's policy/ folder is PEFT's adapter: peft.PeftModel.from_pretrained puts it on the
    base, and its logits are eval.load_model's merged model's and the resumed policy Role's."""
    import peft
    step = gae_run / "checkpoints" / "step_000004"
    config = json.loads((step / "policy" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        (2, 32.0, toy_base(toy))
    base = AutoModelForCausalLM.from_pretrained(toy_base(toy))
    theirs = peft.PeftModel.from_pretrained(base, step / "policy").eval()
    merged, _ = evaluation.load_model(str(step / "policy"), "float32", "cpu")
    _, _, models = load_roles(gae_flags, tmp_path, resume_from=step)
    ids = some_ids(base.config.vocab_size)
    expected = logits_of(theirs, ids)
    with theirs.disable_adapter():
        assert not torch.allclose(logits_of(theirs, ids), expected, atol=1e-3)  # it trained
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_of(models.policy, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_eval_reads_a_lora_run_and_answers_as_greedy_decoding_of_the_merged_model(
        toy, gae_run, tmp_path):
    """python eval.py --model RUN on a LoRA run: its newest policy adapter, merged into the base.
    The answers are those of Hugging Face's greedy generate on PEFT's merge of the same files."""
    import peft
    from transformers import AutoTokenizer
    evaluation.main(["--model", str(gae_run), "--data", toy_data(toy), "--prompt", "direct",
                     "--max_new_tokens", "4", "--device", "cpu", "--out", str(tmp_path)])
    preds = read_lines(tmp_path / "predictions.jsonl")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["model_path"] == str(gae_run / "checkpoints/step_000004/policy")
    assert len(preds) == 16
    folder = gae_run / "checkpoints" / "step_000004" / "policy"
    base = AutoModelForCausalLM.from_pretrained(toy_base(toy))
    merged = peft.PeftModel.from_pretrained(base, folder).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for pred in preds:
        ids = tokenizer(pred["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                  do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        assert pred["response"] == tokenizer.decode(out[0, ids.shape[1]:],
                                                    skip_special_tokens=True), pred["id"]


# --------------------------------------------------------------------------------------------------
# Both trainers run and learn with LoRA
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_smoke_preset_completes_with_lora_with_a_critic_and_without(tmp_path):
    """--preset smoke --lora_rank 2, PPO with a critic and GRPO, the two runs side by side: every
    step trains (no skip), and every checkpoint holds the adapters (and the critic's value head)."""
    import checkpoint
    commands = {advantage: trainer_command("train_ppo.py", [
        "--preset", "smoke", *LORA, "--advantage", advantage, "--out_dir", tmp_path / advantage])
        for advantage in ("gae", "grpo")}
    runs = {advantage: subprocess.Popen(command, cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, text=True)
            for advantage, command in commands.items()}
    for advantage, process in runs.items():
        stderr = process.communicate(timeout=300)[1]
        assert process.returncode == 0, stderr[-3000:]
        metrics = read_lines(tmp_path / advantage / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3]
        assert not any("skipped" in m for m in metrics)
        assert all(("value_loss" in m) == (advantage == "gae") for m in metrics)
        for ckpt in checkpoint.list_checkpoints(tmp_path / advantage / "checkpoints"):
            assert checkpoint.verify(ckpt) == []
            assert (ckpt / "policy" / "adapter_model.safetensors").is_file()
            assert (ckpt / "critic" / roles.VALUE_HEAD).is_file() == (advantage == "gae")


@pytest.fixture(scope="module")
def sharp_toy(toy, tmp_path_factory):
    """The toy task on its base with the (tied) embedding scaled by 4. LoRA trains neither the
    embedding, nor the LM head, nor the final norm: each logit is a frozen unembedding row (the
    toy's are random, N(0, 0.02^2) in 64 dimensions: norm about 0.16) times a final hidden state
    of norm 8 (RMSNorm), so every logit stays within about 1.3 of 0, too close together for any
    adapter to make one of the 12 tokens the likely one. A pretrained unembedding is larger;
    scaled by 4, this one leaves the policy room to become sure of "C</answer>"."""
    folder = tmp_path_factory.mktemp("sharp") / "tiny"
    base, tokenizer = load_policy(toy_base(toy))
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(4)
    save_model(base, tokenizer, folder)
    flags = list(toy)
    flags[flags.index("--model") + 1] = str(folder)
    return flags


@pytest.mark.slow
def test_lora_learns_the_toy_task_at_10x_the_full_fine_tuning_learning_rate(sharp_toy, tmp_path):
    """As test_train_ppo's learning test for full fine-tuning: the reward climbs from nearly always
    broken to well-formed, at 10x its learning rate (LoRA Without Regret)."""
    lr = 10 * float(sharp_toy[sharp_toy.index("--actor_lr") + 1])
    flags = ["--actor_lr", lr, "--critic_lr", lr, "--max_steps", "20", "--save_every", "20"]
    train("train_ppo.py", sharp_toy + LORA + flags, tmp_path)
    metrics = read_lines(tmp_path / "metrics.jsonl")
    start = sum(m["reward"] for m in metrics[:3]) / 3
    assert start < -0.6
    end = sum(m["reward"] for m in metrics[-5:]) / 5
    assert end > start + 0.7, [round(m["reward"], 2) for m in metrics]
    assert sum(m["format_rate"] for m in metrics[-5:]) / 5 > 0.9


# train_sft.py's smoke preset (tiny-qwen2 on MedQA dev, 8 steps, a checkpoint each) with rank-2
# adapters at 10x its learning rate
SFT_LORA = ["--preset", "smoke", *LORA, "--lr", f"{10 * train_sft.PRESETS['smoke']['lr']:g}"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "lora"
    train("train_sft.py", SFT_LORA, out)
    return out


@pytest.mark.slow
def test_sft_with_lora_lowers_the_loss_and_saves_an_adapter_that_eval_merges(sft_run):
    """train_sft.py takes the same --lora_* flags: its loss falls, its checkpoint holds only the
    adapter (PEFT's layout), and eval.load_model merges it into what PEFT computes."""
    import peft
    metrics = read_lines(sft_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9))
    first = sum(m["loss"] for m in metrics[:2]) / 2
    last = sum(m["loss"] for m in metrics[-2:]) / 2
    # less than full fine-tuning's fall: the frozen unembedding bounds the logits (sharp_toy)
    assert last < first - 0.3, [round(m["loss"], 3) for m in metrics]
    folder = sft_run / "checkpoints" / "step_000008" / "policy"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["adapter_model.safetensors"]
    merged, _ = evaluation.load_model(str(folder), "float32", "cpu")
    base = load_policy("tiny-qwen2")[0]
    ids = some_ids(base.config.vocab_size)
    before = logits_of(base, ids)
    expected = logits_of(peft.PeftModel.from_pretrained(base, folder).eval(), ids)
    assert not torch.allclose(expected, before, atol=1e-3)  # the adapter trained
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_resumed_sft_lora_run_equals_an_uninterrupted_one(sft_run, tmp_path):
    """The SFT run cut back to its step-4 checkpoint and resumed: the same metrics, and the same
    adapter at step 8 to the bit."""
    out = tmp_path / "resumed"
    shutil.copytree(sft_run, out)
    for ckpt in (out / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > 4:
            shutil.rmtree(ckpt)
    resumed = train("train_sft.py", SFT_LORA + ["--resume"], out)
    assert "resuming from" in resumed.stderr and "step_000004" in resumed.stderr
    assert_same_metrics(read_lines(sft_run / "metrics.jsonl"), read_lines(out / "metrics.jsonl"))
    straight, again = saved_tensors(sft_run, 8), saved_tensors(out, 8)
    assert straight.keys() == again.keys() and straight
    assert all(torch.equal(straight[k], again[k]) for k in straight)


# --------------------------------------------------------------------------------------------------
# Bad flags, and no reference without a KL
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", [train_ppo, train_sft])
@pytest.mark.parametrize("flags, words", [
    (["--lora_rank", "-1"], "--lora_rank -1: must be >= 0"),
    (["--lora_rank", "2", "--lora_alpha", "0"], "--lora_alpha 0.0: must be > 0"),
    (["--lora_rank", "2", "--lora_alpha", "-3"], "--lora_alpha -3.0: must be > 0"),
    (["--lora_rank", "2", "--lora_targets", "q_proj,qkv_proj"],
     "--lora_targets 'q_proj,qkv_proj': unknown ['qkv_proj']"),
    (["--lora_rank", "2", "--lora_targets", " , "], "--lora_targets ' , ': unknown none given")])
def test_bad_lora_flags_exit_2_naming_the_flag(trainer, flags, words, capsys, tmp_path):
    """Found when the flags are parsed, in both trainers."""
    with pytest.raises(SystemExit) as exit_:
        trainer.cli(["--preset", "smoke", *flags, "--out_dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


@pytest.fixture(scope="module")
def phi3_folder(tmp_path_factory):
    """A tiny Phi-3: decoder layers under model.layers, but attention's q, k and v fused into one
    qkv_proj and the MLP's gate and up into gate_up_proj."""
    folder = tmp_path_factory.mktemp("phi3") / "tiny"
    tokenizer = model_zoo.build_char_tokenizer()
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=None)
    save_model(AutoModelForCausalLM.from_config(config), tokenizer, folder)
    return folder


@pytest.mark.parametrize("trainer", [train_ppo, train_sft])
def test_a_target_the_architecture_lacks_exits_2_naming_the_flag(trainer, phi3_folder, capsys,
                                                                  tmp_path):
    """Found once the model is loaded (common.BadFlag): a --lora_targets linear this architecture
    does not have stops the run as a bad flag does, before any training."""
    with pytest.raises(SystemExit) as exit_:
        trainer.cli(["--preset", "smoke", "--model", str(phi3_folder), *LORA, "--lora_targets",
                     "o_proj,gate_proj", "--out_dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--lora_targets 'o_proj,gate_proj'" in err
    assert "model.layers.0.mlp has no nn.Linear named 'gate_proj'" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resuming_a_checkpoint_of_other_adapters_or_of_the_other_kind_is_a_bad_flag(toy, tmp_path):
    """--resume with --lora_* flags the checkpoint was not trained with: a bad flag (exit 2 through
    common.cli), named, before any of its weights is loaded."""
    adapters = tmp_path / "lora_checkpoint"
    (adapters / "policy").mkdir(parents=True)
    config = lora.peft_config(lora.LoraConfig(rank=2, alpha=32.0), toy_base(toy))
    (adapters / "policy" / "adapter_config.json").write_text(json.dumps(config))
    whole = tmp_path / "full_checkpoint"
    save_model(*load_policy(toy_base(toy)), whole / "policy")
    cases = ((toy, adapters, "--lora_rank 0: .* holds LoRA adapters"),
             (toy + ["--lora_rank", "4"], adapters, "saved with rank 2, .* has --lora_rank 4 "),
             (toy + LORA, whole, "--lora_rank 2: .* holds a whole model, not LoRA adapters"))
    for flags, checkpoint, message in cases:
        with pytest.raises(common.BadFlag, match=message):
            load_roles(flags, tmp_path / "run", resume_from=checkpoint)


def test_without_a_kl_no_reference_is_loaded_and_the_kl_is_zero(toy, tmp_path):
    """--kl_coef 0: neither full fine-tuning nor LoRA loads a reference, and a run's KL is 0."""
    assert load_roles(toy + LORA + ["--kl_coef", "0"], tmp_path)[2].reference is None
    cfg, run, models = load_roles(toy + ["--kl_coef", "0"], tmp_path)
    assert models.reference is None and models.base is None
    questions = ready_to_train(cfg, run, models)
    metrics = [ppo_step(cfg, run, models, questions, step) for step in (1, 2)]
    assert all(m["kl"] == 0.0 and m["kl_sum"] == 0.0 for m in metrics)
    assert metrics[0]["approx_kl"] > 0  # the policy moved within step 1: step 2 samples another
