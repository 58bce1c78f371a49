"""The PPO math (ppo.py) against separate, straightforward computations: explicit per-row Python
loops over float64 numpy, on random tensors with masks whose rows end at different lengths."""
import math
import threading
from concurrent.futures import ThreadPoolExecutor

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


def two_ranks(work):
    """work(rank, all_reduce) run as two "ranks" (threads) whose all_reduce sums a dict over both,
    as distributed.all_reduce_dict does over processes; the two results, in rank order."""
    posted = [None, None]
    barrier = threading.Barrier(2, timeout=30)

    def all_reduce_of(rank):
        def all_reduce(local):
            posted[rank] = dict(local)
            barrier.wait()
            total = {key: posted[0][key] + posted[1][key] for key in local}
            barrier.wait()  # both have read before either posts again
            return total
        return all_reduce

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda rank: work(rank, all_reduce_of(rank)), range(2)))


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
    split = two_ranks(lambda rank, all_reduce: ppo.whiten(advantages[halves[rank]],
                                                          mask[halves[rank]], all_reduce))
    assert torch.allclose(torch.cat(split), white, atol=1e-12, rtol=0)


def test_whiten_is_exact_in_fp32_when_the_mean_dwarfs_the_spread():
    """|mean| / std = 100 (REINFORCE++ when nearly every response scored alike): the one-pass
    variance E[A^2] - E[A]^2 of fp32 sums cancels away most of its digits; the centred two-pass
    float64 variance equals an fp64 computation from the same fp32 inputs, on one rank or two."""
    g = torch.Generator().manual_seed(11)
    lengths = [40, 3, 17, 29, 1, 22]
    mask = torch.zeros(len(lengths), 40)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    advantages = 1000 + 10 * torch.randn(mask.shape, generator=g)  # fp32
    real = np.concatenate([advantages[i, :n].double().numpy() for i, n in enumerate(lengths)])
    mean, std = real.mean(), real.std()  # fp64, biased
    assert abs(mean) / std == pytest.approx(100, rel=0.05)
    white = ppo.whiten(advantages, mask)
    assert white.dtype == torch.float32
    expect = torch.zeros(mask.shape, dtype=torch.float64)
    for i, n in enumerate(lengths):
        expect[i, :n] = (advantages[i, :n].double() - mean) / (std + 1e-8)
    # the output is in units of std: an absolute error is one relative to std
    assert (white.double() - expect).abs().max().item() < 1e-5
    halves = [slice(0, 2), slice(2, 6)]
    split = two_ranks(lambda rank, all_reduce: ppo.whiten(advantages[halves[rank]],
                                                          mask[halves[rank]], all_reduce))
    assert (torch.cat(split).double() - expect).abs().max().item() < 1e-5
    # what the test guards against: the one-pass variance from fp32 sums is off here
    n = mask.sum()
    one_pass_var = (advantages ** 2 * mask).sum() / n - ((advantages * mask).sum() / n) ** 2
    assert abs(one_pass_var.clamp(min=0).sqrt().item() - std) / std > 1e-5


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
    loss, stats = ppo.policy_loss(new, old, adv, ppo.LossReduction("token-mean", mask), (eps, eps))
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
    reduce = ppo.LossReduction("token-mean", torch.ones(1, 2, dtype=torch.float64))
    loss, _ = ppo.policy_loss(new, old, adv, reduce, (0.2, 0.2))
    loss.backward()
    assert new.grad[0, 0] == 0  # positive advantage, ratio above 1 + eps: no further push
    # negative advantage, ratio too high: the unclipped term still pulls it down
    assert new.grad[0, 1] != 0


def test_value_loss_is_the_clipped_squared_error():
    mask, lengths, r = random_batch(seed=4)
    old_v, ret = r(), r()
    v = old_v + 0.5 * r()
    eps = 0.2
    loss, stats = ppo.value_loss(v, old_v, ret, ppo.LossReduction("token-mean", mask), eps)
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
    budget = 16  # Dr. GRPO's constant: the generation budget, not the batch's padded width (9)
    expect = {"token-mean": np.concatenate(per_row).mean(),
              "seq-mean": np.mean([p.mean() for p in per_row]),
              "seq-mean-token-sum-norm": np.mean([p.sum() / budget for p in per_row])}
    for agg, value in expect.items():
        reduce = ppo.LossReduction(agg, mask, token_budget=budget)
        assert reduce(x).item() == pytest.approx(value), agg
    with pytest.raises(ValueError, match="token_budget"):
        ppo.LossReduction("seq-mean-token-sum-norm", mask)
    with pytest.raises(ValueError, match="'sum'.*token-mean, seq-mean or seq-mean-token-sum-norm"):
        ppo.LossReduction("sum", mask)
    # an explicit denominator lets micro-batches add up to the whole batch's mean
    halves = [ppo.LossReduction("token-mean", mask[s], denom=mask.sum())(x[s])
              for s in (slice(0, 2), slice(2, 5))]
    assert sum(halves).item() == pytest.approx(ppo.LossReduction("token-mean", mask)(x).item())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "seq-mean-token-sum-norm"])
def test_every_aggregation_is_the_same_for_any_split_and_any_padded_width(agg):
    """Rows split into micro-batches, each trimmed to its own longest row (as the trainer trims),
    each divided by the whole batch's count: the sum is the whole batch's loss, for every agg."""
    mask, lengths, r = random_batch(seed=8)
    x = r()
    denom = mask.sum() if agg == "token-mean" else len(lengths)
    whole = ppo.LossReduction(agg, mask, denom, token_budget=16)(x)
    for rows in ([[0, 1], [2, 3, 4]], [[0], [1], [2], [3], [4]], [[1, 3], [0, 2, 4]]):
        parts = []
        for part in rows:
            width = max(lengths[i] for i in part)  # trimmed to the part's longest response
            reduce = ppo.LossReduction(agg, mask[part, :width], denom, token_budget=16)
            parts.append(reduce(x[part, :width]))
        assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-12), rows


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "seq-mean-token-sum-norm"])
def test_both_losses_over_micro_batches_add_up_to_the_minibatch_loss(agg):
    """As the trainer builds them: one LossReduction per micro-batch (trimmed to its longest row)
    with the whole minibatch's count, passed to both losses. The parts' losses and gradients sum
    to those of the whole minibatch, which is the agg formula on the per-token terms."""
    mask, lengths, r = random_batch(seed=12)
    old, adv, old_v, ret = -r().abs(), r(), r(), r()
    new, values = old + 0.3 * r(), old_v + 0.5 * r()
    budget, (eps_low, eps_high), value_eps = 16, (0.2, 0.28), 0.2
    denom = mask.sum() if agg == "token-mean" else len(lengths)

    def losses(rows, count):
        width = max(lengths[i] for i in rows)
        part = (rows, slice(0, width))
        reduce = ppo.LossReduction(agg, mask[part], count, budget)
        logprobs, v = new[part].clone().requires_grad_(), values[part].clone().requires_grad_()
        actor, _ = ppo.policy_loss(logprobs, old[part], adv[part], reduce, (eps_low, eps_high))
        critic, _ = ppo.value_loss(v, old_v[part], ret[part], reduce, value_eps)
        (actor + critic).backward()
        grads = torch.zeros(2, *mask.shape, dtype=torch.float64)
        grads[0][part], grads[1][part] = logprobs.grad, v.grad
        return actor.item(), critic.item(), grads

    actor_terms, critic_terms = [], []  # per row, per token, as plain floats
    for i, n in enumerate(lengths):
        ratios = [math.exp(new[i, t] - old[i, t]) for t in range(n)]
        actor_terms.append([-min(q * adv[i, t].item(),
                                 min(max(q, 1 - eps_low), 1 + eps_high) * adv[i, t].item())
                            for t, q in enumerate(ratios)])
        v_clip = [old_v[i, t].item() + min(max(values[i, t].item() - old_v[i, t].item(),
                                               -value_eps), value_eps) for t in range(n)]
        critic_terms.append([0.5 * max((values[i, t].item() - ret[i, t].item()) ** 2,
                                       (v_clip[t] - ret[i, t].item()) ** 2) for t in range(n)])

    def formula(terms):
        if agg == "token-mean":
            return np.concatenate(terms).mean()
        if agg == "seq-mean":
            return np.mean([np.mean(row) for row in terms])
        return np.mean([np.sum(row) / budget for row in terms])

    whole_actor, whole_critic, whole_grads = losses(list(range(len(lengths))), None)
    assert whole_actor == pytest.approx(formula(actor_terms), abs=1e-12)
    assert whole_critic == pytest.approx(formula(critic_terms), abs=1e-12)
    for split in ([[0, 1], [2, 3, 4]], [[4], [1, 3], [0, 2]]):
        parts = [losses(rows, denom) for rows in split]
        assert sum(p[0] for p in parts) == pytest.approx(whole_actor, abs=1e-12), split
        assert sum(p[1] for p in parts) == pytest.approx(whole_critic, abs=1e-12), split
        assert torch.allclose(sum(p[2] for p in parts), whole_grads, atol=1e-12, rtol=0), split


def test_clip_higher_lets_a_ratio_rise_further_than_it_may_fall():
    """DAPO: clip(ratio, 1 - eps_low, 1 + eps_high); with eps_high > eps_low a token whose
    probability went up keeps a gradient until 1 + eps_high."""
    mask = torch.ones(1, 3, dtype=torch.float64)
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = torch.log(torch.tensor([[1.1, 1.25, 0.75]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    reduce = ppo.LossReduction("token-mean", mask)
    loss, stats = ppo.policy_loss(new, old, adv, reduce, (0.2, 0.28))
    loss.backward()
    # token 1 (ratio 1.25, A > 0) is inside [0.8, 1.28]: it still pulls; with the symmetric clip
    # not. Token 2 (ratio 0.75, A < 0) is clipped below: no gradient either way.
    assert new.grad[0, 1] != 0 and new.grad[0, 0] != 0 and new.grad[0, 2] == 0
    expect = -(1.1 * 1 + 1.25 * 1 + 0.8 * -1) / 3  # token 2: ratio 0.75 < 0.8, clipped, A < 0
    assert loss.item() == pytest.approx(expect)
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    symmetric = new.detach().clone().requires_grad_()
    ppo.policy_loss(symmetric, old, adv, reduce, (0.2, 0.2))[0].backward()
    assert symmetric.grad[0, 1] == 0


def test_gspo_sequence_ratio_is_the_length_normalised_sequence_ratio_on_every_token():
    mask, lengths, r = random_batch(seed=9)
    logprobs = (-r().abs() * 0.1).requires_grad_()
    old = -r().abs() * 0.1
    log_s = ppo.sequence_log_ratio(logprobs, old, mask)
    for i, n in enumerate(lengths):
        expect = (logprobs[i, :n] - old[i, :n]).mean().item()  # (1 / |y|) log(pi(y) / pi_old(y))
        assert torch.allclose(log_s[i, :n], torch.full((n,), expect, dtype=torch.float64))
    # the gradient of token t goes to its own log-prob, scaled by the sequence ratio
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64) * mask
    (torch.exp(log_s) * weights).sum().backward()
    seq_ratio = torch.exp(log_s.detach())
    assert torch.allclose(logprobs.grad, seq_ratio * weights)
    # the clip acts per sequence: every token of a row is in or out together
    adv = torch.ones_like(mask)
    reduce = ppo.LossReduction("token-mean", mask)
    _, stats = ppo.policy_loss(logprobs, old, adv, reduce, (1e-4, 1e-4), ratio_level="sequence")
    outside = [((seq_ratio[i, 0] - 1).abs() > 1e-4).item() for i in range(len(lengths))]
    expect = sum(n * o for n, o in zip(lengths, outside)) / sum(lengths)
    assert stats["clipfrac"] == pytest.approx(expect)


def test_truncated_importance_weights_cap_the_sampler_ratio():
    train = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    weights = ppo.truncated_is_weights(train, sampler, cap=2.5)
    assert torch.allclose(weights, torch.tensor([[2.0, 0.5, 2.5]]))
    reduce = ppo.LossReduction("token-mean", torch.ones(1, 3))
    loss, _ = ppo.policy_loss(train, train, torch.ones(1, 3), reduce, (0.2, 0.2),
                              token_weights=weights)
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 2.5) / 3)


def test_reinforce_pp_advantages_are_whitened_returns_to_go():
    mask, lengths, r = random_batch(seed=10)
    rewards, gamma = r() * mask, 0.9
    got = ppo.reinforce_pp_advantages(rewards, mask, gamma)
    returns = [[sum(gamma ** (k - t) * rewards[i, k].item() for k in range(t, n))
                for t in range(n)] for i, n in enumerate(lengths)]
    flat = np.concatenate(returns)
    white = (flat - flat.mean()) / (flat.std() + 1e-8)
    got_flat = np.concatenate([got[i, :n].numpy() for i, n in enumerate(lengths)])
    assert got_flat == pytest.approx(white, abs=1e-9)
    assert (got[mask == 0] == 0).all()


def test_varied_groups_are_those_not_all_scored_alike():
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0])
    assert ppo.varied_groups(scores, 2).tolist() == [False, False, True, False]
    assert ppo.varied_groups(scores, 4).tolist() == [True, True]


def test_overlong_penalty_is_dapo_eq_13():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    got = ppo.overlong_penalty(lengths, max_len=16, buffer=4, factor=0.5)
    # 0 up to 16 - 4 = 12 tokens, then (12 - |y|) / 4, down to -1 at 16 and beyond; times 0.5
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.5])


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


def test_mean_token_kl_is_each_responses_mean_over_its_tokens():
    mask, lengths, r = random_batch(seed=13)
    kl = r().abs() * mask
    got = ppo.mean_token_kl(kl, mask)
    assert got.tolist() == pytest.approx([kl[i, :n].sum().item() / n
                                          for i, n in enumerate(lengths)], abs=1e-12)


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
