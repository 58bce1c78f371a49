"""Step 7 of train_ppo.ppo_step, its pieces: this rank's minibatches of the step's samples and their
micro-batches (each with its share of the minibatch's mean loss), the optimizer step, and what the
update logs. The loop itself, with the losses (ppo.policy_loss, ppo.value_loss), is ppo_step's.
"""
import math
from dataclasses import dataclass, field

import torch

import distributed
import experience
import ppo
from model import response_batch


@dataclass(frozen=True)
class MicroBatch:
    """micro_batch_size rows of the experience, trimmed to their longest response T."""
    batch: object  # model.ResponseBatch: what the forward takes (packed trees or padded rows)
    reduce: ppo.LossReduction  # a per-token loss [b, T] -> this micro-batch's share of the mean
    old_logprobs: torch.Tensor  # [b, T]
    ref_logprobs: torch.Tensor  # [b, T]
    advantages: torch.Tensor  # [b, T]
    returns: torch.Tensor  # [b, T]
    values: torch.Tensor  # [b, T] the critic's values at sampling time (the value clip's anchor)
    tis_weights: torch.Tensor | None  # [b, T] min(pi_old / pi_sampler, --tis_cap), or None


def minibatches(cfg, step: int, exp: experience.Experience, world: int):
    """ppo_epochs passes over this rank's rows in minibatches of train_batch_size / world rows, in
    a seeded order; each minibatch yields its micro-batches.

    Loss normalisation: every micro-batch divides by the token (token-mean) or sequence count of
    the whole GLOBAL minibatch, and its loss is multiplied by the number of ranks because FSDP
    averages gradients over ranks; so the gradient is exactly that of the minibatch's mean loss,
    whatever the micro-batching and the number of ranks."""
    mask = exp.samples.mask
    size = cfg.train_batch_size // world  # rows of a minibatch on this rank
    n_minibatches = mask.shape[0] // size
    tokens = distributed.all_reduce_dict({k: mask[k * size:(k + 1) * size].sum().item()
                                          for k in range(n_minibatches)})  # over all ranks
    for epoch in range(cfg.ppo_epochs):
        seed = hash((cfg.seed, step, epoch)) % 2 ** 63
        order = torch.randperm(n_minibatches, generator=torch.Generator().manual_seed(seed))
        for k in order.tolist():
            denom = tokens[k] if cfg.loss_agg == "token-mean" else cfg.train_batch_size
            yield (micro_batch(cfg, exp, s, denom)
                   for s in range(k * size, (k + 1) * size, cfg.micro_batch_size))


def micro_batch(cfg, exp: experience.Experience, start: int, denom: float) -> MicroBatch:
    samples = exp.samples
    rows = slice(start, start + cfg.micro_batch_size)
    T = int(samples.mask[rows].sum(1).max())
    batch = response_batch(samples.sequences[rows], samples.attention_mask[rows],
                           samples.mask[rows], cfg.pack_samples)
    tis_weights = None
    if cfg.tis_cap > 0:
        tis_weights = ppo.truncated_is_weights(exp.old_logprobs[rows, :T],
                                               samples.sampler_logprobs[rows, :T], cfg.tis_cap)
    reduce = ppo.LossReduction(cfg.loss_agg, samples.mask[rows, :T], denom, cfg.max_new_tokens)
    return MicroBatch(batch, reduce, exp.old_logprobs[rows, :T], exp.ref_logprobs[rows, :T],
                      exp.advantages[rows, :T], exp.returns[rows, :T], exp.values[rows, :T],
                      tis_weights)


UPDATE_SUMS = ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "vf_clipfrac",
               "tokens")


@dataclass
class UpdateStats:
    """What step 7 logs, summed over micro-batches (and, once all-reduced, ranks)."""
    sums: dict = field(default_factory=lambda: dict.fromkeys(UPDATE_SUMS, 0.0))
    grad_norms: dict = field(default_factory=lambda: {"policy": [], "critic": []})  # per update
    updates: int = 0
    nonfinite_updates: int = 0

    def add_actor(self, mask, actor_loss, mean_entropy, clip_stats):
        tokens = mask.sum().item()
        self.sums["policy_loss"] += actor_loss.item()  # over micro-batches, ranks: the mean
        self.sums["entropy"] += mean_entropy.item()
        self.sums["clipfrac"] += clip_stats["clipfrac"] * tokens
        self.sums["approx_kl"] += clip_stats["approx_kl"] * tokens
        self.sums["tokens"] += tokens

    def add_critic(self, mask, critic_loss, value_stats):
        self.sums["value_loss"] += critic_loss.item()
        self.sums["vf_clipfrac"] += value_stats["vf_clipfrac"] * mask.sum().item()

    def summary(self, with_critic: bool) -> dict:
        total = distributed.all_reduce_dict(self.sums)
        tokens = max(total["tokens"], 1)
        out = {"policy_loss": total["policy_loss"] / self.updates,
               "entropy": total["entropy"] / self.updates, "clipfrac": total["clipfrac"] / tokens,
               "approx_kl": total["approx_kl"] / tokens,
               "nonfinite_updates": self.nonfinite_updates}
        if with_critic:
            out.update(value_loss=total["value_loss"] / self.updates,
                       vf_clipfrac=total["vf_clipfrac"] / tokens)
        for name, metric in (("policy", "actor_grad_norm"), ("critic", "critic_grad_norm")):
            if self.grad_norms[name]:
                out[metric] = sum(self.grad_norms[name]) / len(self.grad_norms[name])
        if self.nonfinite_updates:  # the step counts as skipped (common.StepLoop counts it)
            out["skipped"] = f"{self.nonfinite_updates} non-finite gradient(s)"
        return out


def optimizer_step(cfg, models, update: UpdateStats):
    """The end of a minibatch, for the actor and the critic: clip the gradient norm, step AdamW
    (unless a gradient is non-finite: then neither steps, and the update is counted), zero the
    gradients, step the learning-rate schedule."""
    norms = {name: distributed.grad_norm_and_clip(item.params, cfg.max_grad_norm)
             for name, item in models.trained.items()}
    finite = all(math.isfinite(norm) for norm in norms.values())
    for name in models.trained:
        if finite:
            models.optimizers[name].step()
            update.grad_norms[name].append(norms[name])
        models.optimizers[name].zero_grad(set_to_none=True)
        models.schedulers[name].step()
    update.updates += 1
    update.nonfinite_updates += not finite
