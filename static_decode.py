"""The engine's static-shape decode: every decode step the same shapes, so a GPU can replay it.

On a GPU a small model's decode step is a few hundred tiny kernels; launching them from Python
costs more than running them (the step is host-bound). A CUDA graph records the step's kernels once
and replays them with one launch, but only if every replay has the same shapes and the same memory
addresses. This module makes the decode step so, and keeps everything else as engine.generate has
it (the same prefill, the same sampling from the same per-row uniforms, the same stopping), so its
samples equal the teaching core's (tests/test_static_decode.py):
  - The KV cache is preallocated once, zeroed, for `capacity` rows (the smallest batch size in
    BATCH_SIZES that holds the call's rows) and the call's longest sequence. Zeroed because the
    step attends to every slot of its span and masks the unwritten ones out: a masked slot must
    still be finite (0 * NaN is NaN).
  - The step's inputs live in fixed buffers: the new token and position id of each row, the slot
    being written (a tensor, so the write `index_copy_` has no Python offset baked in), and the
    mask of the slots each row may attend to.
  - The step runs on `bucket` rows, the smallest size in BATCH_SIZES that holds the live rows, and
    attends to `span` slots, the filled slots rounded up to SPAN_MULTIPLE: one graph per (bucket,
    span), captured the first time it is needed. Rows beyond the live ones compute garbage that
    nobody reads (their mask keeps one slot open, so it stays finite).
  - Finished rows still leave by engine.swap_remove: the live rows move to the front of the cache,
    and once they fit a smaller batch size, the step runs at that size.
On the CPU (no graphs) the same static step runs eagerly: the tests check it there, and bench.py
measures whether it pays.
"""
from __future__ import annotations

import warnings

import torch

import engine
import rollout

# The batch sizes a step runs at (as vLLM's captured sizes: every power of two and the midpoints).
BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# A step attends to the filled cache slots rounded up to a multiple of this (or the whole cache):
# fewer graphs than one per length, and at most this many masked slots read in vain.
SPAN_MULTIPLE = 256


def batch_size_for(rows: int) -> int:
    """The smallest size in BATCH_SIZES that holds `rows` rows (beyond the largest: rows itself)."""
    return next((size for size in BATCH_SIZES if size >= rows), rows)


class StaticStep:
    """One decode step of `model` with fixed input buffers, run eagerly or replayed as CUDA graphs.

    Buffers (capacity rows C, cache length S):
      tokens [C, 1], positions [C, 1]: the token each row decodes now and its position id
      slot [1]: the cache slot the step writes (P + t at step t)
      may_attend [C, S] bool: the slots each row may attend to (its real prompt tokens and what it
        generated); the step reads may_attend[:bucket, None, None, :span]
      cache: the KV cache, [C, kv_heads, S, head_dim] per layer
    """

    def __init__(self, model, cache: rollout.KVCache, may_attend: torch.Tensor, graphs: bool):
        capacity, S = may_attend.shape
        device = may_attend.device
        self.model = model
        self.cache = cache
        self.may_attend = may_attend
        self.tokens = torch.zeros(capacity, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(capacity, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        # (bucket, span) -> (the CUDAGraph, its output logits [bucket, V]); one memory pool for all
        self.graphs = {} if graphs else None
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    def run(self, bucket: int, span: int) -> torch.Tensor:
        """The logits [bucket, V] (float32) of the step over rows :bucket and slots :span."""
        if self.graphs is None:
            return self.forward(bucket, span)
        if (bucket, span) not in self.graphs:
            try:
                self.graphs[(bucket, span)] = self.capture(bucket, span)
            except RuntimeError as error:
                # the same step runs eagerly: the samples stay the same, only the speed is lost
                warnings.warn(f"static_decode: CUDA graph capture failed ({error}); the decode "
                              f"step runs eagerly for the rest of this call", stacklevel=2)
                self.graphs = None
                return self.forward(bucket, span)
        graph, logits = self.graphs[(bucket, span)]
        graph.replay()
        return logits

    def capture(self, bucket: int, span: int):
        """Record the step as a CUDA graph. The warm-up runs on a side stream (as PyTorch's docs
        ask) and compute the step itself: writing this step's keys and values twice is harmless."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(bucket, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(bucket, span)
        return graph, logits

    def forward(self, bucket: int, span: int) -> torch.Tensor:
        """rollout.decoder_forward for one new token per row, with static shapes only: rows
        :bucket, attention over slots :span, the cache written at `self.slot`."""
        backbone = self.model.model
        x = backbone.embed_tokens(self.tokens[:bucket])  # [bucket, 1, D]
        cos, sin = backbone.rotary_emb(x, self.positions[:bucket])  # [bucket, 1, d] each
        cos, sin = cos[:, None], sin[:, None]  # [bucket, 1, 1, d]
        mask = self.may_attend[:bucket, None, None, :span]  # [bucket, 1, 1, span]
        for layer, keys, values in zip(backbone.layers, self.cache.keys, self.cache.values):
            x = self.layer(layer, x, cos, sin, keys[:bucket], values[:bucket], mask, span)
        h = backbone.norm(x)  # [bucket, 1, D]
        return engine.linear(self.model.lm_head, h)[:, 0].float()  # [bucket, V]

    def layer(self, layer, x, cos, sin, keys, values, mask, span: int) -> torch.Tensor:
        """engine.layer_step with the new key and value written at the slot held in a tensor.
        x: [b, 1, D]; keys, values: [b, KV, S, d], this layer's cache rows."""
        attn, mlp = layer.self_attn, layer.mlp
        b = x.shape[0]
        d = keys.shape[-1]
        h = layer.input_layernorm(x)  # [b, 1, D]
        q = engine.linear(attn.q_proj, h).view(b, 1, -1, d).transpose(1, 2)  # [b, H, 1, d]
        k = engine.linear(attn.k_proj, h).view(b, 1, -1, d).transpose(1, 2)  # [b, KV, 1, d]
        v = engine.linear(attn.v_proj, h).view(b, 1, -1, d).transpose(1, 2)  # [b, KV, 1, d]
        if hasattr(attn, "q_norm"):  # qwen3: RMSNorm per head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rollout.rope(q, cos, sin), rollout.rope(k, cos, sin)
        keys.index_copy_(2, self.slot, k)  # slot P + t, in place
        values.index_copy_(2, self.slot, v)
        o = engine.attend(q, keys[:, :, :span], values[:, :, :span], mask, attn.scaling)
        x = x + engine.linear(attn.o_proj, o.transpose(1, 2).reshape(b, 1, -1))  # [b, 1, D]
        h = layer.post_attention_layernorm(x)  # [b, 1, D]
        gate_times_up = mlp.act_fn(engine.linear(mlp.gate_proj, h)) * engine.linear(mlp.up_proj, h)
        return x + engine.linear(mlp.down_proj, gate_times_up)  # SwiGLU


@engine.without_cudnn_attention
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
             stop_strings: list[str] | str | None = None, tokenizer=None,
             generator: torch.Generator | None = None, pad_token_id: int | None = None,
             uniforms: torch.Tensor | None = None, prefill: str = "auto",
             graphs: bool | None = None) -> rollout.Rollout:
    """engine.generate with the static-shape decode step (see the module docstring); the arguments
    are engine.generate's, and graphs: replay the step as CUDA graphs (default: on CUDA)."""
    device = input_ids.device
    B, P = input_ids.shape
    S_max = P + max_new_tokens
    graphs = device.type == "cuda" if graphs is None else graphs
    if graphs and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    rollout.check_supported(model, S_max)
    stops = rollout.StopRule(model, eos_token_id, stop_strings, tokenizer, device)
    pad_token_id = rollout.pad_id(model, tokenizer, pad_token_id)
    out = rollout.Outputs.empty(B, max_new_tokens, pad_token_id, device)
    n_real = attention_mask.long().sum(-1)  # [B] real prompt tokens per row
    if int(n_real.min()) == 0:
        raise ValueError("every prompt needs at least one real token")

    capacity = batch_size_for(B)
    cache = rollout.KVCache.allocate(model, capacity, S_max)
    for k, v in zip(cache.keys, cache.values):
        k.zero_()
        v.zero_()
    first_rows = rollout.KVCache([k[:B] for k in cache.keys], [v[:B] for v in cache.values])
    logits = engine.run_prefill(model, input_ids, attention_mask, n_real, first_rows, prefill)
    # [C, S]: row i may attend to its real prompt slots (and, below, each slot it generates);
    # the rows beyond B hold no sequence: one open slot keeps their garbage finite
    may_attend = torch.zeros(capacity, S_max, dtype=torch.bool, device=device)
    slots = torch.arange(S_max, device=device)  # [S]
    may_attend[:B] = (slots[None, :] >= (P - n_real)[:, None]) & (slots[None, :] < P)
    may_attend[B:, 0] = True
    step = StaticStep(model, cache, may_attend, graphs)

    rows = torch.arange(B, device=device)  # [b] the original row held by each live slot
    next_pos = n_real.clone()  # [b] position id of each live row's next token
    b = B
    for t in range(max_new_tokens):
        u = rollout.step_uniforms(t, rows, B, temperature, uniforms, generator)  # [b]
        tokens, logps = rollout.sample_tokens(logits[:b], temperature, top_k, top_p, u)  # [b] x2
        out.record(t, rows, tokens, logps)
        ended = stops.ended(out, t, rows, tokens)  # [b]
        if t == max_new_tokens - 1 or bool(ended.all()):
            break
        if ended.any():
            b = engine.swap_remove(ended, b, cache, may_attend, (rows, next_pos, tokens), P + t)
            rows, next_pos, tokens = rows[:b], next_pos[:b], tokens[:b]

        # the step's inputs, written into its fixed buffers
        step.tokens[:b, 0] = tokens
        step.positions[:b, 0] = next_pos
        step.slot.fill_(P + t)
        may_attend[:b, P + t] = True
        span = min(S_max, -(-(P + t + 1) // SPAN_MULTIPLE) * SPAN_MULTIPLE)
        logits = step.run(batch_size_for(b), span)  # [bucket, V]; rows :b are the live ones
        next_pos = next_pos + 1
    return out.rollout(input_ids)
