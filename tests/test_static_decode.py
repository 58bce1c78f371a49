"""static_decode (the engine's static-shape decode step, replayed as CUDA graphs on a GPU) against
rollout.generate (the teaching core): the same tokens and log-probs (fp32, 1e-5) with rows leaving
at different steps, so that the step runs at batch sizes below, at and across the fixed sizes, and
over growing attention spans."""
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


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("rows", [3, 13, 26])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 0.9), (0.0, 0, 1.0)])
def test_static_decode_equals_the_teaching_core(arch, rows, temperature, top_k, top_p,
                                                monkeypatch):
    """13 and 26 rows start between fixed sizes (12/16, 24/32) and shrink through several of them as
    rows end; a span multiple of 16 makes the attention span grow several times in 40 steps."""
    monkeypatch.setattr(static_decode, "SPAN_MULTIPLE", 16)
    sizes = []
    step_forward = static_decode.StaticStep.forward

    def spy(self, bucket, span):
        sizes.append((bucket, span))
        return step_forward(self, bucket, span)

    monkeypatch.setattr(static_decode.StaticStep, "forward", spy)
    model, tok = qwen3_tiny() if arch == "qwen3" else tiny(arch, scale=3.0)
    ids, am = ragged_rows(tok, rows)
    P = ids.shape[1]
    noise = torch.rand(rows, 40, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, uniforms=noise)
    free = rollout.generate(model, ids, am, 40, eos_token_id=[], **kw)
    eos, _ = pick_eos(free.sequences[:, P:])
    plain = rollout.generate(model, ids, am, 40, eos_token_id=eos, **kw)
    static = engine.generate(model, ids, am, 40, eos_token_id=eos, decode="static", **kw)
    assert_same_rollout(static, plain)
    lengths = plain.response_mask.sum(1)
    assert len(set(lengths.tolist())) >= 2 and (lengths < 40).any()
    buckets = [bucket for bucket, _ in sizes]
    assert buckets == sorted(buckets, reverse=True)  # rows only leave
    assert all(bucket in static_decode.BATCH_SIZES for bucket in buckets)
    if rows > 3:
        assert len(set(buckets)) >= 2, buckets  # the step moved down to a smaller size
    assert len({span for _, span in sizes}) >= 2  # and its attention span grew


def test_static_decode_with_a_generator_and_stop_strings():
    model, tok = tiny("llama", scale=3.0)
    ids, am = encode(tok)
    P = ids.shape[1]
    kw = dict(temperature=1.0, top_p=0.9, eos_token_id=tok.eos_token_id)
    free = rollout.generate(model, ids, am, 30, generator=torch.Generator().manual_seed(1), **kw)
    text = tok.decode(free.sequences[3, P:P + int(free.response_mask[3].sum())])
    kw.update(stop_strings=[text[5:7], "never"], tokenizer=tok)
    static = engine.generate(model, ids, am, 30, generator=torch.Generator().manual_seed(1),
                             decode="static", **kw)
    plain = rollout.generate(model, ids, am, 30, generator=torch.Generator().manual_seed(1), **kw)
    assert plain.finish_reason[3] == "stop"
    assert_same_rollout(static, plain)


def test_batch_sizes():
    assert [static_decode.batch_size_for(n) for n in (1, 3, 12, 13, 64, 65, 512)] == \
        [1, 4, 12, 16, 64, 96, 512]
    assert static_decode.batch_size_for(600) == 600  # beyond the largest: the rows themselves


def test_bad_decode_choices_are_refused():
    model, tok = tiny()
    ids, am = encode(tok, ["abc", "de"])
    with pytest.raises(ValueError, match="decode="):
        engine.generate(model, ids, am, 4, decode="graphs")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        static_decode.generate(model, ids, am, 4, graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_graph_replay_equals_the_eager_static_step(dtype, monkeypatch):
    """The same static step, eager and replayed as CUDA graphs, on the same inputs: the same tokens,
    log-probs equal to float rounding; and the graphs were really captured and replayed."""
    monkeypatch.setattr(static_decode, "SPAN_MULTIPLE", 16)
    captured = []
    capture = static_decode.StaticStep.capture

    def spy(self, bucket, span):
        captured.append((bucket, span))
        return capture(self, bucket, span)

    monkeypatch.setattr(static_decode.StaticStep, "capture", spy)
    model, tok = tiny("llama", scale=3.0)
    model = model.to("cuda", dtype)
    ids, am = ragged_rows(tok, 26)
    ids, am = ids.cuda(), am.cuda()
    P = ids.shape[1]
    noise = torch.rand(26, 48, generator=torch.Generator().manual_seed(2)).cuda()
    kw = dict(temperature=1.0, uniforms=noise)
    free = static_decode.generate(model, ids, am, 48, eos_token_id=[], graphs=False, **kw)
    eos, _ = pick_eos(free.sequences[:, P:].cpu())
    eager = static_decode.generate(model, ids, am, 48, eos_token_id=eos, graphs=False, **kw)
    replay = static_decode.generate(model, ids, am, 48, eos_token_id=eos, graphs=True, **kw)
    assert len(set(captured)) >= 3
    assert torch.equal(replay.sequences, eager.sequences)
    assert replay.finish_reason == eager.finish_reason
    torch.testing.assert_close(replay.logprobs, eager.logprobs, atol=1e-5, rtol=0)
    if dtype == torch.float32:  # and, in fp32, the teaching core's samples
        assert_same_rollout(replay, rollout.generate(model, ids, am, 48, eos_token_id=eos, **kw))
