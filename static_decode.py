"""The engine's static-shape decode step: the same shapes every step, so a GPU can replay it.

On a GPU a decode step is a few hundred small kernels per layer stack; launched one by one from
Python they cost more than they compute (the step is host-bound). A CUDA graph records the step's
kernels once and replays them with one launch, but only if every replay reads the same shapes at
the same memory addresses. `StaticStep` makes the decode step so:
  - The step's inputs live in fixed buffers, kept for the whole run: the token each row decodes
    and its position id, the cache slot being written (a tensor, so that no Python number is baked
    into the graph), and the mask of the slots each row may attend to.
  - It runs on `rows`, the smallest size in BATCH_SIZES that holds the live rows, and attends to
    `span` slots, the filled ones rounded up to SPAN_MULTIPLE: one graph per (rows, span),
    captured the first time it is needed and replayed for the rest of the run. Rows beyond the
    live ones compute values nobody reads (the engine keeps one slot of theirs open, so they stay
    finite).
  - Optionally the step is compiled by Inductor before it is captured (gpt-fast's recipe: fused
    kernels, then one graph of them).
What the step computes is the engine's (engine.py passes its model step in): this module knows
buffers and graphs, not models. The same step runs eagerly on the CPU, where the tests check it.
"""
from __future__ import annotations

import warnings

import torch

# The row counts a step runs at (vLLM captures the same: powers of two and the midpoints).
BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# A step attends to the filled cache slots rounded up to a multiple of this (or the whole cache):
# few graphs, and at most this many masked slots read in vain.
SPAN_MULTIPLE = 256


def batch_size_for(rows: int) -> int:
    """The smallest size in BATCH_SIZES that holds `rows` rows (beyond the largest: rows itself)."""
    return next((size for size in BATCH_SIZES if size >= rows), rows)


def span_for(filled: int, max_len: int) -> int:
    """The slots a step attends to when `filled` are written: rounded up to SPAN_MULTIPLE."""
    return min(max_len, -(-filled // SPAN_MULTIPLE) * SPAN_MULTIPLE)


class StaticStep:
    """One decode step at fixed shapes, run eagerly, compiled, or replayed as CUDA graphs.

    model_step(tokens [n, 1], positions [n, 1], slot [1], may_attend [n, 1, 1, span], n, span) ->
    float32 logits [n, V]: the engine's forward of one new token per row over its KV cache, writing
    the new keys and values at `slot`. Buffers (capacity C rows, max_len S slots):
      tokens [C, 1], positions [C, 1] long: each row's new token and its position id
      slot [1] long: the cache slot this step writes
      may_attend [C, S] bool: the slots each row may attend to
    """

    def __init__(self, model_step, capacity: int, max_len: int, device, graphs=False,
                 compile_step=False):
        if graphs and torch.device(device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.capacity, self.max_len = capacity, max_len
        self.tokens = torch.zeros(capacity, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(capacity, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.may_attend = torch.zeros(capacity, max_len, dtype=torch.bool, device=device)
        # fullgraph: a graph break would split the step into pieces run from Python again
        self.model_step = torch.compile(model_step, fullgraph=True) if compile_step else model_step
        self.graphs = {} if graphs else None  # (rows, span) -> (the CUDAGraph, its logits)
        self.pool = torch.cuda.graph_pool_handle() if graphs else None  # one pool for all
        self.shapes_built = []  # every (rows, span) prepared: captured, or first run eagerly

    def step(self, rows: int, span: int) -> torch.Tensor:
        """The exact callable a CUDA graph records: the model step over the buffers' first `rows`
        rows and `span` slots. Logits [rows, V]."""
        mask = self.may_attend[:rows, None, None, :span]  # [rows, 1, 1, span]
        return self.model_step(self.tokens[:rows], self.positions[:rows], self.slot, mask, rows,
                               span)

    def run(self, rows: int, span: int) -> torch.Tensor:
        """The step's logits [rows, V] (float32): replayed from its graph, captured on first use."""
        if (rows, span) not in self.shapes_built:
            self.shapes_built.append((rows, span))
            if self.graphs is not None:
                self.try_capture(rows, span)
        if self.graphs is None:
            return self.step(rows, span)
        graph, logits = self.graphs[(rows, span)]
        graph.replay()
        return logits

    def try_capture(self, rows: int, span: int):
        try:
            self.graphs[(rows, span)] = self.capture(rows, span)
        except RuntimeError as error:
            # the same step runs eagerly: the samples stay the same, only the speed is lost
            warnings.warn(f"static_decode: CUDA graph capture failed ({error}); the decode step "
                          f"runs eagerly from now on", stacklevel=3)
            self.graphs = None

    def capture(self, rows: int, span: int):
        """Record the step as a CUDA graph. The warm-up runs on a side stream (as PyTorch's docs
        ask; it also triggers any compilation) and computes the step itself: writing this step's
        keys and values twice is harmless."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(rows, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.step(rows, span)
        return graph, logits
