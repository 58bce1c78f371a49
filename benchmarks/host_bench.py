"""The host's time per decode step, outside the model: what a GPU waits for between steps.

A 3B model's decode step at batch 64 is about 2 ms of HBM time on an H100; whatever the host does
between steps (sampling's launches, recording tokens, finding rows that ended, decoding text for
stop strings, removing rows) adds to that unless the host runs ahead of the device. Here the model
is replaced by a stub that returns fixed logits (the tiny test model's vocabulary), so the time of a
generate call is the host's bookkeeping alone, per decode step:
  before  rollout.generate's loop, which the engine ran until it learned to run ahead: every step
          a look at every row (`ended.all()`, `ended.any()`, `nonzero().tolist()`: device-to-host
          syncs on a GPU) and, with stop strings, every live row's last tokens decoded to text;
  after   the engine's loop: the static path (the GPU's: a look every 8 steps, text decoded only for
          rows whose newest token may complete a stop string) and the dynamic one (the CPU's: a
          look every step, the same text rule).

    python -m benchmarks.host_bench                  # the table, batch 64 and 256
"""
import argparse
import contextlib
import time
from dataclasses import replace
from unittest import mock

import torch

import engine
import engine_forward
import model_zoo
import rollout
from benchmarks.measure import Part, row

STOP = ["</answer>"]


def stub_logits(vocab: int, rows: int, eos_id: int, seed: int = 0) -> torch.Tensor:
    """Fixed logits [rows, V]: every token possible, EOS drawn about once in 64 steps, so that
    rows end at different steps (as sampled responses do) within a 128-token budget."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    logits[:, eos_id] = logits.logsumexp(-1) - 4.15  # p(EOS) ~ 1/64
    return logits


def timed_generate(which: str, batch: int, stop, max_new_tokens: int, repeats: int):
    """(best seconds of a generate call, decode steps it took) for `which`: before | static |
    dynamic; the model's forwards replaced by the stub."""
    model, tok = model_zoo.load_tiny("qwen2")
    logits = stub_logits(model.config.vocab_size, max(batch, 512), tok.eos_token_id)

    def stub(model, ids, *args, **kwargs):  # the model's forward: fixed logits, no compute
        return logits[:ids.shape[0]]

    ids = torch.full((batch, 8), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    noise = torch.rand(batch, max_new_tokens, generator=torch.Generator().manual_seed(1))
    kw = dict(temperature=1.0, eos_token_id=tok.eos_token_id, stop_strings=stop, tokenizer=tok,
              uniforms=noise)
    if which == "before":
        stubs = [mock.patch.object(rollout, "decoder_forward", stub)]
        call = lambda: rollout.generate(model, ids, mask, max_new_tokens, **kw)  # noqa: E731
    else:
        settings = engine.STATIC if which == "static" else engine.DYNAMIC
        sampler = engine.Engine(model, replace(settings, graphs=False), max_rows=batch,
                                max_len=8 + max_new_tokens)
        # the decode steps' forward and the prefill's
        stubs = [mock.patch.object(engine, "forward_last", stub),
                 mock.patch.object(engine_forward, "forward_last", stub)]
        call = lambda: sampler.generate(ids, mask, max_new_tokens, **kw)  # noqa: E731
    with contextlib.ExitStack() as patched:
        for patch in stubs:
            patched.enter_context(patch)
        out = call()  # warm-up: the cache, the token table, the step's buffers
        best = min(timed(call) for _ in range(repeats))
    return best, int(out.response_mask.sum(1).max())


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def host_row(batch: int, stop, max_new_tokens: int = 128, repeats: int = 5) -> str:
    """bench.py's row of one batch size, with or without stop strings: host ms per decode step of
    the engine's static and dynamic paths, against before."""
    ms = {}
    for which in ("before", "static", "dynamic"):
        seconds, steps = timed_generate(which, batch, stop, max_new_tokens, repeats)
        ms[which] = 1000 * seconds / steps
    label = f"batch {batch}, {'stop at </answer>' if stop else 'EOS only'}"
    target = "; target <= 0.3 ms (static)" if stop and batch >= 256 else ""
    return row("host", f"decode bookkeeping per step, {label}: the engine, static (GPU's) / "
                       f"dynamic (CPU's)", f"{ms['static']:.3f} / {ms['dynamic']:.3f} ms",
               f"before (the per-step look): {ms['before']:.3f} ms "
               f"({ms['before'] / ms['static']:.1f}x){target}")


def host_rows(batches=(64, 256), max_new_tokens=128, repeats=5) -> list[str]:
    """Host ms per decode step, before and after, batch x stop strings."""
    return [host_row(batch, stop, max_new_tokens, repeats) for batch in batches
            for stop in (None, STOP)]


def parts(repeats: int) -> list[Part]:
    """bench.py's host section: one part a row (batch 64 and 256, with and without stop
    strings)."""
    return [Part("host", f"batch {batch}, {'stop strings' if stop else 'EOS only'}",
                 lambda batch=batch, stop=stop: [host_row(batch, stop, repeats=repeats)])
            for batch in (64, 256) for stop in (None, STOP)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="64,256")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print("\n".join(host_rows(batches, args.max_new_tokens, args.repeats)))


if __name__ == "__main__":
    main()
