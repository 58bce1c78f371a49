"""flex.py: the tree mask as a FlexAttention BlockMask is pack_trees' dense mask, element for
element and tile for tile, and packed forwards through transformers' flex attention give SDPA's
log-probs, entropies, values and gradients (tiny Llama and Qwen2, fp32)."""
import copy
import dataclasses

import pytest
import torch
import transformers.integrations.flex_attention as hf_flex
from test_model import sampled_batch
from torch.nn.attention import flex_attention as torch_flex
from torch.nn.attention.flex_attention import create_mask

import flex
import model_zoo
from model import load_critic, pack, response_logprobs, response_values

ARCHS = ["llama", "qwen2"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TILE = 128  # create_block_mask's default block size

# Ragged groups: four prompts of 1 to 145 tokens, sampled 1 to 4 times (rows not adjacent),
# responses of 0 to 60 tokens (a tag is one token). The longest tree is longer than two tiles and
# not a multiple of one; its prompt fills the first tile, so the block mask has full tiles as well
# as partial and empty ones.
LONG = ("Q: A 54-year-old man has had chest pain on exertion for 3 months, relieved by rest. He "
        "smokes. What is the next step?\nA. ECG\nB. CT\nC. MRI\nD. rest")
ROWS = [(LONG, "<think>stable angina; an ECG comes first, then a stress test</think> "
               "<answer>A</answer>"),
        ("Hi", "ok"),
        (LONG, ""),  # an empty response: it adds nothing to its tree and gets zeros back
        ("Z", "<answer>C</answer>"),
        (LONG, "<answer>B"),
        ("Hi", "hello there, how can I help?"),
        ("Q: 2+2?\nA. 3\nB. 4", "B"),
        (LONG, "<think>could be anything at all, so the safest first</think> <answer>D</answer>"),
        ("Hi", "?")]


def tiny(arch, device="cpu"):
    """Policy and critic, fp32. Two heads of 16 dimensions: Triton's flex kernel needs at least 16
    (the tiny models' default is 4 heads of 8); one KV head, so GQA is exercised."""
    policy, tok = model_zoo.load_tiny(arch, seed=0, hidden=32, heads=2, kv_heads=1)
    return policy.to(device), load_critic(policy).to(device), tok


def packed_batch(tok, device="cpu"):
    seq, attn, mask = (t.to(device) for t in sampled_batch(tok, *zip(*ROWS)))
    (packed,) = pack(seq, attn, mask)
    return packed, mask  # mask: [B, T] the response tokens


def listed_tiles(num_blocks, indices, L):
    """The tiles a BlockMask lists, as an element mask [R, 1, L, L] bool. num_blocks [R, 1, nq]: how
    many of each query tile's entries in indices [R, 1, nq, nk] (key tile numbers) are real."""
    real = torch.arange(indices.shape[-1]) < num_blocks[..., None]  # [R, 1, nq, nk]
    grid = torch.zeros(indices.shape, dtype=torch.long)  # [R, 1, nq, nk]: (query tile, key tile)
    grid = grid.scatter_add_(-1, indices.long(), real.long()) > 0
    return grid.repeat_interleave(TILE, -2).repeat_interleave(TILE, -1)[..., :L, :L]


def test_block_mask_is_the_tree_mask():
    """The mask_mod gives pack_trees' dense mask element for element (the prompt, each response's
    own causal branch, padding seeing itself), and the tiles agree with it: a full tile holds no
    masked pair, and every kept pair is in a full or a partial tile."""
    _, _, tok = tiny("llama")
    packed, _ = packed_batch(tok)
    dense = packed.attention_mask  # [R, 1, L, L] bool, the reference
    R, _, L, _ = dense.shape
    assert R == 4 and L > 2 * TILE and L % TILE != 0
    mask = flex.block_mask(packed)
    assert mask.shape == (R, 1, L, L)
    assert torch.equal(create_mask(mask.mask_mod, R, 1, L, L, device="cpu"), dense)
    full = listed_tiles(mask.full_kv_num_blocks, mask.full_kv_indices, L)  # [R, 1, L, L]
    partial = listed_tiles(mask.kv_num_blocks, mask.kv_indices, L)  # [R, 1, L, L]
    # what a kernel computes: full tiles whole, partial ones through the mask_mod, no others
    assert torch.equal(full | (partial & dense), dense)
    assert full.any() and partial.any() and not (full | partial).all()  # all three kinds occur
    with pytest.raises(ValueError, match="padded rows"):
        flex.block_mask(dataclasses.replace(packed, branch=None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_flex_forward_equals_the_dense_one(arch, device):
    """Without gradients (old log-probs, values): transformers' own flex attention path, compiled by
    transformers (on the CPU too), gives SDPA's outputs."""
    policy, critic, tok = tiny(arch, device)
    packed, mask = packed_batch(tok, device)
    with torch.no_grad():
        ref = (*response_logprobs(policy, packed, 0.7, return_entropy=True),
               response_values(critic, packed))
        flex.use_flex_attention(policy)
        flex.use_flex_attention(critic)
        ours = (*response_logprobs(policy, packed, 0.7, return_entropy=True),
                response_values(critic, packed))
    for module in (policy, critic):
        assert module.config._attn_implementation == "flex_attention"
    for our, dense in zip(ours, ref):
        assert our.shape == mask.shape and (our[mask == 0] == 0).all()
        torch.testing.assert_close(our, dense, atol=1e-5, rtol=0)


@pytest.fixture
def reference_flex_backward(monkeypatch):
    """Let the CPU run flex attention's backward: torch's flex_attention refuses inputs that require
    grad on the CPU, because its compiled CPU kernel has none; its unfused reference implementation
    (what flex_attention runs uncompiled) has one. Lift that check and skip transformers'
    torch.compile of flex_attention; everything else (transformers' flex attention function, the
    BlockMask, the mask_mod) is what runs on CUDA."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda query, key, value: None)
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kwargs: torch_flex.flex_attention(
                            q, k, v, **kwargs))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_flex_gradients_equal_the_dense_ones(arch, device, request):
    """The update trains on these forwards: the gradient of every parameter, for a sum of log-probs
    (policy) and of values (critic), is SDPA's."""
    if device == "cpu":
        request.getfixturevalue("reference_flex_backward")
    policy, critic, tok = tiny(arch, device)
    packed, _ = packed_batch(tok, device)
    for module, outputs in ((policy, lambda m: response_logprobs(m, packed, chunk_tokens=16)),
                            (critic, lambda m: response_values(m, packed))):
        flexed = flex.use_flex_attention(copy.deepcopy(module))
        grads = []
        for m in (module, flexed):
            outputs(m).sum().backward()
            grads.append({name: p.grad for name, p in m.named_parameters() if p.requires_grad})
        dense, ours = grads
        assert dense.keys() == ours.keys()
        for name in dense:
            assert dense[name] is not None and ours[name] is not None, name
            torch.testing.assert_close(ours[name], dense[name], atol=1e-5, rtol=1e-5,
                                       msg=lambda text: f"{name}: {text}")
