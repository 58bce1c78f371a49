"""rollout.generate (the teaching core) and engine.generate (the fast engine), each: exact against
transformers' generate and a full forward pass, correct sampling and stopping. tests/test_engine.py
checks the two against each other, and the engine's own paths."""
import string

import pytest
import torch

import engine
import rollout
from model import token_logprobs
from model_zoo import load_tiny
from rollout import cut_after_stop, filter_logits

PROMPTS = ["Hello there, how are", "Q: 2+2?",
           "A much longer prompt about medicine and other things", "x", "abc", "The patient"]
GENERATORS = {"rollout": rollout.generate, "engine": engine.generate}


@pytest.fixture(params=sorted(GENERATORS))
def generate(request):
    """Each test below runs once with the teaching core and once with the fast engine."""
    return GENERATORS[request.param]


def tiny(arch="qwen2", seed=1, scale=8.0):
    """A tiny random model whose weights are scaled up, so its greedy text varies and EOS and tags
    occur in it."""
    model, tok = load_tiny(arch, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    return model, tok


def encode(tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)  # left padded
    return enc["input_ids"], enc["attention_mask"]


def full_forward_logprobs(model, out, attention_mask, temperature=1.0):
    """What the PPO trainer computes: one forward over the final sequences, prompt+response mask."""
    mask = torch.cat([attention_mask, out.response_mask], dim=1)  # [B, P+T]
    T = out.response_mask.shape[1]
    return token_logprobs(model, out.sequences, mask, T, temperature=temperature)


def pick_eos(responses):
    """The token whose first occurrences end the rows of `responses` [B, T] at the most different
    steps. Used as EOS, it makes rows leave the batch early and at different times."""
    B, T = responses.shape
    best, best_score = None, 0
    for token in responses.unique().tolist():
        hit = responses == token  # [B, T]
        first = torch.where(hit.any(1), hit.float().argmax(1), torch.full((B,), T))  # [B]
        score = len(set(first.tolist()))
        if score > best_score:
            best, best_score = token, score
    return best, best_score


def first_stop(text_of, tokens, stops):
    """Oracle: index of the first token after which the decoded response contains a stop string."""
    for k in range(len(tokens)):
        if any(s in text_of(tokens[:k + 1]) for s in stops):
            return k
    return None


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_matches_transformers_generate(arch, generate):
    model, tok = tiny(arch)
    ids, am = encode(tok)
    P = ids.shape[1]
    # without EOS every row runs to max_new_tokens
    model.generation_config.eos_token_id = None  # (generate would fall back to it when given None)
    expected = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=40,
                              pad_token_id=tok.pad_token_id)
    out = generate(model, ids, am, 40, temperature=0, eos_token_id=[],
                   pad_token_id=tok.pad_token_id)
    assert torch.equal(out.sequences, expected)
    assert out.finish_reason == ["length"] * len(PROMPTS) and out.response_mask.all()
    # with an EOS that really occurs, rows end (and leave the batch) at different steps
    eos, n_lengths = pick_eos(out.sequences[:, P:])
    assert n_lengths >= 3
    expected = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=40,
                              eos_token_id=eos, pad_token_id=tok.pad_token_id)
    out = generate(model, ids, am, 40, temperature=0, eos_token_id=eos,
                   pad_token_id=tok.pad_token_id)
    assert torch.equal(out.sequences, expected)
    lengths = out.response_mask.sum(1)  # [B]
    assert len(set(lengths.tolist())) == n_lengths
    for row, reason in enumerate(out.finish_reason):
        ended_on_eos = out.sequences[row, P + lengths[row] - 1].item() == eos
        assert reason == ("eos" if ended_on_eos else "length")
        assert ended_on_eos or lengths[row] == 40


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.95),
                                                     (0.0, 0, 1.0)])
def test_logprobs_equal_one_full_forward(arch, temperature, top_k, top_p, generate):
    model, tok = tiny(arch, scale=3.0)
    ids, am = encode(tok)
    g = torch.Generator().manual_seed(0)
    out = generate(model, ids, am, 48, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_token_id=tok.eos_token_id, generator=g)
    expected = full_forward_logprobs(model, out, am, temperature)  # temperature 0 -> raw softmax
    mask = out.response_mask.bool()
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == out.response_mask.shape
    assert torch.allclose(out.logprobs[mask], expected[mask], atol=1e-5, rtol=0)
    # and the same from transformers' own forward, position ids = cumsum(mask) - 1
    full_mask = torch.cat([am, out.response_mask], dim=1)  # [B, P+T]
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(out.sequences, attention_mask=full_mask, position_ids=positions).logits
    logits = logits[:, ids.shape[1] - 1:-1]  # [B, T, V]
    sampled = out.sequences[:, ids.shape[1]:, None]
    plain = (logits / (temperature or 1.0)).log_softmax(-1).gather(-1, sampled)[..., 0]
    assert torch.allclose(out.logprobs[mask], plain[mask], atol=1e-5, rtol=0)
    assert (out.logprobs[~mask] == 0).all()
    # the response is right padded with pad_token_id after the row ended
    tail = out.sequences[:, ids.shape[1]:][~mask]
    assert (tail == tok.pad_token_id).all()


def test_same_seed_same_samples_different_seed_different(generate):
    model, tok = tiny(scale=2.0)
    ids, am = encode(tok)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, ids, am, 24, temperature=1.0, generator=g).sequences

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_given_uniforms_a_row_samples_the_same_in_any_batch(generate):
    """With per-row noise `uniforms` [B, T], a row's response does not depend on the other rows in
    its batch."""
    model, tok = tiny(scale=2.0)
    ids, am = encode(tok)
    noise = torch.rand(len(PROMPTS), 32, generator=torch.Generator().manual_seed(5))  # [B, T]
    full = generate(model, ids, am, 32, eos_token_id=tok.eos_token_id, uniforms=noise)
    pick = [4, 1]
    sub_ids, sub_am = encode(tok, [PROMPTS[i] for i in pick])  # a narrower padding width, too
    part = generate(model, sub_ids, sub_am, 32, eos_token_id=tok.eos_token_id, uniforms=noise[pick])
    for j, i in enumerate(pick):
        n = int(full.response_mask[i].sum())
        assert int(part.response_mask[j].sum()) == n
        alone = part.sequences[j, sub_ids.shape[1]:][:n]
        assert torch.equal(alone, full.sequences[i, ids.shape[1]:][:n])


def test_rows_leaving_the_batch_do_not_change_the_others(generate):
    """Rows end (EOS) at different steps and leave the batch; every row is what it is when sampled
    alone, with the same noise: the same tokens, the same log-probs."""
    model, tok = tiny(scale=3.0)
    ids, am = encode(tok)
    P = ids.shape[1]
    noise = torch.rand(len(PROMPTS), 64, generator=torch.Generator().manual_seed(7))
    kw = dict(temperature=1.0, top_p=0.95, uniforms=noise)
    eos, n_lengths = pick_eos(generate(model, ids, am, 64, eos_token_id=[], **kw).sequences[:, P:])
    assert n_lengths >= 3
    batch = generate(model, ids, am, 64, eos_token_id=eos, **kw)
    assert len(set(batch.response_mask.sum(1).tolist())) == n_lengths
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_am = encode(tok, [prompt])
        alone = generate(model, one_ids, one_am, 64, eos_token_id=eos, temperature=1.0, top_p=0.95,
                         uniforms=noise[i:i + 1])
        n = int(batch.response_mask[i].sum())
        assert int(alone.response_mask[0].sum()) == n
        assert alone.finish_reason[0] == batch.finish_reason[i]
        assert torch.equal(alone.sequences[0, one_ids.shape[1]:][:n], batch.sequences[i, P:P + n])
        assert torch.allclose(alone.logprobs[0, :n], batch.logprobs[i, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 6, 0.8)])
def test_sample_frequencies_match_softmax(temperature, top_k, top_p, generate):
    """Many one-token generations from one prompt: token frequencies match softmax(filter(logits /
    T))."""
    model, tok = tiny(scale=1.5)
    n = 20000
    ids, am = encode(tok, ["The patient"])
    logits = model(ids, attention_mask=am).logits[0, -1].detach().float()  # [V]
    probs = filter_logits((logits / temperature)[None], top_k, top_p).softmax(-1)[0]  # [V]
    out = generate(model, ids.expand(n, -1), am.expand(n, -1), 1, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_token_id=[],
                   generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out.sequences[:, -1], minlength=len(probs)).float() / n  # [V]
    sigma = (probs * (1 - probs) / n).sqrt()  # binomial standard deviation of each frequency
    assert ((freq - probs).abs() <= 5 * sigma + 1e-4).all(), (freq - probs).abs().max()
    assert (freq[probs == 0] == 0).all()  # truncated tokens are never drawn
    if top_k:
        assert (probs > 0).sum() <= top_k


def test_filter_logits_keeps_exactly_the_right_tokens():
    # sorted: 0.5 (token 1), 0.2 (3), 0.15 (0), 0.1 (4), 0.05 (2)
    p = torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1])
    logits = p.log()[None]  # [1, 5]

    def kept(top_k=0, top_p=1.0):
        return set(torch.isfinite(filter_logits(logits, top_k, top_p))[0].nonzero()[:, 0].tolist())

    assert kept() == {0, 1, 2, 3, 4}
    assert kept(top_k=1) == {1}
    assert kept(top_k=3) == {1, 3, 0}
    assert kept(top_k=5) == kept(top_k=50) == {0, 1, 2, 3, 4}
    assert kept(top_p=0.3) == {1}  # the top token alone already has 0.5 >= 0.3
    assert kept(top_p=0.01) == {1}  # the top token is always kept
    assert kept(top_p=0.6) == {1, 3}  # 0.5 < 0.6 <= 0.7
    assert kept(top_p=0.8) == {1, 3, 0}  # 0.7 < 0.8 <= 0.85
    assert kept(top_p=0.9) == {1, 3, 0, 4}  # 0.85 < 0.9 <= 0.95
    # top-p acts on the distribution renormalised after top-k: 0.5/0.85, 0.2/0.85 = 0.82 >= 0.8
    assert kept(top_k=3, top_p=0.8) == {1, 3}
    # rows are filtered independently
    two = torch.stack([p.log(), p.flip(0).log()])  # [2, 5]
    rows = torch.isfinite(filter_logits(two, 0, 0.6))
    assert rows[0].nonzero()[:, 0].tolist() == [1, 3] and rows[1].nonzero()[:, 0].tolist() == [1, 3]


class PieceTokenizer:
    """Token i decodes to pieces[i]: lets a test choose where a stop string falls on token
    boundaries."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)

    def batch_decode(self, batch, skip_special_tokens=False):
        return [self.decode(ids) for ids in batch]


def char_pieces(vocab_size):  # one character per token
    return [string.ascii_letters[i % 52] for i in range(vocab_size)]


def pair_pieces(vocab_size):  # two characters per token, so a stop string can end inside one
    return [string.ascii_letters[i % 52] + string.digits[(i // 52) % 10] for i in range(vocab_size)]


def check_stops(generate, model, tok, ids, am, stops, reference):
    """generate with stop strings ends each row at the oracle's token, keeps that token, and agrees
    before it."""
    P = ids.shape[1]
    out = generate(model, ids, am, reference.shape[1] - P, temperature=0, eos_token_id=[],
                   stop_strings=stops, tokenizer=tok, pad_token_id=0)
    n_stopped = 0
    for row in range(len(ids)):
        ref = reference[row, P:].tolist()
        k = first_stop(tok.decode, ref, stops)
        length = out.response_mask[row].sum().item()
        if k is None:
            assert out.finish_reason[row] == "length" and length == len(ref)
        else:
            n_stopped += 1
            assert out.finish_reason[row] == "stop" and length == k + 1
        assert out.sequences[row, P:P + length].tolist() == ref[:length]
    return n_stopped


@pytest.mark.parametrize("pieces", ["model", "char", "pair"])
def test_stop_string_spread_over_tokens(pieces, generate):
    """A stop string taken from the middle of row 1's text; with "pair" it ends inside a token."""
    model, tok = tiny()
    ids, am = encode(tok)
    reference = generate(model, ids, am, 30, temperature=0, eos_token_id=[]).sequences  # [B, P+30]
    if pieces != "model":  # else model_zoo's character tokenizer itself
        make = {"char": char_pieces, "pair": pair_pieces}[pieces]
        tok = PieceTokenizer(make(model.config.vocab_size))
    text = tok.decode(reference[1, ids.shape[1]:].tolist())
    stop = text[4:9]  # pair: characters 4-8, the last is the first half of token 4
    assert check_stops(generate, model, tok, ids, am, ["never appears", stop], reference) >= 1


def test_stop_string_that_is_one_token(generate):
    model, tok = tiny()
    ids, am = encode(tok)
    P = ids.shape[1]
    reference = generate(model, ids, am, 30, temperature=0, eos_token_id=[]).sequences  # [B, P+30]
    token = reference[2, P + 5].item()
    pieces = char_pieces(model.config.vocab_size)
    pieces[token] = "</answer>"
    first = reference[2, P:].tolist().index(token)
    tok = PieceTokenizer(pieces)
    assert check_stops(generate, model, tok, ids, am, ["</answer>"], reference) >= 1
    out = generate(model, ids, am, 30, temperature=0, eos_token_id=[], stop_strings="</answer>",
                   tokenizer=tok)
    assert out.finish_reason[2] == "stop" and out.response_mask[2].sum() == first + 1


def test_unsupported_architecture_raises(generate):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="gpt2"):
        generate(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), 2)


def test_runs_on_fsdp2_model_gathered_with_unshard(tmp_path):
    """FSDP2 (one gloo process): after unshard() the submodules hold plain tensors and both
    generators work on them."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard
    model, tok = tiny(scale=3.0)
    sharded, _ = tiny(scale=3.0)
    ids, am = encode(tok)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        units = [m for m in sharded.modules() if isinstance(m, FSDPModule)]
        with pytest.raises(RuntimeError, match="FSDP2 shards: gather them first"):
            rollout.generate(sharded, ids, am, 4)
        for u in units:
            u.unshard()
        outs = {name: [fn(m, ids, am, 24, temperature=1.0, eos_token_id=tok.eos_token_id,
                          generator=torch.Generator().manual_seed(0)) for m in (sharded, model)]
                for name, fn in GENERATORS.items()}
        for u in units:
            u.reshard()
    finally:
        dist.destroy_process_group()
    for on_shards, plain in outs.values():
        assert torch.equal(on_shards.sequences, plain.sequences)
        assert torch.allclose(on_shards.logprobs, plain.logprobs, atol=1e-6)


def test_cut_after_stop_drops_the_tail_of_the_last_token():
    full = "<think>x</think><answer>B</answer>"
    assert cut_after_stop(full + "<", ["</answer>"]) == full
    assert cut_after_stop("a</answer>.</answer>", "</answer>") == "a</answer>"
    assert cut_after_stop("no stop here", ["</answer>"]) == "no stop here"
    assert cut_after_stop("xy END1 END2", ["END2", "END1"]) == "xy END1"  # the earliest end wins
    assert cut_after_stop("text", None) == "text"


def test_demo_samples_and_scores_medqa_questions(data_dir, capsys):
    rollout.main(["--model", "tiny-qwen2", "--n", "2", "--max_new_tokens", "8",
                  "--data_dir", str(data_dir)])
    out = capsys.readouterr().out
    assert out.count("=== medqa_dev-") == 2 and "reward" in out and "mean reward" in out
