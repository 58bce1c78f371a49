"""Steps 1-4 of a PPO step: which prompts, the sampled responses, their scores, and what the policy,
the frozen reference and the critic say of them. train_ppo.ppo_step calls these; steps 5-7 (the
math) are its own.

  1. `step_prompts`: this rank's prompts of a step, a seeded pass over the training questions;
  2. `sample_responses`: n responses per prompt from the run's sampler (samplers.py);
  3. `score_responses`: the verifier's reward of each, with one record a sample for
     rollouts.jsonl: the step's `Samples`, built in one call; with --filter_groups,
     `keep_varied_groups` (DAPO's dynamic sampling) replaces the groups whose samples all scored
     alike by further prompts' groups;
  4. `reference_and_critic`: log pi of the same tokens by a training forward of the policy, log
     pi_ref, and V(s_t), each prompt computed once for all of its samples (model.pack).
What the update learns from (old and reference log-probs, values, KL, advantages, returns) is the
`Experience`, which ppo_step builds once, after step 6. Neither record changes once built.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import distributed
import ppo
import rollout
import sources
import verifier
from model import pack, response_batch, response_logprobs, response_values


# ==================================================================================================
# The records a step hands on
# ==================================================================================================
@dataclass(frozen=True)
class Samples:
    """Steps 2-3: this rank's N = prompts x n rows, as sampled and scored (P: the prompts' padded
    width; T: the longest response)."""
    sequences: torch.Tensor  # [N, P+T] long: the left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor  # [N, P+T] long: 1 on the real tokens of prompt and response
    mask: torch.Tensor  # [N, T] float: 1 on response tokens, up to and including the last one
    sampler_logprobs: torch.Tensor  # [N, T] log pi(a_t) as the sampler computed it
    scores: torch.Tensor  # [N] the verifier's reward of each response
    records: list  # [N] dicts for rollouts.jsonl: the response, its verdict, why it ended


@dataclass(frozen=True)
class Experience:
    """What step 7 learns from, built once after step 6 ([N, T] each, 0 past a response)."""
    samples: Samples
    old_logprobs: torch.Tensor  # log pi_old(a_t): the policy that sampled (step 4)
    ref_logprobs: torch.Tensor  # log pi_ref(a_t), the frozen reference (step 4)
    values: torch.Tensor  # V(s_t), the critic's at sampling time (step 4; 0 without a critic)
    kl: torch.Tensor  # KL_t, the per-token estimate of KL(pi_old || pi_ref) (step 5)
    advantages: torch.Tensor  # A_t (step 6)
    returns: torch.Tensor  # the critic's targets (step 6; 0 without a critic)


@dataclass(frozen=True)
class Forwards:
    """Step 4: the same tokens through the training forwards, [N, T] each."""
    train: torch.Tensor  # log pi(a_t) by a training forward of the policy
    reference: torch.Tensor | None  # log pi_ref(a_t); None when the run loads no reference
    values: torch.Tensor  # V(s_t) (0 without a critic)


# ==================================================================================================
# Step 1: the questions, and which prompts each rank takes at each step
# ==================================================================================================
@dataclass(frozen=True)
class Questions:
    """The training set: data.py records and their prompts, as the policy reads them."""
    records: list[dict]
    texts: list[str]
    longest: int  # tokens of the longest prompt (what the sampler's cache is sized for)


@dataclass(frozen=True)
class Batching:
    """How a step draws its prompts and splits its samples (--rollout_batch_size etc.)."""
    prompts: int  # a step's prompts over all ranks
    samples: int  # responses per prompt
    minibatch: int  # samples of one optimizer step, over all ranks
    seed: int


@dataclass(frozen=True)
class StepPrompts:
    """This rank's prompts of one step, in its row order."""
    positions: list[int]  # each prompt's position in the step's global batch (seeds its noise)
    records: list[dict]
    texts: list[str]


def training_prompts(cfg, tokenizer, log, suffix: str = ""):
    """The training questions (--train_data) and their prompts (each + suffix), both trainers';
    prompts longer than --max_prompt_tokens are left out, and counted in the run's log. Returns the
    records and prompts kept, and their token ids and attention mask [n, P], left padded."""
    records = sources.load_dataset(cfg.train_data, cfg.data_dir or None)
    if cfg.shuffle_options:
        records = [data.shuffle_options(r, cfg.seed + i) for i, r in enumerate(records)]
    prompts = [data.build_prompt(r, cfg.prompt_style, tokenizer) + suffix for r in records]
    ids, attn, kept, skipped = data.tokenize_prompts(tokenizer, prompts, cfg.max_prompt_tokens)
    if skipped:
        log(f"left out {len(skipped)} of {len(records)} prompts longer than --max_prompt_tokens "
            f"{cfg.max_prompt_tokens}")
    if not kept:
        raise SystemExit(f"no prompt of {cfg.train_data} fits in --max_prompt_tokens "
                         f"{cfg.max_prompt_tokens}")
    return [records[i] for i in kept], [prompts[i] for i in kept], ids, attn


def load_questions(cfg, tokenizer, log) -> Questions:
    records, texts, ids, _ = training_prompts(cfg, tokenizer, log, suffix=cfg.prefill)
    return Questions(records, texts, ids.shape[1])


def step_prompts(questions: Questions, batching: Batching, step: int, rank: int, world: int):
    picked = step_prompt_indices(batching, len(questions.records), step, rank, world)
    return StepPrompts([p for p, _ in picked], [questions.records[i] for _, i in picked],
                       [questions.texts[i] for _, i in picked])


def step_prompt_indices(batching: Batching, n_questions: int, step: int, rank: int, world: int):
    """(position, question index) of this rank's prompts at `step` (1-based), in its row order.

    The global batch of step s is the next `prompts` questions of a seeded pass over the data (a
    new permutation each epoch). Minibatch k of the update is a fixed block of those prompts, and
    rank r holds the r-th slice of every block: so a minibatch holds the same samples whatever the
    number of ranks.
    """
    batch_size = batching.prompts
    per_minibatch = batching.minibatch // batching.samples  # prompts
    start = (step - 1) * batch_size
    stream = []
    epoch = start // n_questions
    while len(stream) < (start % n_questions) + batch_size:
        stream += data.epoch_order(n_questions, batching.seed, epoch)
        epoch += 1
    batch = stream[start % n_questions:start % n_questions + batch_size]  # this step's questions
    per_rank = per_minibatch // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    return [(k + j, batch[k + j]) for k in range(0, batch_size, per_minibatch) for j in mine]


def refill_prompts(questions: Questions, batching: Batching, step: int, round_: int, rank: int,
                   world: int) -> StepPrompts:
    """This rank's prompts of sampling round `round_` (>= 1) of a step (DAPO's dynamic sampling):
    its share of a fresh seeded draw of `prompts` questions (a function of seed, step and round,
    so a resumed run draws the same); positions after the step's own batch, so each row keeps its
    own noise."""
    per_rank = batching.prompts // world
    # epoch -1: a draw of its own, never one of the passes over the data (epochs 0, 1, ...)
    seed = hash((batching.seed, step, round_)) % 2 ** 31
    order = data.epoch_order(len(questions.records), seed, -1)
    first = rank * per_rank
    picked = [order[(first + i) % len(order)] for i in range(per_rank)]
    positions = [round_ * batching.prompts + first + i for i in range(per_rank)]
    return StepPrompts(positions, [questions.records[i] for i in picked],
                       [questions.texts[i] for i in picked])


# ==================================================================================================
# Step 2: sample
# ==================================================================================================
# The verifier refuses any text after </answer>, so nothing sampled after it can help.
STOP_STRINGS = ("</answer>",)


@dataclass(frozen=True)
class Sampling:
    """How step 2 samples (the flags it reads)."""
    n: int  # responses per prompt
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_at_answer: bool  # end at </answer>; else at EOS or the length limit (as the study)
    rows_per_call: int  # rows per generate call (the KV cache's memory)
    seed: int  # each row's noise comes from (seed, step, prompt position, sample)

    def stop_strings(self):
        return list(STOP_STRINGS) if self.stop_at_answer else None


def sample_responses(sampler, tokenizer, prompts: StepPrompts, sampling: Sampling,
                     step: int) -> rollout.Rollout:
    """n responses per prompt (adjacent), in calls of rows_per_call rows; each row's noise its
    own, so it samples the same tokens whatever call, batch or rank it lands in. Returns the
    Rollout of all N rows: sequences [N, P+T], response_mask [N, T], logprobs [N, T]."""
    n = sampling.n
    ids, attn, _, _ = data.tokenize_prompts(tokenizer, prompts.texts, None)  # [b, P] left padded
    ids = ids.repeat_interleave(n, 0).to(sampler.device)  # [N, P] the samples of a prompt adjacent
    attn = attn.repeat_interleave(n, 0).to(sampler.device)  # [N, P]
    uniforms = row_uniforms(sampling, step, prompts.positions).to(sampler.device)  # [N, max_new]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else []
    calls = []
    for s in range(0, len(ids), sampling.rows_per_call):
        rows = slice(s, s + sampling.rows_per_call)
        calls.append(sampler.generate(ids[rows], attn[rows], sampling.max_new_tokens,
                                      temperature=sampling.temperature, top_p=sampling.top_p,
                                      top_k=sampling.top_k, eos_token_id=eos,
                                      stop_strings=sampling.stop_strings(), tokenizer=tokenizer,
                                      pad_token_id=tokenizer.pad_token_id, uniforms=uniforms[rows]))
    P = ids.shape[1]
    T = max(c.response_mask.shape[1] for c in calls)

    def cat(tensors, fill):  # calls' [rows, T_call] into [N, T], right padded with `fill`
        return torch.cat([F.pad(x, (0, T - x.shape[1]), value=fill) for x in tensors])

    responses = cat([c.sequences[:, P:] for c in calls], tokenizer.pad_token_id)  # [N, T]
    response_mask = cat([c.response_mask for c in calls], 0)  # [N, T]
    return rollout.Rollout(sequences=torch.cat([ids, responses], 1),
                           attention_mask=torch.cat([attn, response_mask], 1),
                           response_mask=response_mask,
                           logprobs=cat([c.logprobs for c in calls], 0.0).float(),
                           finish_reason=[f for c in calls for f in c.finish_reason])


def row_uniforms(sampling: Sampling, step: int, positions: list[int]) -> torch.Tensor:
    """Sampling noise [rows, max_new_tokens]: row (prompt position p, sample j) of step s draws
    from its own generator, so what it samples does not depend on its rank, batch or call."""
    out = torch.empty(len(positions) * sampling.n, sampling.max_new_tokens)
    for i, p in enumerate(positions):
        for j in range(sampling.n):
            g = torch.Generator().manual_seed(hash((sampling.seed, step, p, j)) % (2 ** 63))
            out[i * sampling.n + j] = torch.rand(sampling.max_new_tokens, generator=g)
    return out


# ==================================================================================================
# Step 3: score
# ==================================================================================================
@dataclass(frozen=True)
class Scoring:
    """What the verifier reads besides the response (the flags it reads)."""
    rules: verifier.Rules  # the reward: -1 / 0 / +1 and the format's rules
    prompt_style: str  # data.build_prompt's; its prefilled text (<think>) is the response's start
    prefill: str  # --prefill: forced at the start of every response, after the style's own


def score_responses(rolled: rollout.Rollout, prompts: StepPrompts, sampling: Sampling,
                    scoring: Scoring, tokenizer, step: int) -> Samples:
    """The verifier's reward of each response, and one record a sample for rollouts.jsonl.

    The verifier sees the prefilled text plus what the model wrote (EOS excluded). A non-finite
    reward (from a custom reward, say) stays in the records, where train_ppo.skip_reason finds it,
    and counts as 0 in the scores, so that the step's metrics stay readable."""
    n, mask = sampling.n, rolled.response_mask.float()
    P = rolled.sequences.shape[1] - mask.shape[1]
    prefill = data.PROMPT_PREFILL.get(scoring.prompt_style, "") + scoring.prefill
    lengths = mask.sum(1).long().tolist()
    records = []
    for i, length in enumerate(lengths):
        record = prompts.records[i // n]
        tokens = rolled.sequences[i, P:P + length]
        # the token that completed "</answer>" may carry more text ("></" is one SmolLM2 token)
        text = rollout.cut_after_stop(tokenizer.decode(tokens, skip_special_tokens=True),
                                      sampling.stop_strings())
        verdict = verifier.verify(prefill + text, record["answer"], record["options"],
                                  scoring.rules)
        records.append({"step": step, "row": prompts.positions[i // n] * n + i % n,
                        "id": record["id"], "prompt": prompts.texts[i // n],
                        "response": scoring.prefill + text, "gold": record["answer"],
                        "options": record["options"], "prompt_style": scoring.prompt_style,
                        "response_tokens": length, "finish_reason": rolled.finish_reason[i],
                        **{k: verdict[k] for k in VERDICT_KEYS}})
    scores = torch.tensor([r["reward"] for r in records], dtype=torch.float32, device=mask.device)
    return Samples(rolled.sequences, rolled.attention_mask, mask, rolled.logprobs * mask,
                   torch.nan_to_num(scores, nan=0.0), records)


VERDICT_KEYS = ("reward", "pred", "correct", "format_ok", "answer_in_think",
                "reasoning_outside_think", "template_copy", "think_chars", "answer_chars")


def keep_varied_groups(samples: Samples, n: int, max_rounds: int, another_round,
                       pad_id: int) -> tuple[Samples, dict]:
    """DAPO's dynamic sampling (Yu et al. 2025), after step 3: a group whose n samples all scored
    alike has no group advantage, so it makes way for the groups of further prompts, sampled a
    round at a time (`another_round(r)`: round r's prompts sampled and scored, as steps 2-3 did the
    step's own) until every rank holds its share of varied groups, or max_rounds rounds ran; groups
    that scored alike then fill what is missing, and the metrics say how many. Every rank samples
    as many rounds as the rank that needs the most, so that the collectives match. Returns the
    samples the update takes and the sampling's metrics."""
    quota = len(samples.records) // n  # groups this rank hands to the update
    first_varied = ppo.varied_groups(samples.scores, n)  # [quota]
    pieces = [samples]
    while len(pieces) < max_rounds:
        varied = sum(int(ppo.varied_groups(piece.scores, n).sum()) for piece in pieces)
        if distributed.all_reduce_dict({"short": float(varied < quota)})["short"] == 0:
            break
        pieces.append(another_round(len(pieces)))
    every = concat_samples(pieces, pad_id)
    varied = ppo.varied_groups(every.scores, n)  # [groups]
    chosen = torch.cat([varied.nonzero()[:, 0], (~varied).nonzero()[:, 0]])[:quota].tolist()
    rows = [g * n + j for g in sorted(chosen) for j in range(n)]
    counts = distributed.all_reduce_dict({"first": float(first_varied.sum()),
                                          "alike": float(sum(not varied[g] for g in chosen)),
                                          "groups": float(quota)})
    stats = {"sample_rounds": len(pieces), "varied_group_rate": counts["first"] / counts["groups"],
             "alike_groups_kept": int(counts["alike"])}
    return select_rows(every, rows), stats


def concat_samples(pieces: list[Samples], pad_id: int) -> Samples:
    """Rows of several Samples as one: prompts left padded and responses right padded to the
    widest."""
    P = max(s.sequences.shape[1] - s.mask.shape[1] for s in pieces)
    T = max(s.mask.shape[1] for s in pieces)

    def widen(x, p, fill):  # [rows, p + t] -> [rows, P + T]: prompt left, response right padded
        prompt = F.pad(x[:, :p], (P - p, 0), value=fill)
        response = F.pad(x[:, p:], (0, T - (x.shape[1] - p)), value=fill)
        return torch.cat([prompt, response], 1)

    def right(x, fill):  # [rows, t] -> [rows, T]
        return F.pad(x, (0, T - x.shape[1]), value=fill)

    widths = [s.sequences.shape[1] - s.mask.shape[1] for s in pieces]
    return Samples(
        sequences=torch.cat([widen(s.sequences, p, pad_id) for s, p in zip(pieces, widths)]),
        attention_mask=torch.cat([widen(s.attention_mask, p, 0) for s, p in zip(pieces, widths)]),
        mask=torch.cat([right(s.mask, 0) for s in pieces]),
        sampler_logprobs=torch.cat([right(s.sampler_logprobs, 0.0) for s in pieces]),
        scores=torch.cat([s.scores for s in pieces]),
        records=[r for s in pieces for r in s.records])


def select_rows(samples: Samples, rows: list[int]) -> Samples:
    """These rows of the samples only, in this order."""
    index = torch.tensor(rows, dtype=torch.long, device=samples.mask.device)
    return Samples(sequences=samples.sequences[index],
                   attention_mask=samples.attention_mask[index], mask=samples.mask[index],
                   sampler_logprobs=samples.sampler_logprobs[index], scores=samples.scores[index],
                   records=[samples.records[r] for r in rows])


# ==================================================================================================
# Step 4: the policy's, the reference's and the critic's view of the samples
# ==================================================================================================
@dataclass(frozen=True)
class Forwarding:
    """How step 4 runs its forwards (the flags it reads)."""
    temperature: float  # log-probs of the tempered distribution the sampler drew from
    packed: bool  # each prompt once for its samples (model.pack); else padded rows
    token_budget: int  # tokens per packed forward (0: all at once)
    rows: int  # rows per padded forward
    dtype: str  # the compute dtype: bf16 autocast over fp32 weights in one process


def reference_and_critic(models, samples: Samples, forwarding: Forwarding, timer) -> Forwards:
    """Step 4: log pi of the sampled tokens by a training forward of the policy [N, T] (the old
    log-probs where the sampler's differ: bf16, --recompute_logprobs; and the sampler / trainer gap
    every step), log pi_ref [N, T] (None when the run has no reference), and V(s_t) [N, T] (0
    without a critic)."""
    batches = no_grad_batches(samples, forwarding)  # built once, run through each model
    mask = samples.mask
    with timer("train_logprobs"):
        train = forward_in_chunks(models.policy, batches, mask, forwarding)
    with timer("reference"):
        reference = None
        if models.reference is not None:
            reference = forward_in_chunks(models.reference, batches, mask, forwarding) * mask
    with timer("critic"):
        values = torch.zeros_like(mask)  # [N, T]
        if models.critic is not None:
            values = forward_in_chunks(models.critic, batches, mask, forwarding, critic=True)
    return Forwards(train * mask, reference, values * mask)


@torch.no_grad()
def forward_in_chunks(model, batches, mask, forwarding: Forwarding, critic=False):
    """Log-probs (or, for the critic, values) over no_grad_batches, as [N, T] (0 past each row's
    response)."""
    out = torch.zeros_like(mask)  # [N, T]
    with distributed.autocast(forwarding.dtype, mask.device):
        for rows, batch in batches:
            if critic:
                y = response_values(model, batch).float()  # [b, T']
            else:
                y = response_logprobs(model, batch, forwarding.temperature).float()  # [b, T']
            out[rows, :y.shape[1]] += y
    return out


def no_grad_batches(samples: Samples, forwarding: Forwarding) -> list:
    """The batches of the no-grad forwards, as (rows, batch) pairs: packed trees of at most
    token_budget tokens, each prompt once for its samples (rows: all of them, as a packed batch
    unpacks to [N, T]); or padded rows, `forwarding.rows` at a time."""
    seq, attn, mask = samples.sequences, samples.attention_mask, samples.mask
    if forwarding.packed:
        return [(slice(None), trees) for trees in pack(seq, attn, mask, forwarding.token_budget)]
    size = forwarding.rows
    return [(slice(s, s + size), response_batch(seq[s:s + size], attn[s:s + size],
                                                mask[s:s + size], packed=False))
            for s in range(0, len(seq), size)]
