"""The engine's static-shape decode step (static_decode.py; what a GPU replays as CUDA graphs), on
the CPU: its samples equal the teaching core's (fp32, 1e-5) with rows leaving at different steps, so
that the step runs at batch sizes below, at and across the fixed sizes over growing spans; it is
built once for a run and each of its shapes prepared once however many calls the run makes; the
exact callable a CUDA graph records traces as one graph with no break and no host sync; compiled
by Inductor it computes what it computes eagerly."""
from dataclasses import replace

import pytest
import torch
from test_engine import assert_same_rollout, qwen3_tiny
from test_rollout import PROMPTS, encode, pick_eos, tiny

import engine
import rollout
import static_decode


def ragged_rows(tok, n):
    """n distinct left-padded prompts of lengths 2 .. 55 (PROMPTS, numbered)."""
    return encode(tok, [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(n)])


def spy_on_shapes(monkeypatch):
    """The (rows, span) of every static step run, in order."""
    shapes = []
    run = static_decode.StaticStep.run

    def spy(self, rows, span):
        shapes.append((rows, span))
        return run(self, rows, span)

    monkeypatch.setattr(static_decode.StaticStep, "run", spy)
    return shapes


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("rows", [3, 13, 26])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 0.9), (0.0, 0, 1.0)])
def test_static_decode_equals_the_teaching_core(arch, rows, temperature, top_k, top_p,
                                                monkeypatch):
    """13 and 26 rows start between fixed sizes (12/16, 24/32) and shrink through several of them as
    rows end; a span multiple of 16 makes the attention span grow several times in 40 steps."""
    monkeypatch.setattr(static_decode, "SPAN_MULTIPLE", 16)
    shapes = spy_on_shapes(monkeypatch)
    model, tok = qwen3_tiny() if arch == "qwen3" else tiny(arch, scale=3.0)
    ids, am = ragged_rows(tok, rows)
    P = ids.shape[1]
    noise = torch.rand(rows, 40, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, uniforms=noise)
    free = rollout.generate(model, ids, am, 40, eos_token_id=[], **kw)
    eos, _ = pick_eos(free.sequences[:, P:])
    plain = rollout.generate(model, ids, am, 40, eos_token_id=eos, **kw)
    static = engine.generate(model, ids, am, 40, engine.STATIC, eos_token_id=eos, **kw)
    assert_same_rollout(static, plain)
    lengths = plain.response_mask.sum(1)
    assert len(set(lengths.tolist())) >= 2 and (lengths < 40).any()
    buckets = [bucket for bucket, _ in shapes]
    assert buckets == sorted(buckets, reverse=True)  # rows only leave
    assert all(bucket in static_decode.BATCH_SIZES for bucket in buckets)
    if rows > 3:
        assert len(set(buckets)) >= 2, buckets  # the step moved down to a smaller size
    assert len({span for _, span in shapes}) >= 2  # and its attention span grew


def test_batch_sizes_and_spans():
    assert [static_decode.batch_size_for(n) for n in (1, 3, 12, 13, 64, 65, 512)] == \
        [1, 4, 12, 16, 64, 96, 512]
    assert static_decode.batch_size_for(600) == 600  # beyond the largest: the rows themselves
    assert [static_decode.span_for(n, 600) for n in (1, 256, 257, 599)] == [256, 256, 512, 600]


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="choose dynamic, static or auto"):
        engine.settings_for("graphs", "cpu")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        static_decode.StaticStep(None, 4, 16, "cpu", graphs=True)
    assert engine.settings_for("auto", "cpu") == engine.DYNAMIC
    assert engine.settings_for("static", "cpu") == engine.STATIC  # no graphs without CUDA
    assert engine.settings_for("auto", "cuda").graphs


def test_one_static_step_for_the_run_each_shape_prepared_once(monkeypatch):
    """A run's engine samples many times (every training step, every held-out evaluation, with
    other prompts, rows and lengths): it builds its static step once, prepares (on a GPU:
    captures) each (rows, span) once, and every call still equals the teaching core."""
    monkeypatch.setattr(static_decode, "SPAN_MULTIPLE", 16)
    model, tok = tiny("qwen2", scale=3.0)
    sampler = engine.Engine(model, engine.STATIC, max_rows=16, max_len=64 + 40)
    calls = [(ragged_rows(tok, 13), 40), (ragged_rows(tok, 16), 24), (encode(tok, PROMPTS[:5]), 40),
             (ragged_rows(tok, 13), 40)]
    for i, ((ids, am), max_new) in enumerate(calls):
        noise = torch.rand(len(ids), max_new, generator=torch.Generator().manual_seed(i))
        kw = dict(temperature=1.0, uniforms=noise, eos_token_id=tok.eos_token_id)
        assert_same_rollout(sampler.generate(ids, am, max_new, **kw),
                            rollout.generate(model, ids, am, max_new, **kw))
        if i == 0:
            first_shapes = list(sampler.static.shapes_built)
    assert sampler.static_steps_built == 1
    shapes = sampler.static.shapes_built
    assert len(shapes) == len(set(shapes))  # never prepared twice
    assert shapes[:len(first_shapes)] == first_shapes
    assert sampler.generate(ids, am, 40, **kw) is not None and sampler.static_steps_built == 1


def test_a_call_larger_than_the_run_said_grows_the_cache_and_builds_the_step_again():
    model, tok = tiny("llama", scale=3.0)
    sampler = engine.Engine(model, engine.STATIC, max_rows=4, max_len=16)
    ids, am = ragged_rows(tok, 6)
    kw = dict(temperature=0.0, eos_token_id=[])
    assert_same_rollout(sampler.generate(ids, am, 8, **kw),
                        rollout.generate(model, ids, am, 8, **kw))
    assert sampler.static_steps_built == 1 and sampler.rows == 8
    assert sampler.max_len == ids.shape[1] + 8


def static_step_of(model, tok, rows=13):
    """An engine's static step after one call, with its buffers as the last step left them."""
    sampler = engine.Engine(model, engine.STATIC)
    ids, am = ragged_rows(tok, rows)
    sampler.generate(ids, am, 6, temperature=0.0, eos_token_id=[])
    return sampler.static, static_decode.batch_size_for(rows), static_decode.span_for(
        ids.shape[1] + 6, sampler.max_len)


def test_the_callable_a_cuda_graph_records_has_no_graph_break_and_no_host_sync():
    """torch.compile(fullgraph=True) refuses a graph break, and a host sync (.item(), .tolist(),
    nonzero's data-dependent shape, a Python branch on a tensor) is one: the exact callable that
    StaticStep.capture records traces as a single graph, for every architecture."""
    for model, tok in (tiny("qwen2"), tiny("llama"), qwen3_tiny()):
        static, rows, span = static_step_of(model, tok)
        explained = torch._dynamo.explain(static.step)(rows, span)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, \
            explained.break_reasons
        ops = {getattr(node.target, "__name__", node.target)
               for graph in explained.graphs for node in graph.graph.nodes}
        assert not ops & {"item", "tolist", "nonzero", "cpu", "numpy", "_local_scalar_dense"}
        traced = torch.compile(static.step, fullgraph=True, backend="eager")
        torch.testing.assert_close(traced(rows, span), static.step(rows, span), atol=1e-6, rtol=0)
        torch._dynamo.reset()


@pytest.mark.slow
def test_the_inductor_compiled_step_equals_the_eager_one():
    """--compile_decode: the static step compiled by Inductor before its capture (on the CPU its
    C++ kernels) gives the eager step's logits, for the tiniest model at one shape."""
    model, tok = tiny("qwen2")
    static, rows, span = static_step_of(model, tok, rows=4)
    eager = static.step(rows, span).clone()
    compiled = static_decode.StaticStep(static.model_step, static.capacity, static.max_len, "cpu",
                                        compile_step=True)
    for name in ("tokens", "positions", "slot", "may_attend"):
        getattr(compiled, name).copy_(getattr(static, name))
    torch.testing.assert_close(compiled.run(rows, span), eager, atol=1e-5, rtol=0)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_graph_replay_equals_the_eager_static_step(dtype, monkeypatch):
    """The same static step, eager and replayed as CUDA graphs, on the same inputs: the same tokens,
    log-probs equal to float rounding; and the graphs were really captured and replayed."""
    monkeypatch.setattr(static_decode, "SPAN_MULTIPLE", 16)
    captured = []
    capture = static_decode.StaticStep.capture

    def spy(self, rows, span):
        captured.append((rows, span))
        return capture(self, rows, span)

    monkeypatch.setattr(static_decode.StaticStep, "capture", spy)
    model, tok = tiny("llama", scale=3.0)
    model = model.to("cuda", dtype)
    ids, am = ragged_rows(tok, 26)
    ids, am = ids.cuda(), am.cuda()
    P = ids.shape[1]
    noise = torch.rand(26, 48, generator=torch.Generator().manual_seed(2)).cuda()
    kw = dict(temperature=1.0, uniforms=noise)
    eager_settings = replace(engine.STATIC, graphs=False)
    free = engine.generate(model, ids, am, 48, eager_settings, eos_token_id=[], **kw)
    eos, _ = pick_eos(free.sequences[:, P:].cpu())
    eager = engine.generate(model, ids, am, 48, eager_settings, eos_token_id=eos, **kw)
    replay = engine.generate(model, ids, am, 48, engine.settings_for("static", "cuda"),
                             eos_token_id=eos, **kw)
    assert len(set(captured)) >= 3
    assert torch.equal(replay.sequences, eager.sequences)
    assert replay.finish_reason == eager.finish_reason
    torch.testing.assert_close(replay.logprobs, eager.logprobs, atol=1e-5, rtol=0)
    if dtype == torch.float32:  # and, in fp32, the teaching core's samples
        assert_same_rollout(replay, rollout.generate(model, ids, am, 48, eos_token_id=eos, **kw))
