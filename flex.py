"""Packed training forwards without a dense [L, L] attention mask: FlexAttention block masks.

model.py packs each prompt and its sampled responses into one row (`pack_trees`) and gives the
attention a dense tree mask [R, 1, L, L] bool: that stays the reference, and what SDPA and eager
attention take. A dense mask costs what its L^2 pairs cost: SDPA with an arbitrary mask cannot run
its flash kernel, and computes every masked-out pair as if it were kept, though in a tree of n
responses most pairs are masked out (response j never sees response i). FlexAttention takes the
mask as a function instead, and skips what it masks out:
  - `tree_mask_mod(branch)`: pack_trees' tree mask, element for element, as a mask_mod that reads
    the batch's per-position `branch` [R, L] (0 the prompt, j+1 response j, -1 padding).
  - `block_mask(batch)`: that mask_mod as a BlockMask: for each 128 x 128 tile of (query, key),
    whether it is empty (skipped), full (no mask_mod) or partial (mask_mod per element).
  - `use_flex_attention(model)`: switches a loaded policy or critic to transformers' own flex
    attention ("flex_attention"); model.attention_mask_for then hands it `block_mask(batch)` for
    packed batches, and response_logprobs, response_values and final_hidden_states run as they are.
The trainers' switches come last: `prepare_for_training` applies --attention (`attention_for`) and
--compile (`compile_decoder_layers`: torch.compile of every decoder layer, gradient checkpointing's
recomputation in the backward included).

How transformers takes it (5.17 and 5.24 alike): masking_utils returns any 4-D attention mask as it
is, and a BlockMask's shape is [R, 1, L, L]; integrations/flex_attention.py hands a BlockMask to
torch's flex_attention as block_mask, through its own torch.compile(flex_attention), on the CPU too
(Inductor's C++ kernel, gcc: 5-20 s on a 2-core CPU for the first shape, once more when a second
shape makes it dynamic, then no recompiles for new lengths or new block masks). L need not be a
multiple of 128: since torch 2.6 a BlockMask keeps its sequence lengths, which flex_attention
requires to equal the query's and the key's (padding L would be wrong, not merely wasteful).

Where it runs: forwards anywhere, backwards on CUDA only. torch's flex_attention refuses inputs that
require grad on the CPU ("does not support backward on CPU"), so on the CPU the update's forwards
must stay on SDPA's dense mask; the no-grad ones (old log-probs, reference log-probs, values) can
use this. On CUDA, Triton's kernel needs a head dimension of at least 16.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def tree_mask_mod(branch: torch.Tensor):
    """pack_trees' tree mask as a mask_mod: query q attends to key k iff both are real tokens, k is
    not after q, and k is in the prompt or in q's own response; a padding query attends only to
    itself (a query that sees no key would give NaN). branch: [R, L] long."""
    def mask_mod(b, h, q, k):
        # b, h, q, k: index tensors; h is unused, every head has the same mask
        query_branch = branch[b, q]
        key_branch = branch[b, k]
        same_tree = (key_branch == 0) | (key_branch == query_branch)
        real = (query_branch >= 0) & (key_branch >= 0)
        return (same_tree & real & (k <= q)) | (q == k)
    return mask_mod


def block_mask(batch) -> BlockMask:
    """The tree mask of a packed model.ResponseBatch as a BlockMask of shape [R, 1, L, L] (one mask
    for all heads), on the batch's device.

    create_block_mask is called as is, not compiled: it evaluates the mask_mod on all R L^2 pairs
    once (the same size as the dense mask pack_trees already holds) and keeps only the tile lists.
    """
    if batch.branch is None:
        raise ValueError("a block mask is built from packed trees (model.pack), and this batch is "
                         "padded rows: they take their [R, L] mask as it is")
    R, L = batch.branch.shape
    return create_block_mask(tree_mask_mod(batch.branch), B=R, H=None, Q_LEN=L, KV_LEN=L,
                             device=batch.branch.device)


def use_flex_attention(model):
    """Switch a loaded policy or critic to transformers' flex attention, in place; returns it.
    transformers checks that the architecture supports it (Llama, Qwen2 and SmolLM2 do)."""
    model.set_attn_implementation("flex_attention")
    return model


# --------------------------------------------------------------------------------------------------
# The switches of the trainers' training forwards: --attention and --compile
# --------------------------------------------------------------------------------------------------
ATTENTION_CHOICES = ("auto", "sdpa", "flex")


def attention_for(choice: str, device) -> str:
    """--attention as a transformers attn_implementation: flex where it has a backward (CUDA) when
    "auto"; sdpa (the dense tree mask) elsewhere."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"--attention {choice!r}: choose one of {ATTENTION_CHOICES}")
    if choice == "flex" or (choice == "auto" and torch.device(device).type == "cuda"):
        return "flex_attention"
    return "sdpa"


def prepare_for_training(model, attention: str, compile_layers: bool, device):
    """Set a policy, reference or critic up for the trainers' forwards, in place, before FSDP2
    shards it: its attention (attention_for) and, with compile_layers, torch.compile of every
    decoder layer (compile_decoder_layers). Generation is unaffected: rollout.py and engine.py call
    the layers' submodules, never a layer's forward."""
    if attention_for(attention, device) == "flex_attention":
        use_flex_attention(model)
    if compile_layers:
        compile_decoder_layers(model)
    return model


def compile_decoder_layers(model):
    """torch.compile every decoder layer, in place, gradient checkpointing included.

    One compiled graph serves all layers of a shape, with dynamic shapes, since packed rows change
    length every step; dynamo guards on train() and on grad mode, so eval() and no-grad forwards get
    a graph of their own.

    Gradient checkpointing is compiled too. transformers checkpoints a layer inside its forward
    (GradientCheckpointingLayer wraps forward in torch.utils.checkpoint), so compiling the layer
    puts the checkpoint inside the compiled region: dynamo traces it as a higher-order op, the
    compiled forward keeps only the layer's inputs, and AOTAutograd puts the recomputation into the
    compiled backward, where Inductor fuses it with the gradient kernels and leaves out what the
    backward never reads (the MLP's down projection). That is torchtitan's order, checkpoint inside
    compile. The other order, our own eager checkpoint around a compiled layer with transformers'
    turned off, reruns the whole compiled forward in the backward (a compiled graph hands autograd
    its tensors only once it has run to the end, so checkpoint's early stop cannot cut it short),
    and needs every layer wrapped anew.

    Dynamo refuses any Python side effect inside a checkpoint, since eager checkpointing would
    replay it in the recomputation, and the attention's forward has one: the wrapper of the kernels
    library (transformers' use_kernelized_func) sets a global and resets it. Left alone, that graph
    break leaves every checkpointed layer eager. The flag (process-wide, as dynamo's settings are)
    lets dynamo apply such side effects once, in the forward; this one undoes itself, so there is
    nothing to replay.
    """
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in model.model.layers:
        layer.compile(dynamic=True)
    return model
