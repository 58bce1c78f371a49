"""train_ppo.ppo_step's glue between the verifier and ppo.py, number by number.

On a synthetic step (steps 1-4 handed out by a stand-in: ragged responses, known log-probs, values
and scores), the KL, token rewards, advantages and returns the trainer computes equal an explicit
computation, for GAE and every critic-free choice; the k3 loss term follows the adaptive beta; and
the update's loss and gradient do not depend on the micro-batch size or (slow, torchrun) on the
number of ranks, for every --loss_agg."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import common
import distributed
import experience
import roles
import samplers
import train_ppo
from model import layer_modules, load_critic
from model_zoo import load_tiny

LENGTHS = [3, 1, 5, 2, 4, 5, 2, 3]  # ragged responses: rows end at different tokens
SCORES = [1.0, -1.0, 0.0, 1.0, -1.0, -1.0, -1.0, 0.0]  # two groups of 4 (the second not all alike)
P, T, N = 3, 5, 8
OPTIMIZER_STEP = train_ppo.update.optimizer_step  # the real one, whatever a test replaced


def synthetic_rows(seed=0):
    """What steps 1-4 would leave for 2 prompts x 4 samples: token ids, masks, the sampler's and a
    training forward's log-probs, the reference's, the critic's values, the verifier's scores."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in LENGTHS])  # [N, T]
    prompt = torch.randint(5, 60, (2, P), generator=g).repeat_interleave(4, 0)  # [N, P]
    response = torch.randint(5, 60, (N, T), generator=g) * mask.long()  # [N, T]
    sampler = -torch.rand(N, T, generator=g) * 2 * mask
    return {"sequences": torch.cat([prompt, response], 1),
            "attention_mask": torch.cat([torch.ones(N, P, dtype=torch.long), mask.long()], 1),
            "mask": mask, "sampler": sampler,
            "train": sampler + 0.01 * torch.randn(N, T, generator=g) * mask,
            "reference": sampler - 0.2 * torch.rand(N, T, generator=g) * mask,
            "values": torch.randn(N, T, generator=g) * mask, "scores": torch.tensor(SCORES)}


class SyntheticSteps:
    """Stands in for the module `experience` inside ppo_step: steps 1-4 hand out `rows` (of this
    rank: `rows_of_rank`), and the Experience ppo_step builds is kept for the test to read; the
    rest is experience.py's own."""

    def __init__(self, rows, rank_rows=slice(None)):
        self.rows, self.mine, self.exp = rows, rank_rows, None

    def __getattr__(self, name):
        return getattr(experience, name)

    def step_prompts(self, questions, batching, step, rank, world):
        return None

    def sample_responses(self, sampler, tokenizer, prompts, sampling, step):
        return None

    def score_responses(self, rolled, prompts, sampling, scoring, tokenizer, step):
        r, mine = self.rows, self.mine
        scores = r["scores"][mine]
        records = [{"reward": s, "correct": s > 0, "format_ok": s >= 0, "pred": "A",
                    "template_copy": False, "answer_in_think": False,
                    "reasoning_outside_think": False, "response": "", "finish_reason": "eos"}
                   for s in scores.tolist()]
        return experience.Samples(r["sequences"][mine], r["attention_mask"][mine], r["mask"][mine],
                                  r["sampler"][mine], scores, records)

    def reference_and_critic(self, models, samples, forwarding, timer):
        r, mine = self.rows, self.mine
        return experience.Forwards(r["train"][mine], r["reference"][mine], r["values"][mine])

    def Experience(self, *fields):
        self.exp = experience.Experience(*fields)
        return self.exp


def config(*flags):
    return train_ppo.parse_config(["--preset", "smoke", "--rollout_batch_size", "2",
                                   "--n_samples_per_prompt", "4", "--train_batch_size", "8",
                                   "--micro_batch_size", "2", "--ppo_epochs", "1", "--gamma", "0.9",
                                   "--lam", "0.8", "--kl_coef", "0.05", "--max_new_tokens", "16",
                                   *flags])


def tiny_models(cfg):
    policy, tokenizer = load_tiny("qwen2", seed=3)
    critic = load_critic(policy) if cfg.advantage == "gae" else None
    trained = {}
    for name, m in (("policy", policy), ("critic", critic)):
        if m is not None:
            distributed.shard(m, layer_modules(m), mixed_precision=False)  # under torchrun only
            m.train()
            trained[name] = roles.Trained(m, list(m.parameters()))
    models = roles.Models(policy, None, critic, tokenizer, torch.device("cpu"), trained,
                          sampler=samplers.Plain(policy, torch.float32))
    train_ppo.add_optimizers(cfg, models, total_steps=1)
    return models


def run_step(cfg, rows, monkeypatch, rank=0, world=1, kl_coef=None, rank_rows=slice(None)):
    """One ppo_step on the synthetic rows; returns its metrics, the experience it built, and the
    gradient of every trained parameter just before the optimizer step."""
    steps = SyntheticSteps(rows, rank_rows)
    monkeypatch.setattr(train_ppo, "experience", steps)
    grads = {}

    def keep_gradients(cfg, models, update):
        for name, item in models.trained.items():
            for key, p in item.module.named_parameters():
                if p.grad is not None:
                    full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    grads[f"{name}.{key}"] = full.detach().clone()
        OPTIMIZER_STEP(cfg, models, update)

    monkeypatch.setattr(train_ppo.update, "optimizer_step", keep_gradients)
    models = tiny_models(cfg)
    run = common.Run(cfg, rank, world, torch.device("cpu"), ROOT / "runs" / "unused", None)
    timer = common.PhaseTimer(run.device, train_ppo.PHASES)
    beta = cfg.kl_coef if kl_coef is None else kl_coef
    metrics, _ = train_ppo.ppo_step(cfg, run, models, None, 1, beta, timer)
    return metrics, steps.exp, grads


# ------------------------------------------------------------------------------------------------
# The advantages and returns, against explicit loops
# ------------------------------------------------------------------------------------------------
def explicit_rewards(rows, old, beta):
    """r_t = -beta * KL_t (k1 = log pi_old - log pi_ref) on every token, + the score on the last."""
    out = []
    for i, n in enumerate(LENGTHS):
        kl = [old[i, t].item() - rows["reference"][i, t].item() for t in range(n)]
        rewards = [-beta * k for k in kl]
        rewards[n - 1] += SCORES[i]
        out.append(rewards)
    return out


def whitened(per_row):
    flat = [x for row in per_row for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat))
    return [[(x - mean) / (std + 1e-8) for x in row] for row in per_row]


def assert_rows(tensor, per_row, atol=1e-5):
    """tensor [N, T] holds per_row's values on each row's tokens, and exactly 0 on its padding."""
    for i, n in enumerate(LENGTHS):
        assert tensor[i, :n].tolist() == pytest.approx(per_row[i], abs=atol), i
        assert (tensor[i, n:] == 0).all(), f"row {i}: padding must stay 0"


@pytest.mark.parametrize("recompute", ["false", "true"])
def test_gae_advantages_and_returns_are_the_explicit_ones(recompute, monkeypatch):
    rows = synthetic_rows()
    cfg = config("--advantage", "gae", "--recompute_logprobs", recompute)
    metrics, exp, _ = run_step(cfg, rows, monkeypatch)
    old = rows["train"] if recompute == "true" else rows["sampler"]
    assert torch.equal(exp.old_logprobs, old)
    assert_rows(exp.kl, [[old[i, t].item() - rows["reference"][i, t].item() for t in range(n)]
                         for i, n in enumerate(LENGTHS)])
    rewards = explicit_rewards(rows, old, cfg.kl_coef)
    raw, returns = [], []
    for i, n in enumerate(LENGTHS):  # A_t = delta_t + gamma lam A_{t+1}, V after the end = 0
        values = [rows["values"][i, t].item() for t in range(n)] + [0.0]
        advantage, row = 0.0, []
        for t in reversed(range(n)):
            delta = rewards[i][t] + cfg.gamma * values[t + 1] - values[t]
            advantage = delta + cfg.gamma * cfg.lam * advantage
            row.insert(0, advantage)
        raw.append(row)
        returns.append([a + v for a, v in zip(row, values)])
    assert_rows(exp.returns, returns)
    assert_rows(exp.advantages, whitened(raw))
    assert "policy_loss" in metrics and "value_loss" in metrics


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
def test_critic_free_advantages_are_the_group_score_plus_the_kl_to_come(kind, monkeypatch):
    rows = synthetic_rows()
    cfg = config("--advantage", kind)
    _, exp, _ = run_step(cfg, rows, monkeypatch)
    old = rows["sampler"]
    beta = cfg.kl_coef
    expect = []
    for i, n in enumerate(LENGTHS):
        group = SCORES[4 * (i // 4):4 * (i // 4) + 4]
        mean = sum(group) / 4
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / 3)  # the unbiased std, as torch's
        relative = {"grpo": (SCORES[i] - mean) / (std + 1e-6), "drgrpo": SCORES[i] - mean,
                    "rloo": SCORES[i] - (sum(group) - SCORES[i]) / 3}[kind]
        kl = [old[i, t].item() - rows["reference"][i, t].item() for t in range(n)]
        expect.append([relative - beta * sum(kl[t:]) for t in range(n)])
    assert_rows(exp.advantages, expect)
    assert (exp.returns == 0).all()


def test_reinforce_pp_advantages_are_the_whitened_returns_of_the_token_rewards(monkeypatch):
    rows = synthetic_rows()
    cfg = config("--advantage", "reinforce_pp")
    _, exp, _ = run_step(cfg, rows, monkeypatch)
    rewards = explicit_rewards(rows, rows["sampler"], cfg.kl_coef)
    returns = [[sum(cfg.gamma ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))]
               for r in rewards]
    assert_rows(exp.advantages, whitened(returns))


def test_the_k3_loss_term_follows_the_adaptive_beta(monkeypatch):
    """--kl_in_reward false: beta * k3 is a loss term, with the beta of this step (the adaptive
    controller's under --kl_target), not the initial --kl_coef."""
    rows = synthetic_rows()
    cfg = config("--advantage", "grpo", "--kl_in_reward", "false", "--kl_target", "0.1")
    _, _, small = run_step(cfg, rows, monkeypatch, kl_coef=0.0)
    _, _, large = run_step(cfg, rows, monkeypatch, kl_coef=5.0)
    key = "policy.model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(small[key], large[key])


# ------------------------------------------------------------------------------------------------
# The loss and gradient of every --loss_agg, whatever the micro-batch size and number of ranks
# ------------------------------------------------------------------------------------------------
def assert_same_update(a, b, rel=1e-5):
    (metrics_a, _, grads_a), (metrics_b, _, grads_b) = a, b
    assert metrics_a["policy_loss"] == pytest.approx(metrics_b["policy_loss"], rel=rel, abs=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=rel, atol=1e-7)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_the_update_does_not_depend_on_the_micro_batch_size(agg, advantage, monkeypatch):
    rows = synthetic_rows()
    runs = [run_step(config("--advantage", advantage, "--loss_agg", agg, "--entropy_coef", "0.01",
                            "--micro_batch_size", str(size)), rows, monkeypatch)
            for size in (1, 2, 4)]
    assert_same_update(runs[0], runs[1])
    assert_same_update(runs[0], runs[2])


TWO_RANKS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
import pytest
import distributed
import test_ppo_step as t

rank, world, _ = distributed.setup("cpu")
out = {}
for agg in ("token-mean", "seq-mean", "seq-mean-token-sum-norm"):
    cfg = t.config("--advantage", "gae", "--loss_agg", agg, "--entropy_coef", "0.01")
    with pytest.MonkeyPatch.context() as monkeypatch:
        mine = slice(4 * rank, 4 * rank + 4)  # rank r: the r-th half of the one minibatch
        metrics, _, grads = t.run_step(cfg, t.synthetic_rows(), monkeypatch, rank, world,
                                       rank_rows=mine)
    out[agg] = {"policy_loss": metrics["policy_loss"],
                "grads": {k: v.tolist() for k, v in grads.items()}}
if rank == 0:
    print("RESULT " + json.dumps(out))
distributed.cleanup()
"""


@pytest.mark.slow
def test_the_update_does_not_depend_on_the_number_of_ranks(monkeypatch, tmp_path):
    """The same minibatch split over two FSDP2 ranks (gloo): the same loss and gradient as in one
    process, for every --loss_agg (whitening and the loss denominators are global)."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(script), str(ROOT)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads(next(line for line in p.stdout.splitlines()
                          if line.startswith("RESULT "))[len("RESULT "):])
    for agg, got in two.items():
        one = run_step(config("--advantage", "gae", "--loss_agg", agg, "--entropy_coef", "0.01"),
                       synthetic_rows(), monkeypatch)
        grads = {k: torch.tensor(v) for k, v in got["grads"].items()}
        assert_same_update(one, ({"policy_loss": got["policy_loss"]}, None, grads))
