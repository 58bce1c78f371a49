"""Steps 1-4 of a PPO step: which prompts, the sampled responses, their scores, and what the frozen
reference and the critic say of them. train_ppo.ppo_step calls these; steps 5-7 (the math) are its.

  1. `step_prompts`: this rank's prompts of a step, a seeded pass over the training questions;
  2. `sample_responses`: n responses per prompt from the policy, into an `Experience`;
  3. `score_responses`: the verifier's reward of each, and one record a sample for rollouts.jsonl;
     with --filter_groups, `keep_varied_groups` (DAPO's dynamic sampling) samples further prompts
     in place of the groups whose samples all scored alike;
  4. `reference_and_critic`: log pi of the same tokens by a training forward of the policy, log
     pi_ref, and V(s_t), each prompt computed once for all of its samples (model.pack).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import distributed
import engine
import ppo
import rollout
import verifier
from common import autocast, training_prompts
from model import pack, response_batch, response_logprobs, response_values

# The verifier refuses any text after </answer>, so nothing sampled after it can help.
STOP_STRINGS = ["</answer>"]


def stop_strings(cfg):
    """--stop_at_answer: end a response at </answer>; else at EOS or the length limit only (as the
    study's OpenRLHF and vLLM did: the model has to learn to stop, and text after </answer> breaks
    the format)."""
    return STOP_STRINGS if cfg.stop_at_answer else None


@dataclass
class Experience:
    """What a step learns from: this rank's N = prompts x n_samples_per_prompt rows, filled in by
    steps 2 to 6 (P: the prompts' padded width, T: the longest response)."""
    sequences: torch.Tensor  # [N, P+T] long: the left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor  # [N, P+T] long: 1 on the real tokens of prompt and response
    mask: torch.Tensor  # [N, T] float: 1 on response tokens, up to and including the last one
    sampler_logprobs: torch.Tensor  # [N, T] log pi(a_t) as the sampler computed it (step 2)
    finish_reason: list[str]  # [N] "eos" | "stop" | "length" (step 2)
    scores: torch.Tensor | None = None  # [N] the verifier's reward of each response (step 3)
    train_logprobs: torch.Tensor | None = None  # [N, T] log pi(a_t) by a training forward (4)
    old_logprobs: torch.Tensor | None = None  # [N, T] log pi_old(a_t): one of the two above (4)
    ref_logprobs: torch.Tensor | None = None  # [N, T] log pi_ref(a_t), the frozen reference (4)
    values: torch.Tensor | None = None  # [N, T] V(s_t), the critic's (step 4; 0 without a critic)
    kl: torch.Tensor | None = None  # [N, T] KL_t, the per-token estimate of KL(pi || pi_ref) (5)
    advantages: torch.Tensor | None = None  # [N, T] A_t (step 6)
    returns: torch.Tensor | None = None  # [N, T] the critic's targets (step 6; 0 without a critic)




# ==================================================================================================
# Step 1: the questions, and which prompts each rank takes at each step
# ==================================================================================================
@dataclass
class Questions:
    """The training set: data.py records and their prompts, as the policy reads them."""
    records: list[dict]
    texts: list[str]


@dataclass
class StepPrompts:
    """This rank's prompts of one step, in its row order."""
    positions: list[int]  # each prompt's position in the step's global batch (seeds its noise)
    records: list[dict]
    texts: list[str]


def load_questions(cfg, tokenizer, log) -> Questions:
    """The training questions; prompts over max_prompt_tokens are left out, and counted."""
    records, texts, _, _ = training_prompts(cfg, tokenizer, log, suffix=cfg.prefill)
    return Questions(records, texts)


def step_prompts(cfg, questions: Questions, step: int, rank: int, world: int):
    picked = step_prompt_indices(cfg, len(questions.records), step, rank, world)
    return StepPrompts([p for p, _ in picked], [questions.records[i] for _, i in picked],
                       [questions.texts[i] for _, i in picked])


def step_prompt_indices(cfg, n_questions: int, step: int, rank: int, world: int):
    """(position, question index) of this rank's prompts at `step` (1-based), in its row order.

    The global batch of step s is the next rollout_batch_size questions of a seeded pass over the
    data (a new permutation each epoch). Minibatch k of the update is a fixed block of those
    prompts, and rank r holds the r-th slice of every block: so a minibatch holds the same samples
    whatever the number of ranks.
    """
    batch_size = cfg.rollout_batch_size
    per_minibatch = cfg.train_batch_size // cfg.n_samples_per_prompt  # prompts
    start = (step - 1) * batch_size
    stream = []
    epoch = start // n_questions
    while len(stream) < (start % n_questions) + batch_size:
        stream += data.epoch_order(n_questions, cfg.seed, epoch)
        epoch += 1
    batch = stream[start % n_questions:start % n_questions + batch_size]  # this step's questions
    per_rank = per_minibatch // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    return [(k + j, batch[k + j]) for k in range(0, batch_size, per_minibatch) for j in mine]


# ==================================================================================================
# Steps 2-4: sample, score, and the reference's and the critic's view of the samples
# ==================================================================================================
def sample_responses(cfg, models, prompts: StepPrompts, step: int) -> Experience:
    """n responses per prompt from the policy (step 2), in chunks of generate_batch_size rows."""
    n = cfg.n_samples_per_prompt
    tokenizer, device = models.tokenizer, models.device
    ids, attn, _, _ = data.tokenize_prompts(tokenizer, prompts.texts, None)  # [b, P] left padded
    ids = ids.repeat_interleave(n, 0).to(device)  # [N, P] the n samples of a prompt adjacent
    attn = attn.repeat_interleave(n, 0).to(device)  # [N, P]
    uniforms = row_uniforms(cfg, step, prompts.positions).to(device)  # [N, max_new_tokens]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else []
    generate = engine.generate if cfg.engine == "fast" else rollout.generate  # the same samples
    chunks = []
    # the full weights once for the whole rollout (FSDP2), not gathered again for every token
    with distributed.gathered(models.policy), autocast(cfg, device):
        for s in range(0, len(ids), cfg.generate_batch_size):
            rows = slice(s, s + cfg.generate_batch_size)
            chunks.append(generate(models.policy, ids[rows], attn[rows], cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                   eos_token_id=eos, stop_strings=stop_strings(cfg),
                                   tokenizer=tokenizer, uniforms=uniforms[rows]))
    P = ids.shape[1]
    T = max(c.response_mask.shape[1] for c in chunks)

    def cat(tensors, fill):  # chunks of [rows, T_chunk] into [N, T], right padded with `fill`
        return torch.cat([F.pad(x, (0, T - x.shape[1]), value=fill) for x in tensors])

    responses = cat([c.sequences[:, P:] for c in chunks], tokenizer.pad_token_id)  # [N, T]
    mask = cat([c.response_mask for c in chunks], 0).float()  # [N, T]
    return Experience(sequences=torch.cat([ids, responses], 1),
                      attention_mask=torch.cat([attn, mask.long()], 1),
                      mask=mask, sampler_logprobs=cat([c.logprobs for c in chunks], 0.0).float(),
                      finish_reason=[f for c in chunks for f in c.finish_reason])


def row_uniforms(cfg, step: int, positions: list[int]) -> torch.Tensor:
    """Sampling noise [rows, max_new_tokens]: row (prompt position p, sample j) of step s draws
    from its own generator, so what it samples does not depend on its rank, batch or chunk."""
    out = torch.empty(len(positions) * cfg.n_samples_per_prompt, cfg.max_new_tokens)
    for i, p in enumerate(positions):
        for j in range(cfg.n_samples_per_prompt):
            g = torch.Generator().manual_seed(hash((cfg.seed, step, p, j)) % (2 ** 63))
            out[i * cfg.n_samples_per_prompt + j] = torch.rand(cfg.max_new_tokens, generator=g)
    return out


def score_responses(cfg, tokenizer, prompts: StepPrompts, exp: Experience, step: int):
    """Step 3: the verifier's reward of each response, [N], and one record a sample for the log.

    The verifier sees the prefilled text plus what the model wrote (EOS excluded). A non-finite
    reward (from a custom reward, say) stays in the records, where skip_reason finds it, and counts
    as 0 in the scores, so that the step's metrics stay readable."""
    n = cfg.n_samples_per_prompt
    P = exp.sequences.shape[1] - exp.mask.shape[1]
    prefill = data.PROMPT_PREFILL.get(cfg.prompt_style, "") + cfg.prefill
    lengths = exp.mask.sum(1).long().tolist()
    rules = verifier.Rules(strict_format=cfg.strict_format,
                           penalize_template_copy=cfg.penalize_template_copy,
                           format_reward=cfg.format_reward, wrong_reward=cfg.wrong_reward,
                           correct_reward=cfg.correct_reward)
    samples, scores = [], []
    for i in range(len(lengths)):
        record = prompts.records[i // n]
        tokens = exp.sequences[i, P:P + lengths[i]]
        # the token that completed "</answer>" may carry more text ("></" is one SmolLM2 token)
        text = rollout.cut_after_stop(tokenizer.decode(tokens, skip_special_tokens=True),
                                      stop_strings(cfg))
        verdict = verifier.verify(prefill + text, record["answer"], record["options"], rules)
        scores.append(verdict["reward"])
        samples.append({"step": step, "row": prompts.positions[i // n] * n + i % n,
                        "id": record["id"], "prompt": prompts.texts[i // n],
                        "response": cfg.prefill + text, "gold": record["answer"],
                        "options": record["options"], "prompt_style": cfg.prompt_style,
                        "response_tokens": lengths[i], "finish_reason": exp.finish_reason[i],
                        **{k: verdict[k] for k in VERDICT_KEYS}})
    scores = torch.tensor(scores, dtype=torch.float32, device=exp.mask.device)  # [N]
    return torch.nan_to_num(scores, nan=0.0), samples


VERDICT_KEYS = ("reward", "pred", "correct", "format_ok", "answer_in_think",
                "reasoning_outside_think", "template_copy", "think_chars", "answer_chars")


def keep_varied_groups(cfg, run, models, questions: Questions, step: int, exp: Experience,
                       samples: list[dict], timer):
    """DAPO's dynamic sampling (Yu et al. 2025), after step 3: a group whose n samples all scored
    alike has no group advantage, so it makes way for the groups of further prompts, sampled a
    round (this rank's share of rollout_batch_size prompts) at a time until every rank holds its
    share of varied groups, or --max_sample_rounds rounds ran; groups that scored alike then fill
    what is missing, and the metrics say how many. Every rank samples as many rounds as the rank
    that needs the most, so that the collectives match. Returns the experience, its samples and
    the sampling's metrics."""
    n = cfg.n_samples_per_prompt
    quota = len(samples) // n  # groups this rank hands to the update
    first_varied = ppo.varied_groups(exp.scores, n)  # [quota]
    pieces = [(exp, samples)]
    rounds = 1
    while rounds < cfg.max_sample_rounds:
        varied = sum(int(ppo.varied_groups(e.scores, n).sum()) for e, _ in pieces)
        if distributed.all_reduce_dict({"short": float(varied < quota)})["short"] == 0:
            break
        prompts = refill_prompts(cfg, questions, step, rounds, run.rank, run.world)
        with timer("generate"):
            extra = sample_responses(cfg, models, prompts, step)
        with timer("score"):
            extra.scores, extra_samples = score_responses(cfg, models.tokenizer, prompts, extra,
                                                          step)
        pieces.append((extra, extra_samples))
        rounds += 1
    every = concat_experiences([e for e, _ in pieces], models.tokenizer.pad_token_id)
    every_sample = [s for _, group_samples in pieces for s in group_samples]
    varied = ppo.varied_groups(every.scores, n)  # [groups]
    chosen = torch.cat([varied.nonzero()[:, 0], (~varied).nonzero()[:, 0]])[:quota].tolist()
    rows = [g * n + j for g in sorted(chosen) for j in range(n)]
    counts = distributed.all_reduce_dict({"first": float(first_varied.sum()),
                                          "alike": float(sum(not varied[g] for g in chosen)),
                                          "groups": float(quota)})
    stats = {"sample_rounds": rounds, "varied_group_rate": counts["first"] / counts["groups"],
             "alike_groups_kept": int(counts["alike"])}
    return select_rows(every, rows), [every_sample[r] for r in rows], stats


def refill_prompts(cfg, questions: Questions, step: int, round_: int, rank: int, world: int):
    """This rank's prompts of sampling round `round_` (>= 1) of a step: its share of a fresh
    seeded draw of rollout_batch_size questions (a function of seed, step and round, so a resumed
    run draws the same); positions after the step's own batch, so each row keeps its own noise."""
    per_rank = cfg.rollout_batch_size // world
    # epoch -1: a draw of its own, never one of the passes over the data (epochs 0, 1, ...)
    order = data.epoch_order(len(questions.records), hash((cfg.seed, step, round_)) % 2 ** 31, -1)
    first = rank * per_rank
    picked = [order[(first + i) % len(order)] for i in range(per_rank)]
    positions = [round_ * cfg.rollout_batch_size + first + i for i in range(per_rank)]
    return StepPrompts(positions, [questions.records[i] for i in picked],
                       [questions.texts[i] for i in picked])


def concat_experiences(experiences: list, pad_id: int) -> Experience:
    """Rows of several experiences (steps 2-3 filled) as one: prompts left padded and responses
    right padded to the widest."""
    P = max(e.sequences.shape[1] - e.mask.shape[1] for e in experiences)
    T = max(e.mask.shape[1] for e in experiences)

    def widen(x, p, fill):  # [rows, p + t] -> [rows, P + T]: prompt left, response right padded
        prompt = F.pad(x[:, :p], (P - p, 0), value=fill)
        response = F.pad(x[:, p:], (0, T - (x.shape[1] - p)), value=fill)
        return torch.cat([prompt, response], 1)

    def right(x, fill):  # [rows, t] -> [rows, T]
        return F.pad(x, (0, T - x.shape[1]), value=fill)

    prompt_width = [e.sequences.shape[1] - e.mask.shape[1] for e in experiences]
    return Experience(
        sequences=torch.cat([widen(e.sequences, p, pad_id)
                             for e, p in zip(experiences, prompt_width)]),
        attention_mask=torch.cat([widen(e.attention_mask, p, 0)
                                  for e, p in zip(experiences, prompt_width)]),
        mask=torch.cat([right(e.mask, 0) for e in experiences]),
        sampler_logprobs=torch.cat([right(e.sampler_logprobs, 0.0) for e in experiences]),
        finish_reason=[f for e in experiences for f in e.finish_reason],
        scores=torch.cat([e.scores for e in experiences]))


def select_rows(exp: Experience, rows: list[int]) -> Experience:
    """The experience (steps 2-3 filled) of these rows only, in this order."""
    index = torch.tensor(rows, dtype=torch.long, device=exp.mask.device)
    return Experience(sequences=exp.sequences[index], attention_mask=exp.attention_mask[index],
                      mask=exp.mask[index], sampler_logprobs=exp.sampler_logprobs[index],
                      finish_reason=[exp.finish_reason[r] for r in rows], scores=exp.scores[index])


def reference_and_critic(cfg, models, exp: Experience, timer):
    """Step 4: log pi of the sampled tokens by a training forward of the policy [N, T] (the old
    log-probs where the sampler's differ: not fp32, --recompute_logprobs; and the sampler / trainer
    gap every step), log pi_ref [N, T], and V(s_t) [N, T] (0 without a critic).
    Returns (train, reference, values)."""
    batches = no_grad_batches(cfg, exp)  # built once, run through each model
    with timer("train_logprobs"):
        train_logprobs = forward_in_chunks(cfg, models.policy, batches, exp.mask)
    with timer("reference"):
        ref_logprobs = forward_in_chunks(cfg, models.reference, batches, exp.mask)
    with timer("critic"):
        values = torch.zeros_like(exp.mask)  # [N, T]
        if models.critic is not None:
            values = forward_in_chunks(cfg, models.critic, batches, exp.mask, critic=True)
    return train_logprobs * exp.mask, ref_logprobs * exp.mask, values * exp.mask


@torch.no_grad()
def forward_in_chunks(cfg, model, batches, mask, critic=False) -> torch.Tensor:
    """Log-probs (or, for the critic, values) over no_grad_batches, as [N, T] (0 past each row's
    response)."""
    out = torch.zeros_like(mask)  # [N, T]
    with autocast(cfg, mask.device):
        for rows, batch in batches:
            if critic:
                y = response_values(model, batch).float()  # [b, T']
            else:
                y = response_logprobs(model, batch, cfg.temperature).float()  # [b, T']
            out[rows, :y.shape[1]] += y
    return out


def no_grad_batches(cfg, exp: Experience) -> list:
    """The batches of the reference and critic forwards, as (rows, batch) pairs: packed trees of at
    most --forward_token_budget tokens, each prompt once for its samples (rows: all of them, as a
    packed batch unpacks to [N, T]); or (--pack_samples false) micro_batch_size padded rows."""
    seq, attn, mask = exp.sequences, exp.attention_mask, exp.mask
    if cfg.pack_samples:
        return [(slice(None), trees) for trees in pack(seq, attn, mask, cfg.forward_token_budget)]
    size = cfg.micro_batch_size
    return [(slice(s, s + size), response_batch(seq[s:s + size], attn[s:s + size],
                                                mask[s:s + size], packed=False))
            for s in range(0, len(seq), size)]
