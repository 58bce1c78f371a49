"""The fast engine's forward pass: the Llama-family decoder written out over a KV cache, one
decoder layer for the prefill and both of engine.py's decode steps (the static step passes how it
writes the cache: at a slot held in a tensor), with the engine's speed tricks; and the prefill.

`layer_step` is rollout.decoder_layer (the teaching copy) with two differences, each a speed trick
the teaching core leaves out: `linear` may run a few rows as (W x^T)^T (the CPU layout), and
`attend` folds the query heads that share a KV head into the query axis so that one SDPA call reads
each cached key and value once (and, at decode, may run one call per row over its own slots).
tests/test_engine.py keeps the engine's samples equal to the teaching core's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rollout

# The (W x^T)^T layout of `linear` is used for this many rows (batch x new tokens).
FEW_ROWS = range(2, 65)


@dataclass
class Attention:
    """How a forward's attention meets the KV cache."""
    write: object  # write(layer_cache [b, KV, S, d], new [b, KV, s, d]): where the new K/V go
    span: int  # the cache slots read: :span
    mask: object  # [b, 1, s, span] bool (True: may attend); None: causal from slot 0; or, at
    #               decode, a list of each row's first slot
    cpu_layout: bool = False  # the CPU's (W x^T)^T for a few rows


def write_at(start: int):
    """A write into slots start .. start+s-1 (a Python offset: the dynamic step and the prefill)."""
    def write(layer_cache, new):
        layer_cache[:, :, start:start + new.shape[2]].copy_(new)
    return write


def forward_last(model, ids, positions, cache: rollout.KVCache, attention: Attention):
    """Run ids [b, s] (position ids [b, s]) through the model over `cache`; float32 logits of the
    LAST position only: [b, V]."""
    backbone = model.model
    x = backbone.embed_tokens(ids)  # [b, s, D]
    cos, sin = backbone.rotary_emb(x, positions)  # [b, s, d] each, the model's own RoPE
    rope = (cos[:, None], sin[:, None])  # [b, 1, s, d] broadcast over heads
    for layer, keys, values in zip(backbone.layers, cache.keys, cache.values):
        x = layer_step(layer, x, rope, keys, values, attention)
    h = backbone.norm(x[:, -1:])  # [b, 1, D]
    return linear(model.lm_head, h, attention.cpu_layout)[:, 0].float()  # [b, V]


def layer_step(layer, x, rope, keys, values, attention: Attention):
    """rollout.decoder_layer with the engine's `linear` and `attend`, and the cache written as
    `attention.write` says. x: [b, s, D]; keys, values: this layer's cache [b, KV, S, d]."""
    attn, mlp, fast = layer.self_attn, layer.mlp, attention.cpu_layout
    b, s, _ = x.shape
    d = keys.shape[-1]
    h = layer.input_layernorm(x)  # [b, s, D]
    q = linear(attn.q_proj, h, fast).view(b, s, -1, d).transpose(1, 2)  # [b, H, s, d]
    k = linear(attn.k_proj, h, fast).view(b, s, -1, d).transpose(1, 2)  # [b, KV, s, d]
    v = linear(attn.v_proj, h, fast).view(b, s, -1, d).transpose(1, 2)  # [b, KV, s, d]
    if hasattr(attn, "q_norm"):  # qwen3: RMSNorm per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rollout.rope(q, *rope), rollout.rope(k, *rope)
    attention.write(keys, k)
    attention.write(values, v)
    span = attention.span
    o = attend(q, keys[:, :, :span], values[:, :, :span], attention.mask, attn.scaling)
    x = x + linear(attn.o_proj, o.transpose(1, 2).reshape(b, s, -1), fast)  # [b, s, D]
    h = layer.post_attention_layernorm(x)  # [b, s, D]
    gate_times_up = mlp.act_fn(linear(mlp.gate_proj, h, fast)) * linear(mlp.up_proj, h, fast)
    return x + linear(mlp.down_proj, gate_times_up, fast)  # SwiGLU


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """Grouped-query attention: softmax(q k^T * scale + mask) v.

    q: [b, H, s, d]; k, v: [b, KV, S, d] (each group of H/KV query heads shares one KV head, as in
    transformers' repeat_kv); mask: [b, 1, s, S] bool, True = may attend; or None = causal (a
    prefill from slot 0 with s == S); or, at decode, a list of b ints: row i attends to slots
    mask[i].. only. Returns [b, H, s, d].
    """
    b, H, s, d = q.shape
    KV = k.shape[1]
    if s == 1:
        # Decode: fold the query heads that share a KV head into the query-length axis, so one SDPA
        # call reads each cached K/V once and nothing is repeated: [b, H, 1, d] -> [b, KV, H/KV, d].
        q = q.view(b, KV, H // KV, d)
        if isinstance(mask, list):  # per-row starts: row i attends to slots mask[i]..S-1, all valid
            out = torch.empty_like(q)  # [b, KV, H/KV, d]
            for i, first in enumerate(mask):
                out[i] = F.scaled_dot_product_attention(q[i], k[i, :, first:], v[i, :, first:],
                                                        scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        # reshape, not view: CUDA's memory-efficient kernel returns another memory layout
        return out.reshape(b, H, 1, d)
    if KV != H:
        k = k.repeat_interleave(H // KV, dim=1)  # [b, H, S, d]
        v = v.repeat_interleave(H // KV, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          scale=scale)


def linear(lin, x: torch.Tensor, cpu_layout: bool = False) -> torch.Tensor:
    """lin(x) for x [b, s, in] -> [b, s, out]. With cpu_layout, for a few rows, (W x^T)^T instead
    of x W^T: the same numbers up to rounding, in a layout MKL runs faster (its kernel for a skinny
    x barely uses a second core)."""
    b, s, _ = x.shape
    if not cpu_layout or b * s not in FEW_ROWS:
        return lin(x)
    y = (lin.weight @ x.reshape(b * s, -1).t()).t().contiguous()  # [b*s, out]
    if lin.bias is not None:
        y = y + lin.bias
    return y.view(b, s, -1)


# -------------------------------------------------------------------------------------------------
# Prefill: the prompts into the cache
# -------------------------------------------------------------------------------------------------
def run_prefill(model, input_ids, attention_mask, n_real, cache, prefill: str) -> torch.Tensor:
    """The prompts [B, P] into the cache's rows :B, slots :P; returns the first response token's
    logits [B, V]. prefill: "grouped" or "padded"."""
    if prefill == "grouped":
        return prefill_grouped(model, input_ids, attention_mask, n_real, cache)
    if prefill == "padded":
        return prefill_padded(model, input_ids, attention_mask, cache)
    raise ValueError(f"prefill={prefill!r}: choose grouped or padded")


def prefill_grouped(model, input_ids, attention_mask, n_real, cache) -> torch.Tensor:
    """Rows grouped by their number of real tokens n, identical prompts run once: no padding is
    computed, and the samples RL draws from one prompt share its prefill. A group's n tokens go to
    cache slots P-n .. P-1 with position ids 0 .. n-1 (cumsum(mask) - 1, as in training); the
    padding slots before them are zeroed (masked out later, but they must be finite: 0 * NaN is
    NaN). input_ids, attention_mask: [B, P]; n_real: [B]; cache K/V: [B, KV, S, d]."""
    B, P = input_ids.shape
    logits = None
    for n in n_real.unique().tolist():
        rows = (n_real == n).nonzero()[:, 0]  # [g] rows with n real tokens
        ids = input_ids[rows][attention_mask[rows].bool()].view(len(rows), n)  # [g, n] no padding
        unique_ids, inverse = torch.unique(ids, dim=0, return_inverse=True)  # [u, n], [g]
        u = len(unique_ids)
        group_cache = rollout.KVCache.allocate(model, u, n, cache.keys[0].dtype)  # [u, KV, n, d]
        pos = torch.arange(n, device=ids.device).expand(u, n)  # [u, n]
        group_logits = forward_last(model, unique_ids, pos, group_cache,
                                    Attention(write_at(0), n, None))  # [u, V] causal
        if logits is None:
            logits = group_logits.new_empty(B, group_logits.shape[-1])  # [B, V]
        logits[rows] = group_logits[inverse]
        for k, v, gk, gv in zip(cache.keys, cache.values, group_cache.keys, group_cache.values):
            k[rows, :, P - n:P] = gk[inverse]
            v[rows, :, P - n:P] = gv[inverse]
            k[rows, :, :P - n] = 0
            v[rows, :, :P - n] = 0
    return logits


def prefill_padded(model, input_ids, attention_mask, cache) -> torch.Tensor:
    """The prefill as ONE forward over the left-padded prompts (identical prompts once), the GPU's:
    a prefill this size is bound by kernel launches there, and the grouped prefill runs the model
    once per distinct prompt length. The grouped prefill's cache layout: row b's n real tokens in
    slots P-n .. P-1, position ids 0 .. n-1, its padding slots zeroed. Mask [u, 1, P, P]: causal,
    real keys only; a padding query sees itself (a row of -inf gives NaN)."""
    B, P = input_ids.shape
    prompts = torch.cat([input_ids, attention_mask.long()], 1)  # [B, 2P] ids and mask together
    unique_rows, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    ids, real = unique_rows[:, :P], unique_rows[:, P:].bool()  # [u, P] each
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)  # [u, P] position ids of the real tokens
    causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()  # [P, P]
    itself = torch.eye(P, dtype=torch.bool, device=ids.device)  # [P, P]
    mask = (causal & real[:, None, :]) | itself  # [u, P, P]
    group_cache = rollout.KVCache.allocate(model, len(unique_rows), P, cache.keys[0].dtype)
    logits = forward_last(model, ids, pos, group_cache, Attention(write_at(0), P, mask[:, None]))
    pad = ~attention_mask.bool()[:, None, :, None]  # [B, 1, P, 1]
    for k, v, gk, gv in zip(cache.keys, cache.values, group_cache.keys, group_cache.values):
        k[:, :, :P] = gk[inverse].masked_fill(pad, 0)
        v[:, :, :P] = gv[inverse].masked_fill(pad, 0)
    return logits[inverse]  # [B, V]
