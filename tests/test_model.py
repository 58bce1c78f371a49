"""model.py: log-probs and values against a direct computation, packed against padded, the critic,
atomic saves, and (slow) the same under FSDP2 (model_zoo.py's models: tests/test_model_zoo.py)."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

import model_zoo
from model import (
    critic_values,
    load_critic,
    load_policy,
    pack,
    position_ids_from_mask,
    response_batch,
    response_logprobs,
    response_values,
    save_model,
    set_gradient_checkpointing,
    set_pad_token,
    token_logprobs,
    write_folder_atomically,
)

ARCHS = ["qwen2", "llama"]
TEXTS = ["Q: 2+2?\nA. 3\nB. 4", "Hi", "<think>x</think> <answer>B</answer>"]


def batch(tokenizer, texts=TEXTS):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return encoded.input_ids, encoded.attention_mask  # [B, L] each, left padded


def same(a, b):
    """Same outputs up to float rounding: equal weights can still differ in the last bit, since CPU
    matmul kernels may reduce in a different order depending on how a tensor happens to be aligned
    in memory."""
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    return True


def same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    if state_a.keys() != state_b.keys():
        return False
    return all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def logits_of(model, ids, mask):
    with torch.no_grad():
        positions = position_ids_from_mask(mask)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def direct_logprobs(model, ids, mask, T, temperature=1.0):
    """Reference: full forward, full log_softmax, gather. Returns logprobs, entropy [B, T]."""
    positions = position_ids_from_mask(mask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    logp = (logits / temperature).log_softmax(-1)  # [B, L, V]
    logprobs = logp[:, -T - 1:-1].gather(-1, ids[:, -T:, None]).squeeze(-1)  # [B, T]
    entropy = -(logp.exp() * logp).sum(-1)[:, -T - 1:-1]  # [B, T]
    return logprobs, entropy


def test_set_pad_token_avoids_eos():
    model, tok = model_zoo.load_tiny()
    tok.pad_token = tok.eos_token  # a tokenizer shipped with pad == eos
    set_pad_token(tok, model)
    assert tok.pad_token == model_zoo.TINY_PAD and model.config.pad_token_id == tok.pad_token_id


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expect = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    assert torch.equal(position_ids_from_mask(mask), expect)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_direct(arch, temperature):
    model, tok = model_zoo.load_tiny(arch, seed=1, hidden=32)
    ids, mask = batch(tok)
    T = 6
    ref_logprobs, ref_entropy = direct_logprobs(model, ids, mask, T, temperature)
    for chunk in (1, 5, 1024):  # chunk boundaries inside and across rows
        logprobs, entropy = token_logprobs(model, ids, mask, T, temperature, return_entropy=True,
                                           chunk_tokens=chunk)
        assert logprobs.shape == entropy.shape == (3, T) and logprobs.dtype == torch.float32
        torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=0)
    with torch.no_grad():
        no_grad_logprobs = token_logprobs(model, ids, mask, T, temperature)
        torch.testing.assert_close(no_grad_logprobs, ref_logprobs, atol=1e-5, rtol=0)
    assert token_logprobs(model, ids, mask, 0).shape == (3, 0)


def test_token_logprobs_gradient_matches_direct():
    model, tok = model_zoo.load_tiny("qwen2", seed=2, hidden=32)
    ids, mask = batch(tok)

    def grads(logprobs_and_entropy):
        model.zero_grad()
        (logprobs_and_entropy()[0] ** 2).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    ours = grads(lambda: token_logprobs(model, ids, mask, 6, chunk_tokens=4, return_entropy=True))
    reference = grads(lambda: direct_logprobs(model, ids, mask, 6))
    for our_grad, reference_grad in zip(ours, reference):
        torch.testing.assert_close(our_grad, reference_grad, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_same_gradient():
    model, tok = model_zoo.load_tiny("llama", seed=5, hidden=32)
    ids, mask = batch(tok)
    model.train()

    def grads():
        model.zero_grad()
        token_logprobs(model, ids, mask, 6).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    set_gradient_checkpointing(model, True)
    assert model.model.gradient_checkpointing and model.config.use_cache is False
    for plain_grad, checkpointed_grad in zip(plain, grads()):
        torch.testing.assert_close(plain_grad, checkpointed_grad, atol=1e-7, rtol=1e-5)


def sampled_batch(tok, prompts, responses):
    """The trainer's layout: left-padded prompts, then right-padded responses. prompts[i] and
    responses[i] are row i's texts; returns seq, attn [B, P+T] and the response mask [B, T]."""
    prompt_ids = [tok(t).input_ids for t in prompts]
    response_ids = [tok(t).input_ids for t in responses]
    P, T = max(map(len, prompt_ids)), max(map(len, response_ids))
    seq = torch.full((len(prompts), P + T), tok.pad_token_id)
    attn = torch.zeros_like(seq)
    mask = torch.zeros(len(prompts), T)
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        seq[i, P - len(prompt):P] = torch.tensor(prompt)
        seq[i, P:P + len(response)] = torch.tensor(response)
        attn[i, P - len(prompt):P + len(response)] = 1
        mask[i, :len(response)] = 1
    return seq, attn, mask


# two prompts sampled 3 and 2 times (not adjacent), one sampled once; responses of 1 to 9 tokens
PACK_PROMPTS = ["Q: 2+2?\nA. 3\nB. 4", "Q: 2+2?\nA. 3\nB. 4", "Hi there", "Q: 2+2?\nA. 3\nB. 4",
                "Hi there", "Z"]
PACK_RESPONSES = ["B</answer>", "x", "<think>a</think> <answer>A", "4 is B", "ok",
                  "<answer>C</answer>"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("max_tokens", [0, 30])
def test_packed_forward_equals_the_padded_one(arch, max_tokens):
    """Each prompt computed once for all its samples (a tree mask) gives the padded forward's
    log-probs, entropies and values, whether the trees go in one batch or in several (max_tokens 30:
    a batch of at most 30 tokens)."""
    model, tok = model_zoo.load_tiny(arch, seed=3, hidden=32)
    critic = load_critic(model)
    seq, attn, mask = sampled_batch(tok, PACK_PROMPTS, PACK_RESPONSES)
    T = mask.shape[1]
    ref_logprobs, ref_entropy = direct_logprobs(model, seq, attn, T, 0.7)
    ref_values = critic_values(critic, seq, attn)[:, -T - 1:-1]
    packs = pack(seq, attn, mask, max_tokens)
    assert sum(p.input_ids.shape[0] for p in packs) == 3  # three distinct prompts, three trees
    assert len(packs) == 1 if max_tokens == 0 else len(packs) > 1
    # a batch of several trees keeps to the budget (a longer tree goes alone)
    several_trees = [p for p in packs if max_tokens and p.input_ids.shape[0] > 1]
    assert all(p.input_ids.numel() <= max_tokens for p in several_trees)
    # every response token is predicted exactly once, from its own row
    dst = torch.cat([p.dst for p in packs])
    assert sorted(dst.tolist()) == mask.flatten().nonzero()[:, 0].tolist()
    with torch.no_grad():
        logprobs = sum(response_logprobs(model, p, 0.7, return_entropy=True)[0] for p in packs)
        entropy = sum(response_logprobs(model, p, 0.7, return_entropy=True)[1] for p in packs)
        values = sum(response_values(critic, p) for p in packs)
    for ours, ref in ((logprobs, ref_logprobs), (entropy, ref_entropy), (values, ref_values)):
        assert ours.shape == (6, T)
        torch.testing.assert_close(ours, ref * mask, atol=1e-5, rtol=0)


def test_packed_tokens_and_tree_mask():
    """A packed row is the prompt once, then each response: P + sum(T_i) tokens, not n (P + T). A
    response token attends to the prompt and to its own earlier tokens only; padding attends to
    itself."""
    _, tok = model_zoo.load_tiny("qwen2")
    seq, attn, mask = sampled_batch(tok, ["abcd", "abcd", "xy"], ["12", "345", "6"])
    packs = pack(seq, attn, mask)
    assert len(packs) == 1
    packed = packs[0]
    # the longer tree: "abcd" + "12" + "345"; "xy6" is padded
    assert packed.input_ids.shape == (2, 4 + 2 + 3)
    # trees are sorted by length: "xy"+"6" first, then "abcd"+"12"+"345"
    tree = packed.input_ids[1].tolist()
    assert tok.decode(tree) == "abcd12345" and tok.decode(packed.input_ids[0, :3]) == "xy6"
    # each response continues the prompt
    assert packed.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    sees = packed.attention_mask[1, 0].int()  # [9, 9]: sees[i, j] = 1 if token i attends to j
    assert sees[6].tolist() == [1, 1, 1, 1, 0, 0, 1, 0, 0]  # "3" sees "abcd" and itself, not "12"
    assert sees[8].tolist() == [1, 1, 1, 1, 0, 0, 1, 1, 1]
    assert sees[5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0]
    short_tree_sees = packed.attention_mask[0, 0].int()
    assert short_tree_sees[5].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0]  # padding: itself only
    # the token "3" (row 1, response column 0) is predicted by the prompt's last token "d"
    T = mask.shape[1]
    k = (packed.dst == 1 * T + 0).nonzero()[0, 0]
    assert packed.src[k] == 1 * 9 + 3 and packed.targets[k] == packed.input_ids[1, 6]
    # a row with no response token adds nothing to its tree and gets zeros back
    (packed_with_empty,) = pack(*sampled_batch(tok, ["abcd", "abcd"], ["12", ""]))
    assert tok.decode(packed_with_empty.input_ids[0]) == "abcd12"
    assert len(packed_with_empty.src) == len(packed_with_empty.dst) == 2
    assert packed_with_empty.unpack(torch.ones(2)).tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_response_batch_packs_only_when_it_computes_fewer_tokens():
    _, tok = model_zoo.load_tiny("qwen2")
    shared = sampled_batch(tok, ["abcd", "abcd"], ["12", "345"])
    assert response_batch(*shared).attention_mask.dim() == 4  # trees: 4 + 2 + 3 tokens, not 2 x 7
    assert response_batch(*shared, packed=False).attention_mask.dim() == 2  # padded rows
    # nothing shared, no padding: nothing to gain
    rows = response_batch(*sampled_batch(tok, ["abcd", "wxyz"], ["123", "456"]))
    assert rows.attention_mask.shape == (2, 7) and rows.response_len == 3


def test_packed_gradient_equals_the_padded_one():
    """The update trains on packed forwards: the same loss gives the same gradient (actor and
    critic), also through the eager attention path (an additive float mask instead of SDPA's boolean
    one)."""
    for impl in ("sdpa", "eager"):
        model, tok = model_zoo.load_tiny("qwen2", seed=4, hidden=32)
        model.config._attn_implementation = impl
        critic = load_critic(model)
        seq, attn, mask = sampled_batch(tok, PACK_PROMPTS, PACK_RESPONSES)
        T = mask.shape[1]
        noise = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
        weights = noise * mask  # [B, T]

        def weighted_grads(module, outputs):
            """The gradients of sum(outputs() * weights) on the parameters it reaches."""
            module.zero_grad()
            (outputs() * weights).sum().backward()
            return [param.grad.clone() for param in module.parameters() if param.grad is not None]

        (packed,) = pack(seq, attn, mask)
        pairs = [(weighted_grads(model, lambda: response_logprobs(model, packed, chunk_tokens=4)),
                  weighted_grads(model, lambda: token_logprobs(model, seq, attn, T))),
                 (weighted_grads(critic, lambda: response_values(critic, packed)),
                  weighted_grads(critic, lambda: critic_values(critic, seq, attn)[:, -T - 1:-1]))]
        for ours, ref in pairs:
            assert len(ours) == len(ref) > 0
            for our_grad, ref_grad in zip(ours, ref):
                torch.testing.assert_close(our_grad, ref_grad, atol=1e-6, rtol=1e-4)


def test_entropy_without_gradient_when_not_trained_on():
    model, tok = model_zoo.load_tiny("qwen2", seed=4, hidden=32)
    ids, mask = batch(tok)
    logprobs, entropy = token_logprobs(model, ids, mask, 6, return_entropy=True, entropy_grad=False)
    assert logprobs.requires_grad and not entropy.requires_grad
    logprobs_again, entropy_with_grad = token_logprobs(model, ids, mask, 6, return_entropy=True)
    assert entropy_with_grad.requires_grad and torch.equal(entropy, entropy_with_grad.detach())
    assert torch.equal(logprobs, logprobs_again)


def test_bf16_load():
    model, tok = load_policy("tiny-qwen2", dtype="bfloat16", gradient_checkpointing=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids, mask = batch(tok)
    logprobs = token_logprobs(model, ids, mask, 4)
    assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs).all()
    critic = load_critic(model, dtype="bfloat16")
    assert critic.score.weight.dtype == torch.bfloat16
    assert critic_values(critic, ids, mask).dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch):
    model, tok = model_zoo.load_tiny(arch, seed=7)
    ids, mask = batch(tok)
    out = save_model(model, tok, tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    loaded_tok = AutoTokenizer.from_pretrained(out)
    model_logits = logits_of(model, ids, mask)
    assert same_weights(loaded, model) and same(logits_of(loaded, ids, mask), model_logits)
    assert loaded_tok.decode(loaded_tok(TEXTS[0]).input_ids) == TEXTS[0]
    assert loaded_tok.pad_token_id == tok.pad_token_id
    # what transformers 5 forces on model_type qwen2 anyway
    assert type(loaded_tok).__name__ == "Qwen2Tokenizer"
    again, again_tok = load_policy(str(out))
    assert again_tok.padding_side == "left" and same(logits_of(again, ids, mask), model_logits)
    # overwrite in place with new weights: the folder now holds those
    other, _ = model_zoo.load_tiny(arch, seed=8)
    save_model(other, tok, out)
    assert same_weights(AutoModelForCausalLM.from_pretrained(out), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no temp or old folder left


def test_save_given_state_dict(tmp_path):
    model, tok = model_zoo.load_tiny()
    # like a full state dict gathered from FSDP
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict["model.norm.weight"] += 1.0
    keys = list(state_dict)
    save_model(model, tok, tmp_path / "p", state_dict=state_dict)
    assert list(state_dict) == keys  # the caller's dict is left alone
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert torch.equal(loaded.model.norm.weight, state_dict["model.norm.weight"])


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    model, tok = model_zoo.load_tiny(seed=0)
    out = tmp_path / "policy"

    # the model weights are written, then the tokenizer save dies
    def killed_mid_save(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(type(tok), "save_pretrained", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tok, out)
    # first save interrupted: nothing under the final name, no debris
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_model(model, tok, out)
    before = sorted(os.listdir(out))
    other, _ = model_zoo.load_tiny(seed=9)
    monkeypatch.setattr(type(tok), "save_pretrained", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        save_model(other, tok, out)
    assert sorted(os.listdir(out)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    assert same_weights(AutoModelForCausalLM.from_pretrained(out), model)


def test_write_atomically_first_writer_wins(tmp_path):
    target = tmp_path / "smollm2-135m"

    # another process finishes its conversion while we are still writing ours
    def slow_writer(folder):
        (folder / "mine.txt").write_text("loser")
        write_folder_atomically(target, lambda theirs: (theirs / "theirs.txt").write_text("winner"),
                                replace=False)

    write_folder_atomically(target, slow_writer, replace=False)
    assert os.listdir(target) == ["theirs.txt"] and os.listdir(tmp_path) == ["smollm2-135m"]


def test_loaded_weights_own_aligned_memory(tmp_path):
    """from_pretrained leaves CPU weights inside the file's buffer at unaligned offsets, where
    matmul kernels round differently (a resumed run drifted from the uninterrupted one in the last
    bit): load_policy and load_critic copy them to 64-byte aligned memory, keeping tied embeddings
    tied."""
    policy, tok = model_zoo.load_tiny("qwen2", seed=12)
    save_model(policy, tok, tmp_path / "p")
    save_model(load_critic(policy), tok, tmp_path / "c")
    loaded, _ = load_policy(str(tmp_path / "p"))
    critic = load_critic(str(tmp_path / "c"))
    for module in (loaded, critic):
        assert all(t.data_ptr() % 64 == 0 for t in [*module.parameters(), *module.buffers()])
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert same_weights(loaded, policy)


@pytest.mark.parametrize("arch", ARCHS)
def test_critic_from_policy(tmp_path, arch):
    policy, tok = model_zoo.load_tiny(arch, seed=11)
    critic = load_critic(policy)
    assert isinstance(critic, AutoModelForTokenClassification._model_mapping[type(policy.config)])
    assert same_weights(policy.model, critic.model)  # the critic's body is the policy's
    assert critic.dropout.p == 0.0 and critic.config.num_labels == 1
    # OpenRLHF's value head: weights N(0, 1 / (hidden + 1)^2), no bias (kept at 0, never trained)
    hidden = policy.config.hidden_size
    head = critic.score.weight.detach()
    assert head.shape == (1, hidden)
    assert 0.5 / (hidden + 1) < head.std().item() < 1.5 / (hidden + 1)
    assert torch.equal(critic.score.bias, torch.zeros(1)) and not critic.score.bias.requires_grad
    ids, mask = batch(tok)
    critic.train()  # no dropout anywhere: train mode gives the same values
    values = critic_values(critic, ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32
    assert values.std() < 2 * hidden ** 0.5 / (hidden + 1)  # V starts small: normed states . head
    assert torch.equal(values, critic_values(critic, ids, mask, position_ids_from_mask(mask)))
    # save / load keeps the head (a trained head must not be re-initialised)
    torch.nn.init.normal_(critic.score.weight, std=1.0)
    new_head_values = critic_values(critic.eval(), ids, mask)
    out = save_model(critic, tok, tmp_path / "critic")
    loaded = AutoModelForTokenClassification.from_pretrained(out)
    assert same_weights(loaded, critic) and same(critic_values(loaded, ids, mask), new_head_values)
    reloaded = load_critic(str(out))
    assert same_weights(reloaded, critic) and not reloaded.score.bias.requires_grad
    # a critic from a saved policy folder equals the one built from the object
    policy_dir = save_model(policy, tok, tmp_path / "policy")
    from_disk = load_critic(str(policy_dir))
    policy_body = policy.model.state_dict()
    assert all(torch.equal(from_disk.model.state_dict()[k], policy_body[k]) for k in policy_body)
    assert load_critic("tiny-llama").config.model_type == "llama"


def run_on_two_ranks(script, *args):
    """`torchrun --standalone --nproc_per_node 2 script args`, in a fresh process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


FSDP_WORKER = r'''
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

sys.path.insert(0, sys.argv[1])  # the project's flat modules

import model_zoo  # noqa: E402
from model import (  # noqa: E402
    critic_values,
    layer_modules,
    load_critic,
    save_model,
    token_logprobs,
)

dist.init_process_group("gloo")
policy, tok = model_zoo.load_tiny("llama", seed=0, hidden=32)
encoded = tok(["Q: 2+2?\nA. 3", "<think>x</think> <answer>B"], padding=True, return_tensors="pt")
ids, mask = encoded.input_ids, encoded.attention_mask
cases = [("policy", token_logprobs, (5,), AutoModelForCausalLM,
          lambda: model_zoo.load_tiny("llama", seed=0, hidden=32)[0]),
         ("critic", critic_values, (), AutoModelForTokenClassification,
          lambda: load_critic(policy))]
for name, forward, args, auto_class, build in cases:
    plain, sharded = build(), build()
    for layer in layer_modules(sharded):  # the same wrapping as distributed.shard
        fully_shard(layer)
    fully_shard(sharded)
    sharded_out = forward(sharded, ids, mask, *args)
    plain_out = forward(plain, ids, mask, *args)
    sharded_out.sum().backward()
    plain_out.sum().backward()
    # the critic's score.bias is frozen (OpenRLHF's value head has none): it has no gradient
    trained = [(n, p) for n, p in sharded.named_parameters() if p.requires_grad]
    assert all(p.grad is None for p in sharded.parameters() if not p.requires_grad), name
    grads = {n: p.grad.full_tensor() for n, p in trained}
    grad_error = max((grads[n] - p.grad).abs().max().item()
                     for n, p in plain.named_parameters() if p.requires_grad)
    # the gradients are read first: after a no-grad forward the root stays unsharded, and
    # named_parameters() shows the gathered copies
    with torch.no_grad():
        no_grad_out = forward(sharded, ids, mask, *args)
    assert (sharded_out - plain_out).abs().max() < 1e-6, name
    assert (no_grad_out - plain_out).abs().max() < 1e-6, name
    assert grad_error < 1e-6, name
    # save rank 0's gathered full state dict (as checkpoint.py does): a plain Hugging Face folder
    sharded.reshard()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(sharded, options=options)
    if dist.get_rank() == 0:
        out_dir = save_model(sharded, tok, sys.argv[2] + "/" + name, state_dict=full)
        loaded = auto_class.from_pretrained(out_dir)
        assert type(loaded).__name__ == type(plain).__name__, name
        assert loaded.state_dict().keys() == plain.state_dict().keys(), name
        assert all(torch.equal(v, full[k]) for k, v in loaded.state_dict().items()), name
    dist.barrier()
dist.destroy_process_group()
print("FSDP OK")
'''


@pytest.mark.slow
def test_logprobs_and_values_under_fsdp2(tmp_path):
    """token_logprobs / critic_values on FSDP2-sharded models (2 CPU processes, gloo) = on plain
    models, and save_model of the gathered state dict gives a loadable folder."""
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    result = run_on_two_ranks(script, ROOT, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP OK" in result.stdout, result.stderr[-3000:]


MESH_WORKER = r"""
import sys

import torch

sys.path.insert(0, sys.argv[1])  # the project's flat modules

import distributed  # noqa: E402
import model_zoo  # noqa: E402
from model import layer_modules, token_logprobs  # noqa: E402


def accelerator():  # as on a GPU machine: FSDP's default mesh would be there
    return torch.device("cuda")


rank, world, device = distributed.setup("cpu")  # gloo
torch._C._get_accelerator = accelerator
policy, tok = model_zoo.load_tiny("qwen2", seed=0)
distributed.shard(policy, layer_modules(policy), mixed_precision=False)
weight = policy.model.embed_tokens.weight
assert weight.device_mesh.device_type == "cpu", (weight.device_mesh, weight.device)
assert weight.device.type == "cpu", (weight.device_mesh, weight.device)
ids = torch.randint(0, len(tok), (2, 8), generator=torch.Generator().manual_seed(0))
token_logprobs(policy, ids, torch.ones_like(ids), 4).sum().backward()
distributed.cleanup()
print("MESH OK", rank)
"""


@pytest.mark.slow
def test_shard_keeps_gloo_ranks_on_the_cpu_where_an_accelerator_exists(tmp_path):
    """distributed.shard builds its FSDP2 mesh on the process group's device. fully_shard's default
    mesh is on the accelerator whenever there is one: 2 gloo ranks on a machine with one GPU ask
    for cuda:1, a device it does not have, and die. Here the accelerator is faked, so without the
    explicit mesh both ranks fail."""
    script = tmp_path / "worker.py"
    script.write_text(MESH_WORKER)
    result = run_on_two_ranks(script, ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("MESH OK") == 2, result.stderr[-3000:]
