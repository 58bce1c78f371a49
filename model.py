"""Models in and out: log-probs and values of response tokens, loading, saving.

A thin layer over Hugging Face transformers model classes (no custom architectures):
  - `response_logprobs(model, batch)`: log pi(a_t) of every response token of a batch, computed
    without ever holding the full [rows, tokens, vocab] fp32 logits; `response_values(critic,
    batch)`: V(s_t).
  - A batch is a `ResponseBatch`: padded rows, or packed trees in which each prompt is computed once
    for all of its sampled responses (`pack`); `response_batch` picks whichever computes fewer
    tokens.
  - `load_policy(name)`: a causal LM + tokenizer from a Hugging Face folder or hub name, or a name
    of model_zoo.py (the demo's SmolLM2, tiny random test models). `load_critic(...)`: the same
    backbone with a scalar value head on every token, initialised from the policy's weights as
    OpenRLHF and veRL do.
  - `save_model(...)`: Hugging Face format, written to a temporary folder and renamed into place.

Padding convention (used by every file): prompts are LEFT padded, `tokenizer.padding_side ==
"left"`, and position ids always come from the attention mask (`position_ids_from_mask`), in
generation and in every training forward, so log-probs agree. The pad token is never the EOS token
when the vocabulary allows it, but no code relies on that: masks come from attention masks and
lengths, never from `ids != pad`.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

import flex
import model_zoo
from model_io import as_dtype, save_tokenizer, set_pad_token, write_folder_atomically


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only: a left-padded row starts at 0 on its first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]


# --------------------------------------------------------------------------------------------------
# What the trainers compute: log pi(a_t) and V(s_t) of the response tokens of a batch.
# --------------------------------------------------------------------------------------------------
@dataclass
class ResponseBatch:
    """Rows for one forward pass, and where in its output the prediction of each response token is.

    Padded rows (`padded_rows`): [left-padded prompt | right-padded response], attention_mask [R, L]
    with 1 on real tokens. Packed trees (`pack`): a row holds one prompt once, then each of its
    responses; attention_mask [R, 1, L, L] is the tree (see `pack`). Either way the caller's B rows
    of T response tokens are scattered over the batch, and `src` / `dst` say where each one is.
    """
    input_ids: torch.Tensor  # [R, L] long
    position_ids: torch.Tensor  # [R, L] long
    attention_mask: torch.Tensor  # [R, L] long (padded rows) or [R, 1, L, L] bool (packed trees)
    src: torch.Tensor  # [n] long: flat index into [R*L] of the position predicting a response token
    dst: torch.Tensor  # [n] long: flat index into [B*T] (the caller's rows) of that response token
    targets: torch.Tensor  # [n] long: the response tokens themselves
    rows: int  # B, the caller's rows
    response_len: int  # T, the caller's response columns
    # [R, L] long, packed trees only: 0 the prompt, j+1 response j, -1 padding (what flex.py reads)
    branch: torch.Tensor | None = None

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """[n] values, one a response token, into the caller's [B, T] (0 elsewhere)."""
        out = values.new_zeros(self.rows * self.response_len)
        return out.index_put((self.dst,), values).view(self.rows, self.response_len)  # [B, T]


def response_logprobs(model, batch: ResponseBatch, temperature=1.0, return_entropy=False,
                      entropy_grad=True, chunk_tokens=1024):
    """log pi(a_t) [B, T] of the response tokens (fp32, differentiable; 0 where there is none), and,
    with return_entropy, the entropy of pi at each of them [B, T].

    The backbone runs over the whole batch, the LM head only over the positions that predict
    response tokens, in chunks of `chunk_tokens` (never [n, vocab] fp32 logits for all of them at
    once). `temperature` divides the logits as in sampling; temperature <= 0 (greedy) means the raw
    softmax. Without entropy_grad (an entropy bonus of 0: logged, not trained on) the entropy has no
    gradient.
    """
    hidden = final_hidden_states(model, batch)  # [R, L, H]
    h = hidden.reshape(-1, hidden.shape[-1])[batch.src]  # [n, H] the states before response tokens
    temperature = temperature if temperature > 0 else 1.0
    # With gradients each chunk of the head is checkpointed: autograd keeps h, not [n, V] logits.
    use_checkpoint = torch.is_grad_enabled() and h.requires_grad
    chunks = []
    for s in range(0, h.shape[0], chunk_tokens):
        chunk = slice(s, s + chunk_tokens)
        args = (model.lm_head, h[chunk], batch.targets[chunk], temperature, return_entropy,
                entropy_grad)
        if use_checkpoint:
            chunks.append(checkpoint(logprobs_of_chunk, *args, use_reentrant=False))
        else:
            chunks.append(logprobs_of_chunk(*args))
    if not chunks:
        chunks = [(h.new_zeros(0, dtype=torch.float32), h.new_zeros(0, dtype=torch.float32))]
    logprobs = batch.unpack(torch.cat([c[0] for c in chunks]))  # [B, T]
    if not return_entropy:
        return logprobs
    return logprobs, batch.unpack(torch.cat([c[1] for c in chunks]))  # [B, T] x2


def logprobs_of_chunk(lm_head, h, targets, temperature, with_entropy, entropy_grad=True):
    """(log pi(target), entropy or None) for a chunk of hidden states h [N, H], targets [N]."""
    logits = lm_head(h).float() / temperature  # [N, V] fp32: the softmax is always taken in fp32
    logsumexp = torch.logsumexp(logits, dim=-1)  # [N]
    # log pi(a) = z_a - logsumexp(z)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logsumexp  # [N]
    if not with_entropy:
        return logp, None
    # entropy H = -sum_a pi(a) log pi(a) = logsumexp(z) - sum_a pi(a) z_a; without entropy_grad no
    # [N, V] softmax is kept for a backward that would multiply it by 0.
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
        entropy = logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # [N]
    return logp, entropy


def response_values(critic, batch: ResponseBatch) -> torch.Tensor:
    """V(s_t) [B, T] of the state before each response token: the critic's output at the token
    before it (0 where there is none)."""
    mask = attention_mask_for(critic, batch)
    values = critic_values(critic, batch.input_ids, mask, batch.position_ids)  # [R, L]
    return batch.unpack(values.reshape(-1)[batch.src])  # [B, T]


def critic_values(critic, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """V(s_t) for every position of input_ids [B, L] -> [B, L] fp32 (the state ending at t)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=False)
    return out.logits[..., 0].float()  # [B, L]


def final_hidden_states(model, batch: ResponseBatch) -> torch.Tensor:
    """The backbone's final (normed) hidden states [R, L, H].

    The whole model is called, not model.model, so that wrappers' hooks run (FSDP2 gathers the
    root's parameters in one); a forward hook on the backbone catches its output, and
    logits_to_keep=1 makes the model's own LM head run on the last position only.
    """
    caught = []

    def catch(module, args, output):
        caught.append(output.last_hidden_state)

    hook = model.model.register_forward_hook(catch)
    try:
        model(input_ids=batch.input_ids,
              attention_mask=attention_mask_for(model, batch),
              position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return caught[0]  # [R, L, H]


def attention_mask_for(model, batch: ResponseBatch):
    """The batch's mask as the model's attention takes it: padded rows' [R, L] mask as it is; the
    [R, 1, L, L] bool tree mask of packed trees as is for SDPA, as an additive mask (0 or the most
    negative float) for eager attention, and for flex attention as a BlockMask built from
    `batch.branch` (flex.py: the same mask, with no dense [L, L] one in the attention)."""
    mask = batch.attention_mask
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if mask.dim() == 2 or impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return additive.masked_fill(~mask, torch.finfo(dtype).min)
    if impl == "flex_attention":
        return flex.block_mask(batch)
    raise NotImplementedError(f"packed forwards need a 4D attention mask, which "
                              f"attn_implementation={impl!r} does not take: load the model with "
                              f"attn_implementation='sdpa' (or 'flex_attention')")


def token_logprobs(model, input_ids, attention_mask, response_len: int, temperature=1.0,
                   return_entropy=False, chunk_tokens=1024, entropy_grad=True):
    """response_logprobs of the last T = response_len tokens of padded rows input_ids [B, L]."""
    batch = padded_rows(input_ids, attention_mask, response_len)
    return response_logprobs(model, batch, temperature, return_entropy, entropy_grad, chunk_tokens)


# --------------------------------------------------------------------------------------------------
# Batches: padded rows, or packed trees (each prompt computed once for all of its samples).
# --------------------------------------------------------------------------------------------------
def response_batch(seq, attn, response_mask, packed=True) -> ResponseBatch:
    """What one forward of these rows takes: packed trees when `packed` and when they compute fewer
    tokens than the trimmed rows (with nothing shared and no padding the rows keep SDPA's causal
    path); else the padded rows, trimmed. seq, attn: [b, P+T]; response_mask: [b, T]."""
    seq, attn, T = trim(seq, attn, response_mask)
    if packed:
        (trees,) = pack(seq, attn, response_mask[:, :T])
        if trees.input_ids.numel() < seq.numel():
            return trees
    return padded_rows(seq, attn, T)


def trim(seq, attn, response_mask):
    """Drop the columns that are padding in every row: left of the longest prompt and right of the
    longest response, so no compute is spent on them. Returns seq, attn [b, P'+T'] and T'."""
    P = seq.shape[1] - response_mask.shape[1]
    left = int((attn[:, :P].sum(0) == 0).sum())  # leading all-padding columns (left-padded prompts)
    T = int(response_mask.sum(1).max())
    return seq[:, left:P + T], attn[:, left:P + T], T


def padded_rows(seq, attn, response_len: int) -> ResponseBatch:
    """Rows as they are: [left-padded prompt | right-padded response]; the last T = response_len
    columns are the response, each predicted by the position before it (padding positions included:
    the caller masks them)."""
    B, L = seq.shape
    T = response_len
    before = torch.arange(L - T - 1, L - 1, device=seq.device)  # [T] the positions predicting them
    src = (torch.arange(B, device=seq.device)[:, None] * L + before).reshape(-1)  # [B*T]
    return ResponseBatch(seq, position_ids_from_mask(attn), attn, src,
                         torch.arange(B * T, device=seq.device), seq[:, L - T:].reshape(-1), B, T)


def pack(seq: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
         max_tokens: int = 0) -> list[ResponseBatch]:
    """Pack rows that share a prompt (identical real prompt tokens) into trees.

    Row r of a packed batch is one group: the real tokens of a prompt, then each of its responses at
    its own length, one after the other; then right padding up to the longest group. The attention
    mask is a tree: a prompt token sees the prompt tokens before it, a response token sees the whole
    prompt and the tokens of its own response before it (never another response), a padding token
    sees only itself (a row with nothing to attend to would give NaN). Position ids restart at the
    prompt's length for each response, so every response token sees exactly the keys, values and
    positions it has in its own padded row: the outputs are the padded forward's, up to float
    rounding. With n samples of a P-token prompt and responses of T tokens, a forward computes P + n
    T tokens instead of n (P + T).

    seq, attention_mask: [B, P+T] (left-padded prompts, then responses); response_mask: [B, T] (1 up
    to each row's last token). Groups go into batches of at most `max_tokens` tokens counted with
    padding (rows x the longest row; a longer group goes alone); 0 = all in one batch. Groups are
    sorted by size so that a batch pads little.
    """
    B, T = response_mask.shape
    P = seq.shape[1] - T
    lengths = response_mask.sum(1).long().tolist()  # [B] response tokens per row
    groups = {}  # prompt tokens -> the rows that share it, in order
    for i in range(B):
        prompt = seq[i, :P][attention_mask[i, :P].bool()]  # [p] real prompt tokens
        groups.setdefault(tuple(prompt.tolist()), []).append(i)
    size = {p: len(p) + sum(lengths[i] for i in rows) for p, rows in groups.items()}  # tree tokens
    batches = [[]]
    for prompt in sorted(groups, key=size.get):  # growing sizes: the newest tree is the longest row
        if batches[-1] and max_tokens and (len(batches[-1]) + 1) * size[prompt] > max_tokens:
            batches.append([])
        batches[-1].append(prompt)
    return [pack_trees(seq, P, T, lengths, [(p, groups[p]) for p in batch]) for batch in batches]


def pack_trees(seq, P, T, lengths, groups) -> ResponseBatch:
    """One packed batch: a row per (prompt tokens, the rows sampled from it) group. See `pack`."""
    device = seq.device
    L = max(len(p) + sum(lengths[i] for i in rows) for p, rows in groups)
    R = len(groups)
    ids = torch.zeros(R, L, dtype=torch.long, device=device)  # [R, L] padding 0: never attended to
    pos = torch.zeros(R, L, dtype=torch.long, device=device)  # [R, L]
    # [R, L] which part of its tree each position is: 0 the prompt, j+1 response j, -1 padding
    branch = torch.full((R, L), -1, dtype=torch.long, device=device)
    src, dst, targets = [], [], []
    for r, (prompt, rows) in enumerate(groups):
        p = len(prompt)
        ids[r, :p] = torch.tensor(prompt, dtype=torch.long, device=device)
        pos[r, :p] = torch.arange(p, device=device)
        branch[r, :p] = 0
        at = p  # where the next response starts in row r
        for j, i in enumerate(rows):
            n = lengths[i]
            if n == 0:
                continue
            ids[r, at:at + n] = seq[i, P:P + n]
            pos[r, at:at + n] = torch.arange(p, p + n, device=device)
            branch[r, at:at + n] = j + 1
            # response token k is predicted by the position before it: the prompt's last for k = 0
            before = torch.arange(at - 1, at + n - 1, device=device)  # [n]
            before[0] = p - 1
            src.append(r * L + before)
            dst.append(i * T + torch.arange(n, device=device))
            targets.append(seq[i, P:P + n])
            at += n
    idx = torch.arange(L, device=device)
    real = branch >= 0  # [R, L]
    # [R, L (query), L (key)]: the key is in the query's prompt or in its own response
    same_tree = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    causal = idx[None, :] <= idx[:, None]  # [L, L]
    mask = same_tree & real[:, None, :] & real[:, :, None] & causal
    mask = mask | torch.eye(L, dtype=torch.bool, device=device)  # padding sees itself
    no_index = torch.zeros(0, dtype=torch.long, device=device)
    return ResponseBatch(ids, pos, mask[:, None], torch.cat(src or [no_index]),
                         torch.cat(dst or [no_index]), torch.cat(targets or [no_index]),
                         rows=len(lengths), response_len=T, branch=branch)


# --------------------------------------------------------------------------------------------------
# Loading: the policy (causal LM + tokenizer) and the critic (backbone + value head).
# --------------------------------------------------------------------------------------------------
def refuse_pickled_weights(path):
    """A local model folder whose weights are only a pickle (pytorch_model.bin, *.pt, ...) is
    refused: unpickling runs whatever code the file holds, and a model folder may come from anyone.
    Models load with use_safetensors=True, which reads tensors and nothing else."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickle_suffixes = (".bin", ".pt", ".pth", ".pkl")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in pickle_suffixes)
    if pickles:
        raise ValueError(f"{folder / pickles[0]}: model weights as a pickle, which would run any "
                         f"code it holds when loaded; only model.safetensors is read (convert it "
                         f"with save_pretrained(..., safe_serialization=True) where it came from)")


def load_policy(name_or_path="smollm2-135m", dtype="float32", device="cpu",
                gradient_checkpointing=False):
    """(causal LM, tokenizer) by model_zoo name (smollm2-135m, tiny-qwen2, tiny-llama, random-...),
    folder or hub name. Returned in eval() mode (all dropout in these models is 0; train() only
    switches gradient checkpointing on)."""
    if name_or_path in model_zoo.TINY_NAMES:
        policy, tokenizer = model_zoo.load_tiny(model_zoo.TINY_NAMES[name_or_path], dtype=dtype,
                                                device=device)
    elif name_or_path in model_zoo.RANDOM_NAMES:  # the paper's size for benchmarks, no weights
        policy, tokenizer = model_zoo.load_random_named(name_or_path, dtype=dtype, device=device)
    else:
        path = name_or_path
        if name_or_path == model_zoo.SMOLLM2_NAME:
            path = model_zoo.smollm2_folder()
        refuse_pickled_weights(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=as_dtype(dtype),
                                                     use_safetensors=True)
        policy = own_aligned_memory(policy).to(device)
        set_pad_token(tokenizer, policy)
    set_gradient_checkpointing(policy, gradient_checkpointing)
    return policy.eval(), tokenizer


def load_critic(name_or_path="smollm2-135m", dtype="float32", device="cpu",
                gradient_checkpointing=False, head_std=None, seed=0):
    """The value model: AutoModelForTokenClassification (num_labels=1) = the policy's backbone + a
    linear head, as OpenRLHF's critic: head weights ~ N(0, head_std^2) with head_std = 1 / (hidden
    size + 1), no bias (the class has one: it is kept at 0 and never trained, so a saved critic
    loads as it was).

    `name_or_path` may be a policy name or folder, a saved critic folder (loaded as is, head
    included), or a policy model object (its backbone weights are copied; nothing touches disk).
    The head is drawn from its own generator seeded with `seed`, so that every rank of a torchrun
    job builds the same head; V starts near 0 but the backbone gets a gradient from the first step.
    """
    if isinstance(name_or_path, (str, os.PathLike)) and is_critic_folder(name_or_path):
        refuse_pickled_weights(name_or_path)
        critic = AutoModelForTokenClassification.from_pretrained(name_or_path,
                                                                 dtype=as_dtype(dtype),
                                                                 use_safetensors=True)
        critic = own_aligned_memory(critic)
    else:
        if isinstance(name_or_path, nn.Module):
            policy = name_or_path
        else:
            policy = load_policy(name_or_path)[0]
        config = policy.config.to_dict()
        config.update(num_labels=1, classifier_dropout=0.0, architectures=None)  # no dropout
        config.pop("id2label", None)
        config.pop("label2id", None)
        critic = AutoModelForTokenClassification.from_config(type(policy.config).from_dict(config))
        critic.model.load_state_dict(policy.model.state_dict())  # the backbone, copied (as fp32)
        std = head_std if head_std is not None else 1 / (policy.config.hidden_size + 1)
        head_init = torch.Generator().manual_seed(seed)
        nn.init.normal_(critic.score.weight, std=std, generator=head_init)
        nn.init.zeros_(critic.score.bias)
    critic.score.bias.requires_grad_(False)  # no bias, as OpenRLHF's value head
    assert critic.dropout.p == 0.0, "a dropout before the value head would make V noisy"
    critic = critic.to(device=device, dtype=as_dtype(dtype))
    set_gradient_checkpointing(critic, gradient_checkpointing)
    return critic.eval()


def is_critic_folder(path) -> bool:
    if not Path(path, "config.json").exists():
        return False
    architectures = AutoConfig.from_pretrained(path).architectures or []
    return any(a.endswith("ForTokenClassification") for a in architectures)


def set_gradient_checkpointing(model, enabled: bool):
    """Recompute each decoder layer in backward (non-reentrant). Active only in model.train()
    mode."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False  # a KV cache is useless (and warned about) while training
    return model


def own_aligned_memory(model):
    """Give every parameter and buffer its own freshly allocated (64-byte aligned) memory.

    from_pretrained can leave CPU tensors as views into the safetensors file at whatever offset the
    file gives. CPU matmul kernels pick their code path by alignment, so the same weights then round
    differently in the last bit than after a fresh allocation: a run resumed from a checkpoint would
    not equal the uninterrupted one exactly, and unaligned loads are slower too."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.data_ptr() % 64:
            t.data = t.data.clone()
    return model


def layer_modules(model) -> list:
    """The decoder layers (the units FSDP shards and activation checkpointing recomputes)."""
    return list(model.model.layers)  # CausalLM and TokenClassification: the backbone is .model


def count_parameters(model, trainable_only=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------
# Saving: Hugging Face format (from_pretrained, vLLM and lm-eval read it), never a half-written
# folder.
# --------------------------------------------------------------------------------------------------
def save_model(model, tokenizer, out_dir, state_dict=None):
    """Save model (+ tokenizer, generation config) to out_dir atomically. `state_dict`: e.g. a full
    state dict gathered from FSDP shards (saved instead of model.state_dict(); model gives the
    config)."""
    def write(tmp):
        # save_pretrained edits the dict it is given (renames and drops keys): hand it a shallow
        # copy
        model.save_pretrained(tmp, state_dict=None if state_dict is None else dict(state_dict))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return write_folder_atomically(out_dir, write, replace=True)
