"""The fast engine: rollout.generate's samples, with the speed tricks that rollout.py leaves out.

`engine.generate` takes rollout.generate's arguments and returns the same `Rollout`: the same
tokens, the same log-probs up to float rounding (tests/test_engine.py), from the same per-row noise.
The trainers and eval.py call it by default (`--engine fast`); `--engine plain` runs the teaching
core. What it does differently, and why:
  - Prefill without padding (`prefill="grouped"`, the CPU's choice): the prompts are grouped by
    their number of real tokens and identical prompts run once, so no padding is computed (MedQA
    prompt lengths vary about 2x) and the n samples of a prompt share one prefill. On a GPU, where
    kernel launches cost more than FLOPs, one padded forward instead (`prefill="padded"`); same
    cache layout.
  - Decode attention folds the query heads that share a KV head into the query axis, so one SDPA
    call reads each cached key and value once; it reads only from the first slot a live row needs;
    and on the CPU, when left padding is much of that, one call per row reads each row's own slots
    only.
  - On the CPU the linears of a few rows run as (W x^T)^T: the same numbers up to rounding, in a
    layout MKL runs faster for a skinny x.
  - Finished rows leave by swap-remove: a live row from the end of the batch fills each hole, so
    only the moved rows' caches are copied.
  - On CUDA it never uses cuDNN's attention kernel, which builds a graph for every new key length
    (and a decode step's key length grows by one every step).
  - On CUDA the decode step has static shapes and is replayed as CUDA graphs (static_decode.py):
    a small model's step is hundreds of tiny kernels, which Python cannot launch as fast as the GPU
    runs them.
BENCHMARKS.md measures each against transformers' generate and against rollout.generate.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import rollout

# Per-row decode attention pays off on the CPU when a row's cached keys (numbers: span x kv_heads x
# head_dim) are at least this many (SmolLM2 with MedQA prompts: yes; the tiny test models: no).
PER_ROW_MIN_NUMBERS = 2 ** 15
# The (W x^T)^T layout of `linear` is used for this many rows (batch x new tokens) on the CPU.
FEW_ROWS = range(2, 65)


def without_cudnn_attention(fn):
    """On CUDA, run fn with SDPA's flash, memory-efficient and math kernels, never cuDNN's (it
    builds a graph for each new shape). The CPU has no cuDNN kernel: nothing changes there."""
    @functools.wraps(fn)
    def run(model, input_ids, *args, **kwargs):
        if input_ids.device.type != "cuda":
            return fn(model, input_ids, *args, **kwargs)
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(backends):
            return fn(model, input_ids, *args, **kwargs)
    return run


@without_cudnn_attention
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
             stop_strings: list[str] | str | None = None, tokenizer=None,
             generator: torch.Generator | None = None, pad_token_id: int | None = None,
             uniforms: torch.Tensor | None = None, compact: bool = True,
             prefill: str = "auto", decode: str = "auto") -> rollout.Rollout:
    """rollout.generate, fast (see the module docstring); the arguments are rollout.generate's, and:

    prefill: "grouped" (by prompt length: no padding computed), "padded" (one forward), or "auto":
    grouped on the CPU, padded elsewhere.
    decode: "dynamic" (the loop below: each step's shapes are the live rows and the filled slots),
    "static" (static_decode.py: fixed shapes, replayed as CUDA graphs on a GPU), or "auto": static
    on CUDA, dynamic elsewhere.
    compact=False (dynamic decode only) keeps finished rows in the batch, as transformers does: the
    same results, slower.
    """
    if decode not in ("auto", "dynamic", "static"):
        raise ValueError(f"decode={decode!r}: choose auto, dynamic or static")
    device = input_ids.device
    if decode == "static" or (decode == "auto" and device.type == "cuda"):
        import static_decode  # imported here: static_decode builds on this module's functions

        return static_decode.generate(model, input_ids, attention_mask, max_new_tokens,
                                      temperature, top_p, top_k, eos_token_id, stop_strings,
                                      tokenizer, generator, pad_token_id, uniforms, prefill)
    B, P = input_ids.shape
    S_max = P + max_new_tokens
    rollout.check_supported(model, S_max)
    stops = rollout.StopRule(model, eos_token_id, stop_strings, tokenizer, device)
    pad_token_id = rollout.pad_id(model, tokenizer, pad_token_id)
    out = rollout.Outputs.empty(B, max_new_tokens, pad_token_id, device)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_width = config.num_key_value_heads * head_dim  # numbers per cached token per layer, K or V
    cache = rollout.KVCache.allocate(model, B, S_max)

    n_real = attention_mask.long().sum(-1)  # [B] real prompt tokens per row
    if int(n_real.min()) == 0:
        raise ValueError("every prompt needs at least one real token")
    logits = run_prefill(model, input_ids, attention_mask, n_real, cache, prefill)  # [B, V]

    # The cache slots each row may attend to at decode time: its real prompt tokens and every
    # generated token (the live rows advance together: slot P + t is filled for all at step t).
    may_attend = torch.arange(S_max, device=device)[None, :] >= (P - n_real)[:, None]  # [B, S_max]
    rows = torch.arange(B, device=device)  # [b] original row held by each active slot
    next_pos = n_real.clone()  # [b] position id of the next token
    prompt_len = n_real.clone()  # [b] real prompt tokens of each active slot
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # [b] done (kept when compact=False)
    b = B
    for t in range(max_new_tokens):
        u = rollout.step_uniforms(t, rows, B, temperature, uniforms, generator)  # [b]
        tokens, logps = rollout.sample_tokens(logits, temperature, top_k, top_p, u)  # [b], [b]
        live = ~finished  # [b]
        out.record(t, rows[live], tokens[live], logps[live])
        ended = stops.ended(out, t, rows, tokens, live)  # [b]
        if t == max_new_tokens - 1:
            break  # the rows still live end here with the defaults: length max_new_tokens, "length"
        if ended.any():
            finished = finished | ended
            if compact:
                per_slot = (rows, next_pos, prompt_len, tokens)
                b = swap_remove(finished, b, cache, may_attend, per_slot, P + t)
                rows, next_pos, prompt_len = rows[:b], next_pos[:b], prompt_len[:b]
                tokens = tokens[:b]
                finished = finished[:b]
            if b == 0 or bool(finished.all()):
                break

        # Decode one token for every active slot, into cache slot P + t. Attention reads slots
        # lo .. P+t, where lo skips the left padding that all active rows share (it grows when the
        # rows with the longest prompts have left).
        longest = int(prompt_len.max())
        lo = P - longest
        step_cache = rollout.KVCache([k[:b, :, lo:] for k in cache.keys],
                                     [v[:b, :, lo:] for v in cache.values])
        span = P + t + 1 - lo
        padding_share = float((longest - prompt_len).sum()) / (b * span)
        if device.type == "cpu" and span * kv_width >= PER_ROW_MIN_NUMBERS and padding_share > 0.25:
            # much padding, long rows: one attention call per row over its own slots reads no
            # padding
            mask = (longest - prompt_len).tolist()  # per-row first slot in the view
        else:
            mask = may_attend[:b, None, None, lo:P + t + 1]  # [b, 1, 1, span]
        logits = forward_last(model, tokens[:, None], next_pos[:, None], step_cache, P + t - lo,
                              mask)  # [b, V]
        next_pos = next_pos + 1
    return out.rollout(input_ids)


def run_prefill(model, input_ids, attention_mask, n_real, cache, prefill: str) -> torch.Tensor:
    """The prompts [B, P] into the cache (rows :B); returns the first response token's logits
    [B, V]. prefill: "grouped", "padded", or "auto" (grouped on the CPU, padded elsewhere)."""
    if prefill not in ("auto", "grouped", "padded"):
        raise ValueError(f"prefill={prefill!r}: choose auto, grouped or padded")
    if prefill == "grouped" or (prefill == "auto" and input_ids.device.type == "cpu"):
        return prefill_grouped(model, input_ids, attention_mask, n_real, cache)
    return prefill_padded(model, input_ids, attention_mask, cache)


def prefill_grouped(model, input_ids, attention_mask, n_real, cache) -> torch.Tensor:
    """Run the prompts into the cache; returns the logits of each row's first response token [B, V].

    Rows are grouped by their number of real tokens n and identical prompts are run once, so no
    padding is ever computed and the k samples per prompt that RL draws share one prefill. A group's
    n tokens go to cache slots P-n .. P-1 with position ids 0 .. n-1 (cumsum(mask) - 1, as in
    training); the padding slots before them are zeroed (masked out later, but they must be finite:
    0 * NaN is NaN). input_ids, attention_mask: [B, P]; n_real: [B]; cache K/V: [B, KV, S_max, d].
    """
    B, P = input_ids.shape
    logits = None
    for n in n_real.unique().tolist():
        rows = (n_real == n).nonzero()[:, 0]  # [g] rows with n real tokens
        ids = input_ids[rows][attention_mask[rows].bool()].view(len(rows), n)  # [g, n] no padding
        unique_ids, inverse = torch.unique(ids, dim=0, return_inverse=True)  # [u, n], [g]
        u = len(unique_ids)
        group_cache = rollout.KVCache.allocate(model, u, n)  # [u, KV, n, d] per layer
        pos = torch.arange(n, device=ids.device).expand(u, n)  # [u, n]
        group_logits = forward_last(model, unique_ids, pos, group_cache, 0, None)  # [u, V] causal
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
    """The prefill as ONE forward over the left-padded prompts (identical prompts once), for GPUs.

    On a GPU a prefill this size is bound by kernel launches, not FLOPs, and the grouped prefill
    runs the whole decoder once per distinct prompt length (about a hundred for 128 MedQA prompts).
    Same cache layout as the grouped prefill: row b's n real tokens in slots P-n .. P-1, position
    ids 0 .. n-1, its padding slots zeroed. Mask [u, 1, P, P]: causal, real keys only; a padding
    query sees itself (a row of -inf gives NaN).
    """
    B, P = input_ids.shape
    prompts = torch.cat([input_ids, attention_mask.long()], 1)  # [B, 2P] ids and mask together
    unique_rows, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    ids, real = unique_rows[:, :P], unique_rows[:, P:].bool()  # [u, P] each
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)  # [u, P] position ids of the real tokens
    causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()  # [P, P]
    itself = torch.eye(P, dtype=torch.bool, device=ids.device)  # [P, P]
    mask = (causal & real[:, None, :]) | itself  # [u, P, P]
    u = len(unique_rows)
    group_cache = rollout.KVCache.allocate(model, u, P)  # [u, KV, P, d] per layer
    logits = forward_last(model, ids, pos, group_cache, 0, mask[:, None])  # [u, V] the last token
    pad = ~attention_mask.bool()[:, None, :, None]  # [B, 1, P, 1]
    for k, v, gk, gv in zip(cache.keys, cache.values, group_cache.keys, group_cache.values):
        k[:, :, :P] = gk[inverse].masked_fill(pad, 0)
        v[:, :, :P] = gv[inverse].masked_fill(pad, 0)
    return logits[inverse]  # [B, V]


def forward_last(model, ids, pos, cache: rollout.KVCache, start, mask) -> torch.Tensor:
    """Run ids [b, s] (cache slots start..start+s-1, position ids pos [b, s]) through the model.

    mask: as in `attend` ([b, 1, s, start+s] bool, None for a causal prefill that starts at slot 0,
    or per-row first slots). Returns float32 logits of the LAST position only: [b, V].
    """
    backbone = model.model
    x = backbone.embed_tokens(ids)  # [b, s, D]
    cos, sin = backbone.rotary_emb(x, pos)  # [b, s, d] each, the model's own RoPE
    cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, d] broadcast over heads
    for layer, k, v in zip(backbone.layers, cache.keys, cache.values):
        x = layer_step(layer, x, cos, sin, k, v, start, mask)
    return linear(model.lm_head, backbone.norm(x[:, -1:]))[:, 0].float()  # [b, V]


def layer_step(layer, x, cos, sin, cache_k, cache_v, start, mask):
    """rollout.decoder_layer, with the engine's `linear` and `attend`. x: [b, s, D]; cache_k,
    cache_v: [b, KV, S_max, d] views of this layer's cache (the active rows), written in place."""
    attn = layer.self_attn
    b, s, _ = x.shape
    d = cache_k.shape[-1]
    h = layer.input_layernorm(x)  # [b, s, D]
    q = linear(attn.q_proj, h).view(b, s, -1, d).transpose(1, 2)  # [b, H, s, d]
    k = linear(attn.k_proj, h).view(b, s, -1, d).transpose(1, 2)  # [b, KV, s, d]
    v = linear(attn.v_proj, h).view(b, s, -1, d).transpose(1, 2)  # [b, KV, s, d]
    if hasattr(attn, "q_norm"):  # qwen3: RMSNorm per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rollout.rope(q, cos, sin), rollout.rope(k, cos, sin)
    end = start + s
    cache_k[:, :, start:end] = k
    cache_v[:, :, start:end] = v
    o = attend(q, cache_k[:, :, :end], cache_v[:, :, :end], mask, attn.scaling)  # [b, H, s, d]
    x = x + linear(attn.o_proj, o.transpose(1, 2).reshape(b, s, -1))  # [b, s, D]
    mlp = layer.mlp
    h = layer.post_attention_layernorm(x)  # [b, s, D]
    gate_times_up = mlp.act_fn(linear(mlp.gate_proj, h)) * linear(mlp.up_proj, h)
    return x + linear(mlp.down_proj, gate_times_up)  # SwiGLU


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


def linear(lin, x: torch.Tensor) -> torch.Tensor:
    """lin(x) for x [b, s, in] -> [b, s, out]. For a few rows on the CPU (decoding) it computes
    (W x^T)^T instead of x W^T: the same numbers up to rounding, in a layout MKL runs faster (its
    kernel for a skinny x barely uses a second core). GPUs and larger batches take the module's
    forward."""
    b, s, _ = x.shape
    if x.device.type != "cpu" or b * s not in FEW_ROWS:
        return lin(x)
    y = (lin.weight @ x.reshape(b * s, -1).t()).t().contiguous()  # [b*s, out]
    if lin.bias is not None:
        y = y + lin.bias
    return y.view(b, s, -1)


def swap_remove(finished, b, cache: rollout.KVCache, may_attend, per_slot, n_filled) -> int:
    """Remove finished slots from the active batch in place; returns the new batch size.

    Each hole among the first b_new slots is filled by a live slot from beyond b_new, so only
    len(holes) rows of the cache are copied, and only their n_filled written slots.
    finished: [b] bool; per_slot: tensors [b] moved like the cache; may_attend: [B, S_max].
    """
    b_new = int((~finished).sum())
    holes = finished[:b_new].nonzero()[:, 0]  # [m] finished slots that stay inside the new batch
    movers = (~finished[b_new:]).nonzero()[:, 0] + b_new  # [m] live slots beyond it
    if len(holes):
        for k, v in zip(cache.keys, cache.values):
            k[holes, :, :n_filled] = k[movers, :, :n_filled]
            v[holes, :, :n_filled] = v[movers, :, :n_filled]
        for x in (*per_slot, finished):
            x[holes] = x[movers]
        may_attend[holes] = may_attend[movers]
    return b_new
