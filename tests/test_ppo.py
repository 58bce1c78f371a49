"""The PPO math (ppo.py) against separate, straightforward computations: explicit per-row Python
loops over float64 numpy, on random tensors with masks whose rows end at different lengths."""
import math

import numpy as np
import pytest
import torch

import ppo


def random_batch(B=5, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [T, 1, 4, 7, 2][:B]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1

    def r():
        return torch.randn(B, T, generator=g, dtype=torch.float64)

    return mask.double(), lengths, r


def test_gae_matches_the_discounted_sum_of_td_errors():
    mask, lengths, r = random_batch()
    rewards, values = r(), r()
    gamma, lam = 0.97, 0.9
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        rw, v = rewards[i, :n].numpy(), values[i, :n].numpy()
        v_next = np.append(v[1:], 0.0)  # the episode ends after the last generated token
        delta = rw + gamma * v_next - v
        for t in range(n):  # A_t = sum_l (gamma lam)^l delta_{t+l}
            expect = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
            assert adv[i, t].item() == pytest.approx(expect, abs=1e-10)
            assert ret[i, t].item() == pytest.approx(expect + v[t], abs=1e-10)
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    mask, lengths, r = random_batch(seed=1)
    rewards, values = r(), r()
    adv, _ = ppo.gae(rewards, values, mask, 1.0, 1.0)
    for i, n in enumerate(lengths):
        for t in range(n):
            to_go = rewards[i, t:n].sum().item()
            assert adv[i, t].item() == pytest.approx(to_go - values[i, t].item(), abs=1e-10)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_follow_schulman(kind):
    _, _, r = random_batch(seed=2)
    logp, ref = -r().abs(), -r().abs()
    got = ppo.kl_penalty(logp, ref, kind)
    for a, b, k in zip(logp.flatten().tolist(), ref.flatten().tolist(), got.flatten().tolist()):
        ratio = math.exp(b) / math.exp(a)  # pi_ref / pi at the sampled token
        expect = {"k1": -math.log(ratio), "k2": 0.5 * math.log(ratio) ** 2,
                  "k3": ratio - 1 - math.log(ratio)}[kind]
        assert k == pytest.approx(expect, abs=1e-10)


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    true_kl = (p * (p / q).log()).sum().item()
    a = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        est = ppo.kl_penalty(p.log()[a], q.log()[a], kind).mean().item()
        assert est == pytest.approx(true_kl, abs=0.01)
    assert (ppo.kl_penalty(p.log()[a], q.log()[a], "k3") >= 0).all()


def test_token_rewards_put_minus_beta_kl_on_every_token_and_the_score_on_the_last():
    mask, lengths, r = random_batch(seed=5)
    kl, beta = r() * mask, 0.05
    scores = torch.tensor([1.0, -1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    rewards = ppo.token_rewards(kl, scores, mask, beta)
    for i, n in enumerate(lengths):
        for t in range(kl.shape[1]):
            expect = -beta * kl[i, t].item() + (scores[i].item() if t == n - 1 else 0.0)
            assert rewards[i, t].item() == pytest.approx(expect, abs=1e-12), (i, t)


def test_whiten_is_mean_zero_std_one_over_the_masked_tokens_of_every_rank():
    mask, lengths, r = random_batch(seed=6)
    advantages = r() * 3 + 1
    real = np.concatenate([advantages[i, :n].numpy() for i, n in enumerate(lengths)])
    white = ppo.whiten(advantages, mask)
    got = np.concatenate([white[i, :n].numpy() for i, n in enumerate(lengths)])
    assert got == pytest.approx((real - real.mean()) / (real.std() + 1e-8), abs=1e-9)
    assert (white[mask == 0] == 0).all()
    # two "ranks" holding rows 0-1 and 2-4, statistics summed over both: the same numbers
    halves = [slice(0, 2), slice(2, 5)]
    sums = [{"n": mask[h].sum().item(), "sum": (advantages[h] * mask[h]).sum().item(),
             "sq": (advantages[h] ** 2 * mask[h]).sum().item()} for h in halves]

    def all_reduce(_local):
        return {k: sums[0][k] + sums[1][k] for k in sums[0]}

    for h in halves:
        assert torch.allclose(ppo.whiten(advantages[h], mask[h], all_reduce), white[h], atol=1e-12)


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
def test_critic_free_advantages_are_the_group_score_plus_the_kl_rewards_to_come(kind):
    mask, lengths, r = random_batch(B=4, seed=7)
    lengths = lengths[:4]
    scores = torch.tensor([1.0, -1.0, 0.0, 1.0], dtype=torch.float64)
    kl, beta = r().abs() * mask, 0.1
    got = ppo.critic_free_advantages(scores, kl, mask, 2, kind, beta)
    group = ppo.group_advantages(scores, 2, kind)
    for i, n in enumerate(lengths):
        for t in range(n):
            expect = group[i].item() - beta * kl[i, t:n].sum().item()
            assert got[i, t].item() == pytest.approx(expect, abs=1e-12)
        assert (got[i, n:] == 0).all()


def test_policy_loss_is_the_clipped_surrogate_token_mean():
    mask, lengths, r = random_batch(seed=3)
    old, adv = -r().abs(), r()
    new = old + 0.3 * r()
    eps = 0.2
    loss, stats = ppo.policy_loss(new, old, adv, mask, eps)
    terms, clipped, kls = [], [], []
    for i, n in enumerate(lengths):
        for t in range(n):
            ratio = math.exp(new[i, t] - old[i, t])
            a = adv[i, t].item()
            terms.append(-min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a))
            clipped.append(abs(ratio - 1) > eps)
            kls.append(ratio - 1 - math.log(ratio))
    assert loss.item() == pytest.approx(np.mean(terms), abs=1e-10)
    assert stats["clipfrac"] == pytest.approx(np.mean(clipped), abs=1e-10)
    assert stats["approx_kl"] == pytest.approx(np.mean(kls), abs=1e-10)


def test_policy_loss_gradient_is_zero_where_clipped_in_the_advantage_direction():
    old = torch.zeros(1, 2, dtype=torch.float64)
    new = torch.tensor([[0.5, 0.5]], dtype=torch.float64, requires_grad=True)  # ratio e^0.5 > 1.2
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, _ = ppo.policy_loss(new, old, adv, torch.ones(1, 2, dtype=torch.float64), 0.2)
    loss.backward()
    assert new.grad[0, 0] == 0  # positive advantage, ratio above 1 + eps: no further push
    # negative advantage, ratio too high: the unclipped term still pulls it down
    assert new.grad[0, 1] != 0


def test_value_loss_is_the_clipped_squared_error():
    mask, lengths, r = random_batch(seed=4)
    old_v, ret = r(), r()
    v = old_v + 0.5 * r()
    eps = 0.2
    loss, stats = ppo.value_loss(v, old_v, ret, mask, eps)
    terms = []
    for i, n in enumerate(lengths):
        for t in range(n):
            vc = old_v[i, t].item() + min(max(v[i, t].item() - old_v[i, t].item(), -eps), eps)
            target = ret[i, t].item()
            terms.append(0.5 * max((v[i, t].item() - target) ** 2, (vc - target) ** 2))
    assert loss.item() == pytest.approx(np.mean(terms), abs=1e-10)
    assert 0 < stats["vf_clipfrac"] <= 1


def test_loss_aggregations():
    mask, lengths, r = random_batch(seed=5)
    x = r()
    per_row = [x[i, :n].numpy() for i, n in enumerate(lengths)]
    T = mask.shape[1]
    expect = {"token-mean": np.concatenate(per_row).mean(),
              "seq-mean": np.mean([p.mean() for p in per_row]),
              "seq-mean-token-sum-norm": np.mean([p.sum() / T for p in per_row])}
    for agg, value in expect.items():
        assert ppo.aggregate(x, mask, agg).item() == pytest.approx(value), agg
    # an explicit denominator lets micro-batches add up to the whole batch's mean
    halves = [ppo.aggregate(x[s], mask[s], "token-mean", denom=mask.sum())
              for s in (slice(0, 2), slice(2, 5))]
    assert sum(halves).item() == pytest.approx(ppo.aggregate(x, mask).item())


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
def test_group_advantages(kind):
    scores = torch.tensor([1.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0])
    n = 4
    got = ppo.group_advantages(scores, n, kind)
    for g in range(3):
        s = scores[g * n:(g + 1) * n].tolist()
        mean, std = np.mean(s), np.std(s, ddof=1)
        for j in range(n):
            expect = {"grpo": (s[j] - mean) / (std + 1e-6), "drgrpo": s[j] - mean,
                      "rloo": s[j] - (sum(s) - s[j]) / (n - 1)}[kind]
            assert got[g * n + j].item() == pytest.approx(expect, abs=1e-5)
    assert got[4:8].abs().sum() == 0  # a group that all scored the same carries no signal


def test_adaptive_kl_moves_towards_the_target_and_is_clipped():
    assert ppo.adaptive_kl(0.1, 12.0, 6.0, 100, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    assert ppo.adaptive_kl(0.1, 3.0, 6.0, 100, 10) == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))
    assert ppo.adaptive_kl(0.1, 6.6, 6.0, 100, 10) == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = ppo.lr_schedule(100, 0.1, 0.1)
    assert [f(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
