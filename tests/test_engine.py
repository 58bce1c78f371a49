"""engine.generate (the fast engine) against rollout.generate (the teaching core): the same tokens
and the same log-probs (fp32, 1e-5) through every speed path of the engine, with rows leaving the
batch at different steps; and the engine's paths one by one."""
import pytest
import torch
from test_rollout import PROMPTS, encode, full_forward_logprobs, pick_eos, tiny
from transformers import AutoModelForCausalLM, Qwen3Config

import engine
import rollout
from model_zoo import build_char_tokenizer


def qwen3_tiny(seed=0):
    """A random tiny Qwen3 (q_norm / k_norm before RoPE), with the character tokenizer."""
    tok = build_char_tokenizer()
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    return model, tok


def assert_same_rollout(fast, plain):
    assert torch.equal(fast.sequences, plain.sequences)
    assert torch.equal(fast.response_mask, plain.response_mask)
    assert fast.finish_reason == plain.finish_reason
    torch.testing.assert_close(fast.logprobs, plain.logprobs, atol=1e-5, rtol=0)


def both(model, ids, am, max_new, **kw):
    """The fast engine's rollout (with its keyword options) and the teaching core's."""
    options = {k: kw.pop(k) for k in ("prefill", "compact") if k in kw}
    return engine.generate(model, ids, am, max_new, **options, **kw), \
        rollout.generate(model, ids, am, max_new, **kw)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("prefill", ["grouped", "padded"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 0.9), (0.0, 0, 1.0)])
def test_engine_equals_the_teaching_core(arch, prefill, temperature, top_k, top_p):
    """Rows end (EOS) at different steps, so they leave the batch at different times; two prompts
    are repeated (the grouped prefill runs them once); batch sizes 8 and 3."""
    model, tok = qwen3_tiny() if arch == "qwen3" else tiny(arch, scale=3.0)
    ids, am = encode(tok, PROMPTS + PROMPTS[:2])
    P = ids.shape[1]
    noise = torch.rand(len(ids), 40, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    reference = rollout.generate(model, ids, am, 40, eos_token_id=[], uniforms=noise, **kw)
    eos, n_lengths = pick_eos(reference.sequences[:, P:])
    fast, plain = both(model, ids, am, 40, eos_token_id=eos, uniforms=noise, prefill=prefill, **kw)
    lengths = plain.response_mask.sum(1)
    assert len(set(lengths.tolist())) == n_lengths >= 2 and (lengths < 40).any()
    assert_same_rollout(fast, plain)
    fast, plain = both(model, ids[2:5], am[2:5], 40, eos_token_id=eos, uniforms=noise[2:5],
                       prefill=prefill, **kw)
    assert_same_rollout(fast, plain)


def test_engine_equals_the_teaching_core_with_a_generator_and_stop_strings():
    model, tok = tiny("llama", scale=3.0)
    ids, am = encode(tok)
    P = ids.shape[1]
    kw = dict(temperature=1.0, top_p=0.9, eos_token_id=tok.eos_token_id)
    free = rollout.generate(model, ids, am, 30, generator=torch.Generator().manual_seed(1), **kw)
    text = tok.decode(free.sequences[3, P:P + int(free.response_mask[3].sum())])
    kw.update(stop_strings=[text[5:7], "never"], tokenizer=tok)  # met by row 3, perhaps others
    fast = engine.generate(model, ids, am, 30, generator=torch.Generator().manual_seed(1), **kw)
    plain = rollout.generate(model, ids, am, 30, generator=torch.Generator().manual_seed(1), **kw)
    assert plain.finish_reason[3] == "stop"
    assert_same_rollout(fast, plain)


def test_per_row_decode_attention_is_exact(monkeypatch):
    """The per-row attention path (CPU, much padding, long rows) gives the same tokens and
    logprobs."""
    monkeypatch.setattr(engine, "PER_ROW_MIN_NUMBERS", 0)  # take it even for a tiny model
    used = []
    attend = engine.attend

    def spy(q, k, v, mask, scale):
        used.append(isinstance(mask, list))
        return attend(q, k, v, mask, scale)

    monkeypatch.setattr(engine, "attend", spy)
    model, tok = tiny("llama")
    ids, am = encode(tok)  # prompt lengths 1 .. 52: most of the batch's slots are padding
    model.generation_config.eos_token_id = None
    expected = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=24,
                              pad_token_id=tok.pad_token_id)
    out = engine.generate(model, ids, am, 24, temperature=0, eos_token_id=[],
                          pad_token_id=tok.pad_token_id)
    assert torch.equal(out.sequences, expected) and any(used)
    noise = torch.rand(len(ids), 24, generator=torch.Generator().manual_seed(1))
    fast, plain = both(model, ids, am, 24, temperature=0.8, eos_token_id=tok.eos_token_id,
                       uniforms=noise)
    assert_same_rollout(fast, plain)
    mask = fast.response_mask.bool()
    expected = full_forward_logprobs(model, fast, am, 0.8)
    assert torch.allclose(fast.logprobs[mask], expected[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_padded_prefill_equals_grouped_prefill(arch, monkeypatch):
    """prefill="padded" (one forward over the left-padded prompts, the GPU's path) fills the same
    cache as the grouped one: greedy tokens equal transformers' generate."""
    padded_calls = []
    inner = engine.prefill_padded

    def spy(*args):
        padded_calls.append(1)
        return inner(*args)

    monkeypatch.setattr(engine, "prefill_padded", spy)
    model, tok = tiny(arch)
    ids, am = encode(tok, PROMPTS + PROMPTS[:2])  # lengths 1 .. 52, two prompts repeated (run once)
    model.generation_config.eos_token_id = None
    expected = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=16,
                              pad_token_id=tok.pad_token_id)
    for prefill in ("padded", "grouped"):
        out = engine.generate(model, ids, am, 16, temperature=0, eos_token_id=[],
                              pad_token_id=tok.pad_token_id, prefill=prefill)
        assert torch.equal(out.sequences, expected), prefill
    assert len(padded_calls) == 1  # prefill="padded" took its own path, and only when asked
    with pytest.raises(ValueError, match="prefill="):
        engine.generate(model, ids, am, 4, prefill="bucketed")


def test_decode_attention_accepts_any_output_layout(monkeypatch):
    """An SDPA kernel may return its output in another memory layout (CUDA's memory-efficient kernel
    does); the decode step must not assume a contiguous one. Simulated on the CPU."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def strided_sdpa(q, k, v, **kw):  # same values, transposed memory: not viewable as [b, H, 1, d]
        out = sdpa(q, k, v, **kw)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    model, tok = tiny()
    ids, am = encode(tok)
    model.generation_config.eos_token_id = None
    expected = engine.generate(model, ids, am, 12, temperature=0, eos_token_id=[])
    monkeypatch.setattr(engine.F, "scaled_dot_product_attention", strided_sdpa)
    out = engine.generate(model, ids, am, 12, temperature=0, eos_token_id=[])
    assert torch.equal(out.sequences, expected.sequences)


def test_swap_remove_compaction_does_not_change_results():
    model, tok = tiny(scale=3.0)
    ids, am = encode(tok)
    P = ids.shape[1]

    def sample(eos, compact=True):
        return engine.generate(model, ids, am, 64, temperature=1.0, top_p=0.95, eos_token_id=eos,
                               generator=torch.Generator().manual_seed(7), compact=compact)

    eos, n_lengths = pick_eos(sample([]).sequences[:, P:])  # ends rows at different steps
    assert n_lengths >= 3
    outs = [sample(eos, compact) for compact in (True, False)]
    assert len(set(outs[0].response_mask.sum(1).tolist())) == n_lengths
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert torch.equal(outs[0].response_mask, outs[1].response_mask)
    assert outs[0].finish_reason == outs[1].finish_reason
    assert torch.allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-6)


def test_a_prompt_with_no_real_token_is_refused():
    model, tok = tiny()
    ids, am = encode(tok, ["abc", "de"])
    am[1] = 0
    with pytest.raises(ValueError, match="at least one real token"):
        engine.generate(model, ids, am, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_engine_equals_the_teaching_core():
    """On a GPU (fp32 weights, padded prefill, no cuDNN attention): the same samples."""
    model, tok = tiny("llama", scale=3.0)
    model = model.cuda()
    ids, am = encode(tok)
    noise = torch.rand(len(ids), 32, generator=torch.Generator().manual_seed(2))
    fast, plain = both(model, ids.cuda(), am.cuda(), 32, temperature=1.0,
                       eos_token_id=tok.eos_token_id, uniforms=noise.cuda())
    assert_same_rollout(fast, plain)
