"""engine.generate (the fast engine) against rollout.generate (the teaching core): the same tokens
and the same log-probs (fp32, 1e-5) through every code path of the engine (dynamic and static
decode, grouped and padded prefill, the CPU layout or not, the host looking every step or every few
steps), with rows leaving the batch at different steps; the engine's paths one by one; and the
engine of a bf16 run: its own weights and KV cache in bf16."""
from dataclasses import replace

import pytest
import torch
from test_rollout import PROMPTS, encode, full_forward_logprobs, pick_eos, tiny
from transformers import AutoModelForCausalLM, Qwen3Config

import engine
import engine_forward
import rollout
from model import token_logprobs
from model_zoo import build_char_tokenizer

# Every combination the trainers' --engine and the module's settings reach, GPU's included.
PATHS = {"dynamic": engine.DYNAMIC, "static": engine.STATIC,
         "dynamic-padded-look8": replace(engine.DYNAMIC, prefill="padded", check_every=8),
         "static-grouped-cpu-layout": replace(engine.STATIC, prefill="grouped", cpu_layout=True,
                                              check_every=1)}


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


def both(model, ids, am, max_new, settings=engine.DYNAMIC, **kw):
    """The fast engine's rollout (with these settings) and the teaching core's."""
    return engine.generate(model, ids, am, max_new, settings=settings, **kw), \
        rollout.generate(model, ids, am, max_new, **kw)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 0.9), (0.0, 0, 1.0)])
def test_engine_equals_the_teaching_core(arch, path, temperature, top_k, top_p):
    """Rows end (EOS) at different steps, so they leave the batch at different times; two prompts
    are repeated (the grouped prefill runs them once); batch sizes 8 and 3."""
    model, tok = qwen3_tiny() if arch == "qwen3" else tiny(arch, scale=3.0)
    ids, am = encode(tok, PROMPTS + PROMPTS[:2])
    P = ids.shape[1]
    noise = torch.rand(len(ids), 40, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    reference = rollout.generate(model, ids, am, 40, eos_token_id=[], uniforms=noise, **kw)
    eos, n_lengths = pick_eos(reference.sequences[:, P:])
    fast, plain = both(model, ids, am, 40, PATHS[path], eos_token_id=eos, uniforms=noise, **kw)
    lengths = plain.response_mask.sum(1)
    assert len(set(lengths.tolist())) == n_lengths >= 2 and (lengths < 40).any()
    assert_same_rollout(fast, plain)
    fast, plain = both(model, ids[2:5], am[2:5], 40, PATHS[path], eos_token_id=eos,
                       uniforms=noise[2:5], **kw)
    assert_same_rollout(fast, plain)


@pytest.mark.parametrize("path", PATHS)
def test_engine_equals_the_teaching_core_with_a_generator_and_stop_strings(path):
    model, tok = tiny("llama", scale=3.0)
    ids, am = encode(tok)
    P = ids.shape[1]
    kw = dict(temperature=1.0, top_p=0.9, eos_token_id=tok.eos_token_id)
    free = rollout.generate(model, ids, am, 30, generator=torch.Generator().manual_seed(1), **kw)
    text = tok.decode(free.sequences[3, P:P + int(free.response_mask[3].sum())])
    kw.update(stop_strings=[text[5:7], "never"], tokenizer=tok)  # met by row 3, perhaps others
    fast = engine.generate(model, ids, am, 30, settings=PATHS[path],
                           generator=torch.Generator().manual_seed(1), **kw)
    plain = rollout.generate(model, ids, am, 30, generator=torch.Generator().manual_seed(1), **kw)
    assert plain.finish_reason[3] == "stop"
    assert_same_rollout(fast, plain)


def test_per_row_decode_attention_is_exact(monkeypatch):
    """The per-row attention path (CPU, much padding, long rows) gives the same tokens and
    logprobs."""
    monkeypatch.setattr(engine, "PER_ROW_MIN_NUMBERS", 0)  # take it even for a tiny model
    used = []
    attend = engine_forward.attend

    def spy(q, k, v, mask, scale):
        used.append(isinstance(mask, list))
        return attend(q, k, v, mask, scale)

    monkeypatch.setattr(engine_forward, "attend", spy)
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
    inner = engine_forward.prefill_padded

    def spy(*args):
        padded_calls.append(1)
        return inner(*args)

    monkeypatch.setattr(engine_forward, "prefill_padded", spy)
    model, tok = tiny(arch)
    ids, am = encode(tok, PROMPTS + PROMPTS[:2])  # lengths 1 .. 52, two prompts repeated (run once)
    model.generation_config.eos_token_id = None
    expected = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=16,
                              pad_token_id=tok.pad_token_id)
    for prefill in ("padded", "grouped"):
        out = engine.generate(model, ids, am, 16, replace(engine.DYNAMIC, prefill=prefill),
                              temperature=0, eos_token_id=[], pad_token_id=tok.pad_token_id)
        assert torch.equal(out.sequences, expected), prefill
    assert len(padded_calls) == 1  # prefill="padded" took its own path, and only when asked
    with pytest.raises(ValueError, match="prefill="):
        engine.generate(model, ids, am, 4, replace(engine.DYNAMIC, prefill="bucketed"))


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
    monkeypatch.setattr(engine_forward.F, "scaled_dot_product_attention", strided_sdpa)
    out = engine.generate(model, ids, am, 12, temperature=0, eos_token_id=[])
    assert torch.equal(out.sequences, expected.sequences)


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_how_often_the_host_looks_does_not_change_results(path, monkeypatch):
    """The host learns which rows ended every step, every 8 steps or only at the end (rows that
    ended decode on until then): the same samples, stop reasons and log-probs; and the rows that
    ended leave the decode batch at the first look after their end."""
    rows_decoded = []  # per decode step: the rows it decodes
    step_class = engine.DynamicStep if path == "dynamic" else engine.StaticDecode
    step = step_class.__call__

    def spy(self, tokens, positions, t):
        rows_decoded.append(len(tokens))
        return step(self, tokens, positions, t)

    monkeypatch.setattr(step_class, "__call__", spy)
    model, tok = tiny(scale=3.0)
    ids, am = encode(tok)
    P = ids.shape[1]

    def sample(eos, check_every):
        rows_decoded.clear()
        return engine.generate(model, ids, am, 64, replace(PATHS[path], check_every=check_every),
                               temperature=1.0, top_p=0.95, eos_token_id=eos,
                               generator=torch.Generator().manual_seed(7))

    eos, n_lengths = pick_eos(sample([], 1).sequences[:, P:])  # ends rows at different steps
    assert n_lengths >= 3
    for check_every in (1, 8, 64):
        out = sample(eos, check_every)
        if check_every == 1:
            first = out
        assert_same_rollout(out, first)
        lengths = out.response_mask.sum(1)
        # decode step t feeds the token sampled at step t; a row ending at step e (length e + 1)
        # leaves at the first look at or after e: a look follows steps check_every - 1, ...
        for t, rows in enumerate(rows_decoded):
            looked = (t + 1) // check_every * check_every - 1  # the last step looked at
            live = int((lengths > looked + 1).sum()) if looked >= 0 else len(lengths)
            assert rows == live, (check_every, t, rows, live)


def test_the_engine_of_a_bf16_run_holds_bf16_weights_and_cache_and_matches_a_training_forward(
        monkeypatch):
    """Under autocast (a bf16 run in one process) the sampler's weights and KV cache are bf16, in
    the dynamic and the static decode alike, for llama and qwen2 (which has q/k/v biases): this
    crashed before (an fp32 cache written with bf16 keys); its log-probs agree with a bf16 training
    forward of the same tokens to bf16 precision (the sampler gap the trainer logs)."""
    allocated = []  # the dtype of every KV cache the engine allocates
    allocate = rollout.KVCache.allocate

    def recording(*args, **kwargs):
        cache = allocate(*args, **kwargs)
        allocated.append(cache.keys[0].dtype)
        return cache

    monkeypatch.setattr(rollout.KVCache, "allocate", staticmethod(recording))
    for arch in ("llama", "qwen2"):
        model, tok = tiny(arch, scale=3.0)
        ids, am = encode(tok)
        noise = torch.rand(len(ids), 24, generator=torch.Generator().manual_seed(5))
        for path in PATHS.values():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sampler = engine.Engine(model, path, dtype=torch.bfloat16, share_weights=False)
                sampler.load_weights(model.named_parameters())
                out = sampler.generate(ids, am, 24, eos_token_id=tok.eos_token_id, uniforms=noise)
                assert allocated and set(allocated) == {torch.bfloat16}, (arch, path, allocated)
                allocated.clear()
                assert next(sampler.model.parameters()).dtype == torch.bfloat16
                mask = torch.cat([am, out.response_mask], 1)
                train = token_logprobs(model, out.sequences, mask, out.response_mask.shape[1])
            gap = (train - out.logprobs).abs()[out.response_mask.bool()]
            assert gap.mean() < 0.05 and gap.max() < 0.5, (arch, path, gap.mean(), gap.max())


def test_load_weights_writes_in_place_and_refuses_unknown_or_missing_names():
    model, tok = tiny()
    sampler = engine.Engine(model, engine.STATIC, dtype=torch.float32, share_weights=False)
    before = {n: p.data_ptr() for n, p in sampler.model.named_parameters()}
    sampler.load_weights(model.named_parameters())
    assert {n: p.data_ptr() for n, p in sampler.model.named_parameters()} == before
    for name, p in model.named_parameters():
        assert torch.equal(sampler.model.get_parameter(name), p), name
    with pytest.raises(KeyError, match="no parameter"):
        sampler.load_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(KeyError, match="no weights given"):
        sampler.load_weights(list(model.named_parameters())[1:])


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
    for path in PATHS.values():
        fast, plain = both(model, ids.cuda(), am.cuda(), 32, path, temperature=1.0,
                           eos_token_id=tok.eos_token_id, uniforms=noise.cuda())
        assert_same_rollout(fast, plain)
