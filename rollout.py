"""Sampling responses by hand over a KV cache: the rollout half of RLVR.

`generate(model, input_ids, attention_mask, max_new_tokens, ...)` samples one response per
left-padded prompt and returns a `Rollout`: the sequences, a response mask, the log-probability of
every sampled token and why each row stopped. PPO reuses those log-probs as the old policy's, so
they must be what one full forward pass over the final sequences gives (fp32: within 1e-5;
tests/test_rollout.py checks it).

The algorithm, as `generate` reads:
  1. Prefill. One forward pass over the left-padded prompts writes every prompt token's key and
     value into a KV cache preallocated for the longest sequence, [B, kv_heads, P + max_new_tokens,
     head_dim] per layer, and gives the logits of each row's first response token. Position ids
     count real tokens only (cumsum of the mask, minus 1), as in every training forward.
  2. Sample one token per row: temperature, then top-k, then top-p, by inverse CDF from one uniform
     number per row and step, so that a row's sample depends on its own noise only.
  3. A row that ends (EOS, a stop string such as "</answer>", or max_new_tokens) leaves the batch:
     the live rows move up in the cache, and every later step computes live rows only. The token
     that completes a stop string is kept and may carry more text ("></"): `cut_after_stop` before
     scoring.
  4. Decode. One forward pass of the new tokens, one per live row: each layer writes its key and
     value into cache slot P + t, in place (nothing is reallocated or grown), and attends to the
     row's slots. Then back to 2.

The decoder is written out for the Llama family (llama, mistral, qwen2, qwen3: RMSNorm, RoPE,
grouped-query attention, SwiGLU, q/k/v biases, tied embeddings). It calls the model's SUBMODULES
(embed_tokens, each layer's q_proj, input_layernorm, mlp, ..., norm, lm_head), never the top-level
forward, so it owns the cache; it also runs on an FSDP2 model whose parameters were gathered with
`unshard()` (the submodules then hold plain tensors). Other architectures raise NotImplementedError.

The returned logprobs are log_softmax(logits / temperature) at the sampled token
(log_softmax(logits) when greedy), i.e. under the UNTRUNCATED tempered distribution, which is what
the PPO trainer computes. Top-k / top-p truncation is not reflected in them.

This file is the teaching core. engine.py samples the same tokens with the same log-probs, faster
(no padding computed in the prefill, CPU matmul layouts, per-row attention, ...);
tests/test_engine.py keeps the two equal. `python rollout.py --help`: a demo that samples and scores
MedQA answers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Rollout:
    sequences: torch.Tensor  # [B, P+T] long: left-padded prompt, then the response right-padded
    attention_mask: torch.Tensor  # [B, P+T] long: 1 on the real prompt and response tokens
    response_mask: torch.Tensor  # [B, T] long: 1 up to and including the token that ended the row
    logprobs: torch.Tensor  # [B, T] float32: log-prob of each sampled token (0 where the mask is 0)
    finish_reason: list[str]  # per row: "eos" | "stop" | "length"


@dataclass
class KVCache:
    """Every layer's keys and values for B rows of up to max_len tokens, preallocated once.

    The live batch is always the first b rows: when rows end, the live ones move up (`keep_rows`).
    """
    keys: list[torch.Tensor]  # per layer [B, kv_heads, max_len, head_dim]
    values: list[torch.Tensor]  # per layer [B, kv_heads, max_len, head_dim]

    @staticmethod
    def allocate(model, batch: int, max_len: int, dtype=None) -> KVCache:
        """dtype: the compute dtype the keys and values come out in (default: autocast's when it
        is on, else the weights')"""
        config = model.config
        head_dim = getattr(config, "head_dim", None)
        head_dim = head_dim or config.hidden_size // config.num_attention_heads
        weight = model.model.embed_tokens.weight
        if dtype is None and torch.is_autocast_enabled(weight.device.type):
            dtype = torch.get_autocast_dtype(weight.device.type)  # k_proj's output under autocast

        def empty():
            return torch.empty(batch, config.num_key_value_heads, max_len, head_dim,
                               dtype=dtype or weight.dtype, device=weight.device)

        layers = range(config.num_hidden_layers)
        return KVCache([empty() for _ in layers], [empty() for _ in layers])

    def keep_rows(self, live: torch.Tensor, filled: int) -> None:
        """Move the rows `live` [b'] (slots of the live batch, in order) to the first b' slots; only
        the `filled` slots written so far are copied."""
        n = len(live)
        for k, v in zip(self.keys, self.values):
            k[:n, :, :filled] = k[live, :, :filled]
            v[:n, :, :filled] = v[live, :, :filled]


# --------------------------------------------------------------------------------------------------
# generate: the four steps of the module docstring
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
             stop_strings: list[str] | str | None = None, tokenizer=None,
             generator: torch.Generator | None = None, pad_token_id: int | None = None,
             uniforms: torch.Tensor | None = None) -> Rollout:
    """Sample a response for each left-padded prompt. input_ids, attention_mask: [B, P].

    eos_token_id: an int or a list; None takes model.generation_config.eos_token_id, [] disables
    EOS. stop_strings: end a row once its generated text contains one (needs `tokenizer`); the token
    that completed it is kept. pad_token_id: fills the response after a row ends (default: the
    tokenizer's, then the config's, then 0). generator: a seeded torch.Generator for reproducible
    samples. uniforms [B, max_new_tokens]: the sampling noise itself, in place of `generator` (the
    trainer draws each row's from its own seed, so a row samples the same tokens whatever batch it
    lands in). Returns a Rollout with T = the longest response (<= max_new_tokens).
    """
    B, P = input_ids.shape
    check_supported(model, P + max_new_tokens)
    stops = StopRule(model, eos_token_id, stop_strings, tokenizer, input_ids.device)
    pad_token_id = pad_id(model, tokenizer, pad_token_id)
    out = Outputs.empty(B, max_new_tokens, pad_token_id, input_ids.device)

    # 1. Prefill: one forward over the prompts, causal over each row's real tokens (a padding token
    #    attends to itself only: a query with no key at all would give NaN).
    cache = KVCache.allocate(model, B, P + max_new_tokens)
    real = attention_mask.bool()  # [B, P]
    causal = torch.ones(P, P, dtype=torch.bool, device=real.device).tril()  # [P, P]
    itself = torch.eye(P, dtype=torch.bool, device=real.device)  # [P, P]
    prefill_mask = (causal & real[:, None, :]) | itself  # [B, P, P]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P]
    logits = decoder_forward(model, input_ids, positions, cache, 0, prefill_mask[:, None])  # [B, V]

    # At decode time a row attends to its real prompt tokens and to every token generated so far
    # (the live rows advance together: slot P + t is filled for all of them at step t).
    n_real = attention_mask.long().sum(-1)  # [B] real prompt tokens per row
    slots = torch.arange(P + max_new_tokens, device=real.device)  # [S]
    may_attend = slots[None, :] >= (P - n_real)[:, None]  # [B, S]
    rows = torch.arange(B, device=real.device)  # [b] the original row held by each live slot
    next_position = n_real.clone()  # [b] position id of each live row's next token
    for t in range(max_new_tokens):
        # 2. Sample one token per live row, from that row's own uniform of step t.
        u = step_uniforms(t, rows, B, temperature, uniforms, generator)  # [b] or None (greedy)
        tokens, logps = sample_tokens(logits, temperature, top_k, top_p, u)  # [b], [b]
        out.record(t, rows, tokens, logps)

        # 3. Rows that end with this token leave the batch (cache included).
        ended = stops.ended(out, t, rows, tokens)  # [b] bool
        if t == max_new_tokens - 1 or bool(ended.all()):
            break
        if ended.any():
            live = (~ended).nonzero()[:, 0]  # [b'] slots of the rows that go on
            cache.keep_rows(live, P + t)
            rows, tokens, next_position = rows[live], tokens[live], next_position[live]
            may_attend = may_attend[live]

        # 4. Decode: the new token of every live row goes to cache slot P + t.
        b = len(rows)
        live_cache = KVCache([k[:b] for k in cache.keys], [v[:b] for v in cache.values])
        mask = may_attend[:, None, None, :P + t + 1]  # [b, 1, 1, P+t+1]
        logits = decoder_forward(model, tokens[:, None], next_position[:, None], live_cache, P + t,
                                 mask)  # [b, V]
        next_position = next_position + 1
    return out.rollout(input_ids, attention_mask)


# --------------------------------------------------------------------------------------------------
# The decoder, by hand, over the KV cache
# --------------------------------------------------------------------------------------------------
def decoder_forward(model, input_ids, position_ids, cache: KVCache, start: int,
                    mask) -> torch.Tensor:
    """Run input_ids [b, s] (position ids [b, s]) through the model; their keys and values go to
    cache slots start .. start+s-1. mask: [b, 1, s, start+s] bool, True = may attend. Returns
    float32 logits of the LAST position only: [b, V] (all that sampling needs)."""
    backbone = model.model
    x = backbone.embed_tokens(input_ids)  # [b, s, D]
    cos, sin = backbone.rotary_emb(x, position_ids)  # [b, s, d] each: the model's own RoPE
    cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, d] broadcast over heads
    for layer, keys, values in zip(backbone.layers, cache.keys, cache.values):
        x = decoder_layer(layer, x, cos, sin, keys, values, start, mask)
    return model.lm_head(backbone.norm(x[:, -1:]))[:, 0].float()  # [b, V]


def decoder_layer(layer, x, cos, sin, keys, values, start: int, mask) -> torch.Tensor:
    """One pre-norm decoder layer: x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x)).

    x: [b, s, D]; keys, values: this layer's cache [b, KV, S_max, d], written at slots
    start..start+s-1.
    """
    attn, mlp = layer.self_attn, layer.mlp
    b, s, _ = x.shape
    d = keys.shape[-1]
    h = layer.input_layernorm(x)  # [b, s, D]
    q = attn.q_proj(h).view(b, s, -1, d).transpose(1, 2)  # [b, H, s, d] (biases are in the Linear)
    k = attn.k_proj(h).view(b, s, -1, d).transpose(1, 2)  # [b, KV, s, d]
    v = attn.v_proj(h).view(b, s, -1, d).transpose(1, 2)  # [b, KV, s, d]
    if hasattr(attn, "q_norm"):  # qwen3: RMSNorm per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    end = start + s
    keys[:, :, start:end] = k  # written in place: no torch.cat, nothing reallocated
    values[:, :, start:end] = v
    # grouped-query attention over the filled slots: each KV head serves H / KV query heads
    o = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                       scale=attn.scaling, enable_gqa=True)  # [b, H, s, d]
    x = x + attn.o_proj(o.transpose(1, 2).reshape(b, s, -1))  # [b, s, D]
    h = layer.post_attention_layernorm(x)  # [b, s, D]
    return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))  # SwiGLU


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: x * cos + rotate_half(x) * sin.
    x: [b, h, s, d]; cos, sin: [b, 1, s, d]."""
    x1, x2 = x.chunk(2, dim=-1)  # [b, h, s, d/2] each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def check_supported(model, total_len: int) -> None:
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"rollout.generate writes the decoder by hand for {SUPPORTED_MODEL_TYPES}; got "
            f"model_type={config.model_type!r}. Add its layer to rollout.decoder_layer (and "
            f"engine.py's), or sample with model.generate.")
    if type(model.model.embed_tokens.weight).__name__ == "DTensor":
        raise RuntimeError("the model's parameters are FSDP2 shards: gather them first (unshard() "
                           "every FSDP module, e.g. with distributed.gathered(model)), then call "
                           "generate")
    window = getattr(config, "sliding_window", None)
    if window and total_len > window:
        raise NotImplementedError(f"sliding-window attention (window {window} < {total_len} "
                                  f"tokens) "
                                  f"is not implemented")


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. logits: [b, V] float32; uniforms: [b] in [0, 1) (None when greedy).

    Returns tokens [b] and their logprobs [b] under log_softmax(logits / temperature) (untruncated).
    Sampling is by inverse CDF with one uniform per row, so a row's sample depends only on its own
    uniform: removing finished rows from the batch cannot change the other rows' samples.
    """
    if temperature == 0:
        tokens = logits.argmax(-1)  # [b] greedy
        logp = logits.log_softmax(-1)  # [b, V]
    else:
        scaled = logits / temperature  # [b, V]  softmax(z / T): the tempered distribution
        logp = scaled.log_softmax(-1)  # [b, V]
        probs = filter_logits(scaled, top_k, top_p).softmax(-1)  # [b, V] truncated, renormalised
        cdf = probs.cumsum(-1)  # [b, V]
        u = uniforms.to(cdf.dtype) * cdf[:, -1]  # [b] scaled by the total: no rounding overshoot
        # the first token whose CDF exceeds u; right=True never picks a zero-probability token
        tokens = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]  # [b]
        tokens = tokens.clamp_(max=logits.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit that top-k, then top-p (nucleus) sampling would drop. logits [b, V].

    top-k keeps the k largest logits (ties with the k-th are kept too). top-p keeps the smallest set
    of most likely tokens whose total probability (renormalised after top-k) is >= top_p: token i
    stays when the mass of the tokens strictly before it in sorted order is < top_p, so the top
    token stays.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1] the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [b, V]
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [b, V], [b, V]
        probs = sorted_logits.softmax(-1)  # [b, V]
        mass_before = probs.cumsum(-1) - probs  # [b, V] exclusive cumulative sum
        drop_sorted = mass_before >= top_p  # [b, V] False for the top token whenever top_p > 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [b, V] vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def step_uniforms(t: int, rows: torch.Tensor, batch: int, temperature: float,
                  uniforms: torch.Tensor | None, generator: torch.Generator | None):
    """The uniforms of step t for the live rows [b] (None when greedy). Every step draws one number
    per ORIGINAL row, live or not, so a row's sample does not depend on which rows are live."""
    if temperature == 0:
        return None
    if uniforms is not None:
        return uniforms[rows, t]  # [b]
    # drawn where the generator lives (a CPU generator samples the same noise for a GPU model)
    at = generator.device if generator is not None else rows.device
    return torch.rand(batch, generator=generator, device=at)[rows.to(at)].to(rows.device)  # [b]


# --------------------------------------------------------------------------------------------------
# Stopping, and what generate returns
# --------------------------------------------------------------------------------------------------
@dataclass
class Outputs:
    """The tokens, log-probs, lengths and finish reasons of every ORIGINAL row, step by step."""
    tokens: torch.Tensor  # [B, T_max] long, pad_token_id where nothing was sampled
    logprobs: torch.Tensor  # [B, T_max] float32
    lengths: torch.Tensor  # [B] long (on the CPU): response length of each row
    finish_reason: list[str]  # [B]
    pad_token_id: int

    @staticmethod
    def empty(batch: int, max_new_tokens: int, pad_token_id: int, device) -> Outputs:
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        return Outputs(tokens,
                       torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device),
                       torch.full((batch,), max_new_tokens, dtype=torch.long), ["length"] * batch,
                       pad_token_id)

    def record(self, t: int, rows: torch.Tensor, tokens: torch.Tensor, logps: torch.Tensor) -> None:
        self.tokens[rows, t] = tokens
        self.logprobs[rows, t] = logps

    def rollout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Rollout:
        T = int(self.lengths.max())  # the longest response
        response_mask = (torch.arange(T)[None, :] < self.lengths[:, None]).long()  # [B, T]
        response_mask = response_mask.to(input_ids.device)
        tokens = self.tokens[:, :T].masked_fill(response_mask == 0, self.pad_token_id)  # [B, T]
        return Rollout(sequences=torch.cat([input_ids, tokens], dim=1),
                       attention_mask=torch.cat([attention_mask.long(), response_mask], dim=1),
                       response_mask=response_mask, logprobs=self.logprobs[:, :T] * response_mask,
                       finish_reason=self.finish_reason)


class StopRule:
    """When a row ends: its token is an EOS, or its generated text now contains a stop string."""

    def __init__(self, model, eos_token_id, stop_strings, tokenizer, device):
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.eos_ids = torch.tensor(list(eos_token_id or []), dtype=torch.long, device=device)
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated tail")
        self.tokenizer = tokenizer
        # tokens of tail to decode: a stop string is at most this many tokens long
        self.window = max((len(s) for s in self.stop_strings or []), default=0) + 2

    def ended(self, out: Outputs, t: int, rows, tokens, live=None) -> torch.Tensor:
        """[b] bool: the live rows that end with this step's tokens; their lengths and finish
        reasons go into `out`. `live` [b]: which slots still hold a live row (default: all)."""
        live = torch.ones_like(tokens, dtype=torch.bool) if live is None else live
        is_eos = torch.isin(tokens, self.eos_ids) & live  # [b]
        is_stop = torch.zeros_like(is_eos)  # [b]
        if self.stop_strings:
            check = (live & ~is_eos).nonzero()[:, 0]  # [n] slots to check
            tails = out.tokens[rows[check], max(0, t + 1 - self.window):t + 1].tolist()
            hits = stop_string_hits(self.tokenizer, tails, self.stop_strings)
            is_stop[check[torch.tensor(hits, dtype=torch.bool, device=tokens.device)]] = True
        ended = is_eos | is_stop  # [b]
        for slot in ended.nonzero()[:, 0].tolist():
            row = rows[slot].item()
            out.lengths[row] = t + 1
            out.finish_reason[row] = "eos" if is_eos[slot] else "stop"
        return ended

    def hits(self, windows: list[list[int]]) -> list[bool]:
        """Does each row's tail of tokens (newest last) hold a stop string? As `ended` checks."""
        return stop_string_hits(self.tokenizer, windows, self.stop_strings)


def stop_string_hits(tokenizer, windows: list[list[int]], stop_strings: list[str]) -> list[bool]:
    """Does the decoded tail of each row contain a stop string? windows: per row, its last tokens.

    A stop string can end in the middle of a token (say "r>\\n" completes "</answer>"), so we look
    at text, not token ids. The window is only as long as the longest stop string (plus slack) in
    tokens: a few characters to decode per row per step. The string cannot have ended before the
    newest token (the row would have stopped then), so finding it anywhere in the window means the
    newest token completed it.
    """
    texts = tokenizer.batch_decode(windows, skip_special_tokens=False)
    return [any(s in text for s in stop_strings) for text in texts]


def cut_after_stop(text: str, stop_strings: list[str] | str | None) -> str:
    """The decoded response up to and including the first stop string; the rest is dropped.

    The token that completed a stop string can carry more text: SmolLM2 has tokens "></", "><",
    ">.", so a response can decode to "...</answer><". That tail is an artifact of tokenization
    (generation ended at the stop string), so cut it before scoring: the verifier refuses text after
    </answer>.
    """
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


def pad_id(model, tokenizer, pad_token_id: int | None) -> int:
    """The pad id: the one given, else the tokenizer's, else the model config's, else 0."""
    if pad_token_id is not None:
        return pad_token_id
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return tokenizer.pad_token_id
    return model.config.pad_token_id or 0


# --------------------------------------------------------------------------------------------------
# Demo: sample answers to a few MedQA questions and score them (python rollout.py --help)
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description="Sample answers to MedQA questions with "
                                "rollout.generate and score them with the verifier.")
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m, tiny-qwen2, tiny-llama or a Hugging Face folder")
    p.add_argument("--data", default="medqa_dev", help="a sources.py dataset name or a file")
    p.add_argument("--data_dir", default=None,
                   help="default: $MEDRLVR_DATA, else ../shared/data beside the repository")
    p.add_argument("--n", type=int, default=4, help="questions")
    p.add_argument("--samples", type=int, default=1, help="responses per question")
    p.add_argument("--style", default="r1_chat", help="data.py prompt style")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    from data import PROMPT_PREFILL, build_prompt, tokenize_prompts
    from model import load_policy
    from sources import load_dataset
    from verifier import verify

    model, tokenizer = load_policy(args.model)
    shared = Path(__file__).resolve().parent.parent / "shared" / "data"
    data_dir = args.data_dir or os.environ.get("MEDRLVR_DATA")
    if data_dir is None and shared.is_dir():
        data_dir = str(shared)
    records = [r for r in load_dataset(args.data, data_dir)[:args.n] for _ in range(args.samples)]
    prompts = [build_prompt(r, args.style, tokenizer) for r in records]
    ids, mask, _, _ = tokenize_prompts(tokenizer, prompts, None)
    start = time.perf_counter()
    out = generate(model, ids, mask, args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, stop_strings=["</answer>"],
                   tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id,
                   generator=torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - start
    P = ids.shape[1]
    rewards = []
    for i, record in enumerate(records):
        length = int(out.response_mask[i].sum())
        text = tokenizer.decode(out.sequences[i, P:P + length], skip_special_tokens=True)
        response = PROMPT_PREFILL[args.style] + cut_after_stop(text, "</answer>")
        result = verify(response, record["answer"], record["options"])  # it sees the prefill too
        rewards.append(result["reward"])
        print(f"=== {record['id']}  gold {record['answer']}  pred {result['pred']}  reward "
              f"{result['reward']:+.0f}  ({length} tokens, {out.finish_reason[i]})\n{response}")
    print(f"\n{int(out.response_mask.sum())} tokens in {seconds:.1f} s, "
          f"mean reward {sum(rewards) / len(rewards):+.2f}")


if __name__ == "__main__":
    main()
