"""The PPO math of Med-RLVR, as plain functions on [B, T] tensors with a response mask.

Copy this file on its own: it needs only torch. train_ppo.ppo_step calls these, one step each;
tests/test_ppo.py checks each against a separate straightforward computation. Conventions: `mask`
[B, T] is 1 on generated tokens (up to and including the one that ended the row) and 0 on padding;
log-probs are of the sampled tokens; a row's reward for the answer arrives on its last token.

In the order a step uses them: overlong_penalty and varied_groups (DAPO's shaping and dynamic
sampling, step 3), kl_penalty and token_rewards (step 5), gae and whiten, or without a critic
critic_free_advantages or reinforce_pp_advantages (step 6), a LossReduction per micro-batch, then
policy_loss (with clip-higher, GSPO's sequence_log_ratio, truncated_is_weights) and value_loss
(step 7); mean_token_kl, adaptive_kl and lr_schedule between steps.
"""
import math
from dataclasses import dataclass

import torch


def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL
    divergence", 2020). With log r = log pi_ref(a) - log pi(a):
        k1 = -log r,    k2 = (log r)^2 / 2,    k3 = (r - 1) - log r
    k1 is unbiased but noisy and can be negative; k3 is unbiased and always >= 0; k2 is biased, with
    low variance."""
    log_r = ref_logprobs - logprobs  # [B, T]
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"unknown KL estimator {kind!r}")


def token_rewards(kl, scores, mask, kl_coef):
    """The per-token reward of RL from a score with a KL penalty (Ziegler et al. 2019; Ouyang et al.
    2022, eq. 2). This is where -beta * KL enters:
        r_t = -beta * KL_t                 on every response token t
        r_T = -beta * KL_T + score         on each row's last token T (the verifier's -1 / 0 / +1)
    kl: [B, T] per-token KL estimate (0 on padding); scores: [B]. Returns [B, T]."""
    rewards = -kl_coef * kl  # [B, T]
    last = mask.sum(1).long() - 1  # [B] index of each row's final token
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalized Advantage Estimation (Schulman et al. 2016), a plain reversed loop over time.
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}        returns_t = A_t + V(s_t)
    The episode ends at each row's last generated token: there V(s_{t+1}) = 0 and A_{t+1} = 0.
    rewards, values, mask: [B, T]."""
    rewards, values = rewards * mask, values * mask  # [B, T] nothing counts after a row has ended
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # [B, T]
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # [B] A_{t+1}
    next_value = torch.zeros_like(next_adv)  # [B] V(s_{t+1})
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]  # [B]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask  # [B, T], [B, T]


def whiten(advantages, mask, all_reduce=None, eps=1e-8):
    """A <- (A - mean) / (std + eps) over the masked entries (advantage normalisation, as OpenRLHF
    does), with the biased variance. Returns [B, T], 0 on padding.

    With `all_reduce` (a function that sums a dict of floats over ranks) the statistics are those of
    every rank's tokens, so the result does not depend on how the batch is split. The variance is
    the mean of the centred squares, a second pass after the mean, in float64: the one-pass
    E[A^2] - E[A]^2 cancels catastrophically when |mean| >> std (REINFORCE++ when nearly every
    response scored alike), its rounding error growing with (|mean| / std)^2."""
    def over_ranks(sums):
        return sums if all_reduce is None else all_reduce(sums)

    values, weights = advantages.double(), mask.double()  # [B, T]
    first = over_ranks({"n": weights.sum().item(), "sum": (values * weights).sum().item()})
    mean = first["sum"] / first["n"]
    second = over_ranks({"centred_sq": ((values - mean) ** 2 * weights).sum().item()})
    std = math.sqrt(second["centred_sq"] / first["n"])
    return ((values - mean) / (std + eps) * weights).to(advantages.dtype)


def group_advantages(scores, n, kind):
    """Critic-free advantages from the outcome scores [N] of n samples per prompt (a group's rows
    adjacent):
        grpo:   (r - mean_group) / (std_group + 1e-6)                      (Shao et al. 2024)
        drgrpo: r - mean_group, no std division                (Liu et al. 2025, "Dr. GRPO")
        rloo:   r - mean of the other n-1 = n/(n-1) (r - mean_group)  (Ahmadian et al. 2024)"""
    g = scores.view(-1, n)  # [prompts, n]
    centered = g - g.mean(dim=1, keepdim=True)  # [prompts, n]
    if kind == "grpo":
        adv = centered / (g.std(dim=1, keepdim=True) + 1e-6)
    elif kind == "drgrpo":
        adv = centered
    elif kind == "rloo":
        adv = centered * n / (n - 1)
    else:
        raise ValueError(kind)
    return adv.reshape(-1)  # [N]


def critic_free_advantages(scores, kl, mask, n, kind, kl_coef):
    """Advantages without a critic, [B, T]: the group-relative score of the whole response on every
    token (group_advantages), plus the KL penalty's returns-to-go, the sum over t' >= t of
    -beta * KL_t' (what GAE gives the rewards r_t = -beta * KL_t with V = 0, gamma = lambda = 1).
    scores: [B] (a group's rows adjacent); kl: [B, T]."""
    advantages = group_advantages(scores, n, kind)[:, None] * mask  # [B, T]
    kl_rewards = -kl_coef * kl  # [B, T]
    kl_to_go = torch.flip(torch.cumsum(torch.flip(kl_rewards, [1]), 1), [1])  # [B, T]
    return advantages + kl_to_go * mask


def reinforce_pp_advantages(rewards, mask, gamma, all_reduce=None):
    """REINFORCE++ (Hu 2025): no critic; each token's advantage is its return, the discounted sum of
    the token rewards still to come (the KL penalty in them, the score at the end),
        A_t = sum_{t' >= t} gamma^(t' - t) r_t'
    normalised over every token of the global batch (whiten). rewards, mask: [B, T]."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)  # [B, T]
    return whiten(returns, mask, all_reduce)


def varied_groups(scores, n):
    """DAPO's dynamic sampling (Yu et al. 2025): which groups of n samples (a prompt's, adjacent)
    did not all score alike, [prompts] bool. A group whose samples scored alike has no group
    advantage: it carries no signal, and is replaced by another prompt's."""
    groups = scores.view(-1, n)  # [prompts, n]
    return (groups != groups[:, :1]).any(dim=1)


def overlong_penalty(lengths, max_len, buffer, factor=1.0):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score: 0 up to
    max_len - buffer tokens, then falling linearly to -factor at max_len (and beyond); no buffer,
    no punishment. lengths: [B] response tokens. Returns [B]."""
    if buffer == 0:
        return torch.zeros(lengths.shape, device=lengths.device)
    allowed = max_len - buffer
    excess = (lengths.float() - allowed).clamp(min=0)  # [B]
    return -factor * (excess / buffer).clamp(max=1.0)


@dataclass(frozen=True, eq=False)
class LossReduction:
    """How a micro-batch's per-token loss [b, T] becomes its share of the minibatch's mean loss:
    reduce = LossReduction(agg, mask, denom, token_budget); reduce(per_token) -> scalar.
        token-mean               the mean over every token of the batch
        seq-mean                 each sequence's token mean, then the mean over sequences
        seq-mean-token-sum-norm  each sequence's token sum / token_budget, a constant (the
                                 generation budget), then the mean over sequences (Dr. GRPO, Liu
                                 et al. 2025)
    `denom` replaces the count of the last division (tokens for token-mean, sequences otherwise):
    given the whole minibatch's count, over every rank, the micro-batches' and ranks' results add
    up to the mean over the whole minibatch, whatever the split and the padded width of each part.
    Without it the count is this batch's own. `mask` [b, T] also tells the losses which tokens
    count in their statistics."""
    agg: str
    mask: torch.Tensor  # [b, T]
    denom: float | None = None
    token_budget: int | None = None

    def __post_init__(self):
        if self.agg not in ("token-mean", "seq-mean", "seq-mean-token-sum-norm"):
            raise ValueError(f"loss reduction {self.agg!r}: choose token-mean, seq-mean or "
                             "seq-mean-token-sum-norm")
        if self.agg == "seq-mean-token-sum-norm" and not self.token_budget:
            raise ValueError("seq-mean-token-sum-norm divides each sequence's sum by a constant: "
                             "give token_budget, the generation budget (--max_new_tokens)")

    def __call__(self, per_token):
        mask = self.mask
        if self.agg == "token-mean":
            count = self.denom if self.denom is not None else mask.sum().clamp(min=1)
            return (per_token * mask).sum() / count
        if self.agg == "seq-mean":
            per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # [b]
        else:
            per_sequence = (per_token * mask).sum(1) / self.token_budget  # [b]
        count = self.denom if self.denom is not None else mask.shape[0]
        return per_sequence.sum() / count


def policy_loss(logprobs, old_logprobs, advantages, reduce, clip, ratio_level="token",
                token_weights=None):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), to be minimised, per token:
        ratio = pi(a|s) / pi_old(a|s)
        L = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    reduced to a scalar by `reduce` (a LossReduction, whose mask says which tokens count).
    clip = (eps_low, eps_high): PPO's symmetric clip when equal; eps_high > eps_low is DAPO's
    clip-higher (Yu et al. 2025), letting a token's probability rise further than it may fall.
    ratio_level="sequence": GSPO (Zheng et al. 2025), every token takes its sequence's
    length-normalised ratio (sequence_log_ratio). token_weights [B, T]: multiply each token's loss
    (truncated importance sampling, truncated_is_weights). stats: clipfrac (share of tokens whose
    ratio left the clip range), approx_kl (k3 to pi_old)."""
    mask = reduce.mask  # [B, T]
    if ratio_level == "token":
        log_ratio = logprobs - old_logprobs  # [B, T]
    elif ratio_level == "sequence":
        log_ratio = sequence_log_ratio(logprobs, old_logprobs, mask)  # [B, T]
    else:
        raise ValueError(f"ratio_level {ratio_level!r}: token or sequence")
    eps_low, eps_high = clip
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = ratio * advantages  # [B, T]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages  # [B, T]
    per_token = -torch.min(unclipped, clipped)  # [B, T] the pessimistic bound of eq. 7
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = reduce(per_token)
    with torch.no_grad():
        outside = (ratio < 1 - eps_low) | (ratio > 1 + eps_high)  # [B, T]
        stats = {"clipfrac": masked_mean(outside.float(), mask).item(),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item()}
    return loss, stats


def sequence_log_ratio(logprobs, old_logprobs, mask):
    """GSPO's sequence ratio (Zheng et al. 2025; in its token form, GSPO-token), [B, T]:
        log s_i = (1 / |y_i|) sum_t (log pi(y_t) - log pi_old(y_t))     on every token of row i
    with the gradient of each token's own log-prob (s_i,t = sg[s_i] pi(y_t) / sg[pi(y_t)]), so the
    clip acts on the whole sequence and each token still carries its own advantage."""
    per_sequence = masked_mean(logprobs - old_logprobs, mask, dim=1)  # [B]
    return per_sequence.detach()[:, None] + logprobs - logprobs.detach()  # [B, T]


def truncated_is_weights(train_logprobs, sampler_logprobs, cap):
    """Truncated importance sampling for the sampler / trainer mismatch (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"; veRL PR #2953): the tokens
    were sampled by the inference engine's pi_sampler, the ratio is taken to the trainer's
    pi_old, so each token's loss is weighted by min(pi_old(a) / pi_sampler(a), cap). [B, T], no
    gradient."""
    return torch.exp(train_logprobs - sampler_logprobs).clamp(max=cap).detach()


def value_loss(values, old_values, returns, reduce, clip_eps):
    """Clipped value loss (as in OpenAI baselines and OpenRLHF), reduced by `reduce` (a
    LossReduction):
        V_clip = V_old + clip(V - V_old, -eps, eps);  L = 1/2 max((V - R)^2, (V_clip - R)^2)
    stats: vf_clipfrac (share of tokens whose value moved more than eps)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # [B, T]
    per_token = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)  # [B, T]
    loss = reduce(per_token)
    with torch.no_grad():
        moved = ((values - old_values).abs() > clip_eps).float()  # [B, T]
        stats = {"vf_clipfrac": masked_mean(moved, reduce.mask).item()}
    return loss, stats


def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def mean_token_kl(kl, mask):
    """Each response's KL to the reference per token: the mean of its tokens' estimates, [B].
    Averaged over the responses, the KL that adaptive_kl expects."""
    return masked_mean(kl, mask, dim=1)


def adaptive_kl(kl_coef, observed_kl, target, horizon, n_steps):
    """The adaptive KL controller of Ziegler et al. 2019 (section 2.2):
        beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
    n: the samples of the step. The target means something only in observed_kl's unit, a KL per
    token as veRL and OpenRLHF measure it: each response's mean over its tokens (mean_token_kl),
    averaged over the responses. veRL feeds its controller exactly that
    (verl/trainer/ppo/ray_trainer.py, apply_kl_penalty); OpenRLHF v0.5.7-0.6.x stores the same
    per-response mean (openrlhf/trainer/ppo_utils/experience_maker.py, info["kl"]) and averages
    it weighted by response length over each micro-batch before the update
    (openrlhf/trainer/ppo_trainer.py, from v0.6.3 trainer/ray/ppo_actor.py). A response's summed
    KL is larger by its length, and would need a target as much larger."""
    error = max(-0.2, min(0.2, observed_kl / target - 1))
    return kl_coef * (1 + error * n_steps / horizon)


def lr_schedule(total_steps, warmup_ratio, min_lr_ratio):
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to min_lr_ratio
    (OpenRLHF's cosine_with_min_lr)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(i):
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1 - min_lr_ratio) * cosine
    return factor
