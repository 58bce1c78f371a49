"""Batched sampling with a hand-written KV cache: the rollout half of RLVR.

`generate(model, input_ids, attention_mask, max_new_tokens, ...)` samples one response per (left padded)
prompt and returns a `Rollout`: the sequences, a response mask, the log-probability of every sampled token
and why each row stopped. PPO reuses those log-probs as `old_logprobs`, so they must be what one full
forward pass over the final sequences gives (fp32: within 1e-5; tests/test_rollout.py checks it).

How it works, and why it is faster than transformers' `generate` on RL workloads:
1. Prefill: the prompts' real tokens, grouped by length (identical prompts run once), so no padding is
   computed; position ids = cumsum(mask) - 1 (model.py's `position_ids_from_mask`); each row's tokens land
   right-aligned in the cache (slots P-n .. P-1), its padding slots are masked out afterwards. On a GPU,
   where kernel launches cost more than FLOPs, one padded forward instead (same cache layout).
2. Then one token per step, with a KV cache PREALLOCATED at [B, kv_heads, P + max_new_tokens, head_dim]
   per layer and written in place. transformers' DynamicCache grows every layer's K and V with torch.cat at
   every step, copying the whole cache (24% of a decode step on SmolLM2 in the issue's profile).
   Attention reads only the filled part of the cache, from the first slot any active row needs; on CPU,
   when left padding is a large share of that, one call per row reads each row's own slots only.
3. A row that ends (EOS, a stop string such as "</answer>", or max_new_tokens) LEAVES the batch: the
   last active row is moved into its slot (cache included), so the remaining steps compute only live rows.
   Moving one row costs one row's cache copy; `generate` instead keeps computing finished rows as padding
   until the longest row is done. The token that completes a stop string is kept and may carry more text
   ("></"): decode, then `cut_after_stop` before scoring.

The decoder forward is written here for the Llama family (llama, mistral, qwen2, qwen3: RMSNorm, RoPE,
grouped-query attention, SwiGLU, q/k/v biases, tied embeddings). It calls the model's SUBMODULES
(embed_tokens, each layer's q_proj / input_layernorm / mlp ..., norm, lm_head), never the top-level
forward, so it controls the cache and also runs on an FSDP2 model whose parameters were gathered with
`model.unshard()` (the submodules then hold plain tensors and no FSDP hook fires). Other architectures
raise NotImplementedError: add their layer to `_layer_step` rather than silently falling back.

Sampling: temperature, then top-k, then top-p (nucleus), from a seeded torch.Generator; greedy when
temperature == 0. The returned logprobs are log_softmax(logits / temperature) at the sampled token
(log_softmax(logits) when temperature == 0), i.e. under the UNTRUNCATED tempered distribution, which is
what the PPO trainer recomputes. Top-k / top-p truncation is NOT reflected in them.

Run `python rollout.py --help`: a demo that samples answers to MedQA questions and a benchmark against
transformers' `generate`.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Per-row decode attention pays off on CPU when a row's cached K (numbers: span * kv_heads * head_dim) is at
# least this big (SmolLM2 with MedQA prompts: yes; the tiny test models: no; see generate).
PER_ROW_MIN_NUMBERS = 2 ** 15


@dataclass
class Rollout:
    sequences: torch.Tensor  # [B, P+T] long: left-padded prompt, then the response right-padded with pad_token_id
    response_mask: torch.Tensor  # [B, T] long: 1 up to and including the token that ended the row
    logprobs: torch.Tensor  # [B, T] float32: log-prob of each sampled token (0 where the mask is 0)
    finish_reason: list[str]  # per row: "eos" | "stop" | "length"


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit that top-k and then top-p (nucleus) sampling would drop. logits: [b, V].

    top-k keeps the k largest logits (ties with the k-th are kept too). top-p keeps the smallest set of
    most likely tokens whose total probability (renormalised after top-k) is >= top_p: token i stays
    when the mass of the tokens strictly before it in sorted order is < top_p, so the top token always stays.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1] the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [b, V]
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [b, V], [b, V]
        probs = sorted_logits.softmax(-1)  # [b, V]
        mass_before = probs.cumsum(-1) - probs  # [b, V] exclusive cumulative sum
        drop_sorted = mass_before >= top_p  # [b, V] False for the top token whenever top_p > 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [b, V] back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


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
        u = uniforms.to(cdf.dtype) * cdf[:, -1]  # [b] scaled by the total so rounding cannot overshoot
        # the first token whose CDF exceeds u; right=True never picks a zero-probability token
        tokens = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)  # [b]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------------
# The decoder, by hand, over a preallocated KV cache
# ---------------------------------------------------------------------------------------------------

def _check_supported(model, total_len: int) -> None:
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"rollout.generate writes the decoder by hand for {SUPPORTED_MODEL_TYPES}; got model_type="
            f"{cfg.model_type!r}. Add its layer to rollout._layer_step (or sample with model.generate).")
    if type(model.model.embed_tokens.weight).__name__ == "DTensor":
        raise RuntimeError("the model's parameters are FSDP2 shards: gather them first (unshard() every FSDP "
                           "module, e.g. with distributed.gathered(model)), then call generate")
    window = getattr(cfg, "sliding_window", None)
    if window and total_len > window:
        raise NotImplementedError(f"sliding-window attention (window {window} < {total_len} tokens) is not implemented")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: x * cos + rotate_half(x) * sin. x: [b, h, s, d]; cos, sin: [b, 1, s, d]."""
    x1, x2 = x.chunk(2, dim=-1)  # [b, h, s, d/2] each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention: softmax(q k^T * scale + mask) v.

    q: [b, H, s, d]; k, v: [b, KV, S, d] (each group of H/KV query heads shares one KV head, as in
    transformers' repeat_kv); mask: [b, 1, s, S] bool, True = may attend; or None = causal (a prefill
    from slot 0 with s == S); or, at decode, a list of b ints: row i attends to slots mask[i].. only.
    Returns [b, H, s, d].
    """
    b, H, s, d = q.shape
    KV = k.shape[1]
    if s == 1:
        # Decode: fold the group of query heads that share a KV head into the query-length axis, so one
        # SDPA call reads each cached K/V once and nothing is repeated: [b, H, 1, d] -> [b, KV, H/KV, d].
        q = q.view(b, KV, H // KV, d)
        if isinstance(mask, list):  # per-row starts: row i attends to slots mask[i]..S-1, all valid
            out = torch.empty_like(q)  # [b, KV, H/KV, d]
            for i, first in enumerate(mask):
                out[i] = F.scaled_dot_product_attention(q[i], k[i, :, first:], v[i, :, first:], scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, H, 1, d)  # not view: the efficient-attention kernel (CUDA) returns another layout
    if KV != H:
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # [b, H, S, d]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


def _linear(lin, x: torch.Tensor) -> torch.Tensor:
    """lin(x) for x [b, s, in] -> [b, s, out]. For a few rows on CPU (decoding: b*s <= 64) it computes
    (W x^T)^T instead of x W^T: the same numbers up to rounding, but MKL runs that layout 1.2-1.9x faster
    on SmolLM2's shapes (its kernel for a skinny x barely uses the second core; measured in the issue-8
    benchmarks, BENCHMARKS.md). GPUs and larger batches take the module's own forward."""
    b, s, _ = x.shape
    if x.device.type != "cpu" or not 2 <= b * s <= 64:
        return lin(x)
    y = (lin.weight @ x.reshape(b * s, -1).t()).t().contiguous()  # [b*s, out]
    if lin.bias is not None:
        y = y + lin.bias
    return y.view(b, s, -1)


def _layer_step(layer, x, cos, sin, cache_k, cache_v, start, mask):
    """One decoder layer on x [b, s, D] whose tokens go to cache slots start..start+s-1.

    cache_k, cache_v: [b, KV, S_max, d] views of this layer's cache (the active rows), written in place.
    Pre-norm residual block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)).
    """
    attn = layer.self_attn
    b, s, _ = x.shape
    d = cache_k.shape[-1]
    h = layer.input_layernorm(x)  # [b, s, D]
    q = _linear(attn.q_proj, h).view(b, s, -1, d).transpose(1, 2)  # [b, H, s, d] (q/k/v biases live in the Linear)
    k = _linear(attn.k_proj, h).view(b, s, -1, d).transpose(1, 2)  # [b, KV, s, d]
    v = _linear(attn.v_proj, h).view(b, s, -1, d).transpose(1, 2)  # [b, KV, s, d]
    if hasattr(attn, "q_norm"):  # qwen3: RMSNorm per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    end = start + s
    cache_k[:, :, start:end] = k  # write in place: no torch.cat, nothing reallocated
    cache_v[:, :, start:end] = v
    o = _attend(q, cache_k[:, :, :end], cache_v[:, :, :end], mask, attn.scaling)  # [b, H, s, d], filled prefix only
    x = x + _linear(attn.o_proj, o.transpose(1, 2).reshape(b, s, -1))  # [b, s, D]
    mlp, h = layer.mlp, layer.post_attention_layernorm(x)  # [b, s, D]
    return x + _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h))  # SwiGLU


def _forward_last(model, ids, pos, cache, start, mask) -> torch.Tensor:
    """Run ids [b, s] (cache slots start..start+s-1, position ids pos [b, s]) through the model.

    cache: list over layers of (K, V), each [b, KV, S_max, d]; mask: as in _attend ([b, 1, s, start+s] bool,
    None for a causal prefill that starts at slot 0, or per-row first slots).
    Returns float32 logits of the LAST position only: [b, V] (the only ones sampling needs).
    """
    inner = model.model
    x = inner.embed_tokens(ids)  # [b, s, D]
    cos, sin = inner.rotary_emb(x, pos)  # [b, s, d] each, the model's own RoPE (scaling variants included)
    cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, d] broadcast over heads
    for layer, (k, v) in zip(inner.layers, cache):
        x = _layer_step(layer, x, cos, sin, k, v, start, mask)
    return _linear(model.lm_head, inner.norm(x[:, -1:]))[:, 0].float()  # [b, V]


def _prefill(model, input_ids, attention_mask, n_real, cache, grouped: bool = True) -> torch.Tensor:
    """Run the prompts into the cache; returns the logits for each row's first response token, [B, V].

    grouped=False: _prefill_padded, one forward for all prompts (what a GPU wants, see there).

    Rows are grouped by their number of real tokens n and identical prompts are run once, so no padding
    is ever computed (MedQA prompt lengths vary about 2x: a padded batch would spend up to half its prefill
    on padding) and the k samples per prompt that RL draws share one prefill. A group's n tokens go to
    cache slots P-n .. P-1 with position ids 0 .. n-1 (= cumsum(mask) - 1, the trainer's
    position_ids_from_mask); the padding slots before them are zeroed (masked out later, but they must be
    finite: 0 * NaN is NaN) . input_ids, attention_mask: [B, P]; n_real: [B]; cache K/V: [B, KV, S_max, d].
    """
    if not grouped:
        return _prefill_padded(model, input_ids, attention_mask, cache)
    B, P = input_ids.shape
    logits = None
    for n in n_real.unique().tolist():
        rows = (n_real == n).nonzero()[:, 0]  # [g] rows with n real tokens
        ids = input_ids[rows][attention_mask[rows].bool()].view(len(rows), n)  # [g, n] padding dropped
        unique_ids, inverse = torch.unique(ids, dim=0, return_inverse=True)  # [u, n], [g]
        u = len(unique_ids)
        group_cache = [(k.new_empty(u, k.shape[1], n, k.shape[3]), v.new_empty(u, v.shape[1], n, v.shape[3]))
                       for k, v in cache]  # per layer [u, KV, n, d]
        pos = torch.arange(n, device=ids.device).expand(u, n)  # [u, n]
        group_logits = _forward_last(model, unique_ids, pos, group_cache, 0, None)  # [u, V] causal, no mask
        if logits is None:
            logits = group_logits.new_empty(B, group_logits.shape[-1])  # [B, V]
        logits[rows] = group_logits[inverse]
        for (k, v), (gk, gv) in zip(cache, group_cache):
            k[rows, :, P - n:P], v[rows, :, P - n:P] = gk[inverse], gv[inverse]
            k[rows, :, :P - n], v[rows, :, :P - n] = 0, 0
    return logits


def _prefill_padded(model, input_ids, attention_mask, cache) -> torch.Tensor:
    """The prefill as ONE forward over the left-padded prompts (identical prompts once), for GPUs.

    On a GPU a prefill this size is bound by kernel launches, not FLOPs: the grouped prefill runs the whole
    decoder once per distinct prompt length, and 128 MedQA prompts have ~100 lengths (measured on an H200,
    BENCHMARKS.md: 3.9 s against 0.3 s for transformers' one padded forward). Same cache layout as the grouped
    prefill: row b's n real tokens in slots P-n .. P-1, position ids 0 .. n-1, its padding slots zeroed.
    Mask [u, 1, P, P]: causal, real keys only; a padding query sees itself (a row of -inf gives NaN).
    """
    B, P = input_ids.shape
    rows, inverse = torch.unique(torch.cat([input_ids, attention_mask.long()], 1), dim=0, return_inverse=True)
    ids, real = rows[:, :P], rows[:, P:].bool()  # [u, P] each
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)  # [u, P] position ids of the real tokens: 0 .. n-1
    causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()  # [P, P]
    mask = (causal & real[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device)  # [u, P, P]
    group_cache = [(k.new_empty(len(rows), k.shape[1], P, k.shape[3]), v.new_empty(len(rows), v.shape[1], P, v.shape[3]))
                   for k, v in cache]  # per layer [u, KV, P, d]
    logits = _forward_last(model, ids, pos, group_cache, 0, mask[:, None])  # [u, V] at the last (real) token
    pad = ~attention_mask.bool()[:, None, :, None]  # [B, 1, P, 1]
    for (k, v), (gk, gv) in zip(cache, group_cache):
        k[:, :, :P], v[:, :, :P] = gk[inverse].masked_fill(pad, 0), gv[inverse].masked_fill(pad, 0)
    return logits[inverse]  # [B, V]


# ---------------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------------

def _hits_stop_string(tokenizer, windows: list[list[int]], stop_strings: list[str]) -> list[bool]:
    """Does the decoded tail of each row contain a stop string? windows: per row, its last few response tokens.

    A stop string can end in the middle of a token (say "r>\\n" completes "</answer>"), so we look at text,
    not token ids. The window is only as long as the longest stop string (plus slack) in tokens: a few
    characters to decode per row per step. The string cannot have ended before the newest token (the row
    would have stopped then), so finding it anywhere in the window means the newest token completed it.
    """
    texts = tokenizer.batch_decode(windows, skip_special_tokens=False)
    return [any(s in text for s in stop_strings) for text in texts]


def cut_after_stop(text: str, stop_strings: list[str] | str | None) -> str:
    """The decoded response up to and including the first stop string; the rest is dropped.

    The token that completed a stop string can carry more text: SmolLM2 has tokens "></", "><", ">.",
    so a response can decode to "...</answer><". That tail is an artifact of tokenization (generation
    ended at the stop string), so cut it before scoring: the verifier refuses anything after </answer>.
    """
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------

def _without_cudnn_attention(fn):
    """On CUDA, run fn with SDPA's flash, memory-efficient and math kernels, never cuDNN's. cuDNN attention
    builds a graph for each new shape, and a decode step's key length grows by one at every step: on an H200
    it was 62% of a decode step's host time, and decoding without it was 2.6-2.8x faster (for transformers'
    generate too; BENCHMARKS.md). The CPU has no cuDNN kernel: nothing changes there."""
    @functools.wraps(fn)
    def run(model, input_ids, *args, **kwargs):
        if input_ids.device.type != "cuda":
            return fn(model, input_ids, *args, **kwargs)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return fn(model, input_ids, *args, **kwargs)
    return run


@_without_cudnn_attention
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
             stop_strings: list[str] | str | None = None, tokenizer=None, generator: torch.Generator | None = None,
             pad_token_id: int | None = None, compact: bool = True, uniforms: torch.Tensor | None = None,
             prefill: str = "auto") -> Rollout:
    """Sample a response for each left-padded prompt. input_ids, attention_mask: [B, P].

    eos_token_id: an int or a list; None takes model.generation_config.eos_token_id, [] disables EOS.
    stop_strings: end a row once its generated text contains one (needs `tokenizer`); the token that
    completed it is kept. pad_token_id: fills the response after a row ends (default: the tokenizer's,
    then the config's, then 0). generator: a seeded torch.Generator for reproducible samples.
    compact=False keeps finished rows in the batch (as transformers does): same results, slower; for tests.
    uniforms [B, max_new_tokens]: the sampling noise itself, in place of `generator` (the trainer draws each
    row's from its own seed, so a row samples the same tokens whatever batch or rank it lands in).
    prefill: "grouped" (by prompt length: no padding computed; FLOPs are what a CPU pays for), "padded" (one
    forward: kernel launches are what a GPU pays for), or "auto": grouped on the CPU, padded elsewhere.
    Returns a Rollout with T = the longest response (<= max_new_tokens).
    """
    device = input_ids.device
    B, P = input_ids.shape
    S_max = P + max_new_tokens
    _check_supported(model, S_max)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated tail")
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           dtype=torch.long, device=device)  # [n_eos]
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    window = max((len(s) for s in stop_strings or []), default=0) + 2  # tokens of tail to decode for stop strings

    # Outputs, indexed by ORIGINAL row; the active batch below is a permutation of the unfinished rows.
    out_tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)  # [B, T_max]
    out_logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)  # [B, T_max]
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long)  # [B] response length per row (cpu)
    finish_reason = ["length"] * B

    # Preallocated KV cache, one (K, V) per layer, each [B, KV, S_max, d]: written in place, never grown.
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_width = cfg.num_key_value_heads * head_dim  # numbers per cached token per layer, for K and for V
    dtype = model.model.embed_tokens.weight.dtype
    cache = [(torch.empty(B, cfg.num_key_value_heads, S_max, head_dim, dtype=dtype, device=device),
              torch.empty(B, cfg.num_key_value_heads, S_max, head_dim, dtype=dtype, device=device))
             for _ in model.model.layers]

    n_real = attention_mask.long().sum(-1)  # [B] real prompt tokens per row
    if int(n_real.min()) == 0:
        raise ValueError("every prompt needs at least one real token")
    if prefill not in ("auto", "grouped", "padded"):
        raise ValueError(f"prefill={prefill!r}: choose auto, grouped or padded")
    grouped = prefill == "grouped" or (prefill == "auto" and device.type == "cpu")
    logits = _prefill(model, input_ids, attention_mask, n_real, cache, grouped)  # [B, V]

    # Which cache slots each row may attend to at decode time: its real prompt tokens and every generated
    # token (all live rows advance in lockstep, so slot P + t is filled for all of them at step t).
    key_ok = torch.arange(S_max, device=device)[None, :] >= (P - n_real)[:, None]  # [B, S_max]
    rows = torch.arange(B, device=device)  # [b] original row held by each active slot
    next_pos = n_real.clone()  # [b] position id of the next token
    prompt_len = n_real.clone()  # [b] real prompt tokens of each active slot
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # [b] slot is done (only kept when compact=False)
    b = B
    steps = 0
    for t in range(max_new_tokens):
        # One uniform per ORIGINAL row per step: a row's sample does not depend on which rows are still active.
        if temperature == 0:
            u = None
        elif uniforms is not None:
            u = uniforms[rows, t]  # [b]
        else:
            # drawn where the generator lives (a CPU generator samples the same noise for a GPU model)
            at = generator.device if generator is not None else device
            u = torch.rand(B, generator=generator, device=at)[rows.to(at)].to(device)  # [b]
        tokens, logps = sample_tokens(logits, temperature, top_k, top_p, u)  # [b], [b]
        live = ~finished  # [b]
        out_tokens[rows[live], t] = tokens[live]
        out_logprobs[rows[live], t] = logps[live]
        steps = t + 1

        # Which live rows end with this token.
        is_eos = torch.isin(tokens, eos_ids) & live  # [b]
        is_stop = torch.zeros_like(is_eos)  # [b]
        if stop_strings:
            check = (live & ~is_eos).nonzero()[:, 0]  # [n] slots to check
            tails = out_tokens[rows[check], max(0, t + 1 - window):t + 1].tolist()
            hits = _hits_stop_string(tokenizer, tails, stop_strings)
            is_stop[check[torch.tensor(hits, dtype=torch.bool, device=device)]] = True
        ended = is_eos | is_stop  # [b]
        for slot in ended.nonzero()[:, 0].tolist():
            row = rows[slot].item()
            lengths[row] = t + 1
            finish_reason[row] = "eos" if is_eos[slot] else "stop"
        if t == max_new_tokens - 1:
            break  # the rows still live end here with the defaults: length max_new_tokens, "length"
        if ended.any():
            finished = finished | ended
            if compact:
                b = _compact(finished, b, cache, key_ok, (rows, next_pos, prompt_len, tokens), P + t)
                rows, next_pos, prompt_len, tokens = rows[:b], next_pos[:b], prompt_len[:b], tokens[:b]
                finished = finished[:b]
            if b == 0 or bool(finished.all()):
                break

        # Decode one token for every active slot: it goes to cache slot P + t. Attention reads slots
        # lo .. P+t, where lo skips the left padding that all active rows share (it grows when the rows
        # with the longest prompts have left).
        longest = int(prompt_len.max())
        lo = P - longest
        step_cache = [(k[:b, :, lo:], v[:b, :, lo:]) for k, v in cache]  # views: active rows, from slot lo
        span = P + t + 1 - lo
        if (device.type == "cpu" and span * kv_width >= PER_ROW_MIN_NUMBERS
                and float((longest - prompt_len).sum()) / (b * span) > 0.25):  # the share of padding in the view
            # Much padding, long rows: one attention call per row over its own slots reads no padding
            # (b calls per layer instead of one; -20% decode time on SmolLM2 at batch 32, MedQA prompts).
            mask = (longest - prompt_len).tolist()  # per-row first slot in the view
        else:
            mask = key_ok[:b, None, None, lo:P + t + 1]  # [b, 1, 1, span]
        logits = _forward_last(model, tokens[:, None], next_pos[:, None], step_cache, P + t - lo, mask)  # [b, V]
        next_pos = next_pos + 1

    T = steps
    response_mask = (torch.arange(T)[None, :] < lengths[:, None]).long().to(device)  # [B, T]
    tokens_out = out_tokens[:, :T].masked_fill(response_mask == 0, pad_token_id)  # [B, T]
    return Rollout(sequences=torch.cat([input_ids, tokens_out], dim=1),
                   response_mask=response_mask,
                   logprobs=out_logprobs[:, :T] * response_mask,
                   finish_reason=finish_reason)


def _compact(finished, b, cache, key_ok, per_slot, n_filled) -> int:
    """Remove finished slots from the active batch in place; returns the new batch size.

    Each hole among the first b_new slots is filled by a live slot from beyond b_new (swap-remove), so
    only len(holes) rows of the cache are copied, and only their n_filled written slots.
    finished: [b] bool; per_slot: tensors [b] (moved like the cache); key_ok: [B, S_max]; cache K/V: [B, KV, S_max, d].
    """
    b_new = int((~finished).sum())
    holes = finished[:b_new].nonzero()[:, 0]  # [m] finished slots that stay inside the new batch
    movers = (~finished[b_new:]).nonzero()[:, 0] + b_new  # [m] live slots beyond it
    if len(holes):
        for k, v in cache:
            k[holes, :, :n_filled] = k[movers, :, :n_filled]
            v[holes, :, :n_filled] = v[movers, :, :n_filled]
        for x in (*per_slot, finished):
            x[holes] = x[movers]
        key_ok[holes] = key_ok[movers]
    return b_new


# ---------------------------------------------------------------------------------------------------
# Demo: sample answers to a few MedQA questions and score them (python rollout.py --help)
# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--bench" in argv:  # every other flag is the benchmark's (python bench/rollout_bench.py --help)
        import importlib.util  # loaded by path: a top-level bench.py would shadow a `bench` package
        spec = importlib.util.spec_from_file_location(
            "rollout_bench", Path(__file__).resolve().parent / "bench" / "rollout_bench.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        return bench.main([a for a in argv if a != "--bench"])
    p = argparse.ArgumentParser(description="Sample answers to MedQA questions with rollout.generate and score "
                                "them with the verifier. `python rollout.py --bench [flags]` instead runs "
                                "bench/rollout_bench.py (its flags: python bench/rollout_bench.py --help).")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-qwen2, tiny-llama or an HF folder")
    p.add_argument("--data", default="medqa_dev", help="a data.py dataset name or a file")
    p.add_argument("--data_dir", default=None, help="default: $MEDRLVR_DATA, else ../shared/data beside the repo")
    p.add_argument("--n", type=int, default=4, help="questions")
    p.add_argument("--samples", type=int, default=1, help="responses per question")
    p.add_argument("--style", default="r1_chat", help="data.py prompt style")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from data import PROMPT_PREFILL, build_prompt, load_dataset, tokenize_prompts
    from model import load_policy
    from verifier import verify

    model, tok = load_policy(args.model)
    shared = Path(__file__).resolve().parent.parent / "shared" / "data"
    data_dir = args.data_dir or os.environ.get("MEDRLVR_DATA") or (str(shared) if shared.is_dir() else None)
    records = [r for r in load_dataset(args.data, data_dir)[:args.n] for _ in range(args.samples)]
    ids, mask, _, _ = tokenize_prompts(tok, [build_prompt(r, args.style, tok) for r in records], None)
    start = time.perf_counter()
    out = generate(model, ids, mask, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, stop_strings=["</answer>"], tokenizer=tok, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - start
    P = ids.shape[1]
    rewards = []
    for i, record in enumerate(records):
        length = int(out.response_mask[i].sum())
        text = tok.decode(out.sequences[i, P:P + length], skip_special_tokens=True)
        response = PROMPT_PREFILL[args.style] + cut_after_stop(text, "</answer>")
        result = verify(response, record["answer"], record["options"])  # the verifier sees the prefill too
        rewards.append(result["reward"])
        print(f"=== {record['id']}  gold {record['answer']}  pred {result['pred']}  reward {result['reward']:+.0f}"
              f"  ({length} tokens, {out.finish_reason[i]})\n{response}")
    print(f"\n{int(out.response_mask.sum())} tokens in {seconds:.1f} s, mean reward {sum(rewards) / len(rewards):+.2f}")

if __name__ == "__main__":
    main()
