"""What model.py and model_zoo.py both build on, kept below both so that neither imports the
other: dtype names, the pad-token rule, saving a tokenizer both transformers 4 and 5 read, and
writing a folder atomically.

model.py loads the models model_zoo.py builds by name (the demo's SmolLM2, the tiny test models),
and model_zoo.py sets the pad token and saves the SmolLM2 folder it converts by the same rules as
model.py: these helpers sit here so that the dependency runs one way.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def as_dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


# Pad tokens to prefer over EOS, in order; then the unk token, then <|endoftext|> if it is not EOS.
PAD_CANDIDATES = ["<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|fim_pad|>"]


def set_pad_token(tokenizer, model=None):
    """Left padding, and a pad token that is not EOS when the vocabulary has another unused token.

    Only when the tokenizer has no pad token at all and no candidate exists is one added (and the
    embeddings resized). The pad id only fills slots that masks exclude; masks never come from
    `ids != pad`.
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
    if model is not None:  # config, generation config, tokenizer agree (vLLM, generate read them)
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def save_tokenizer(tokenizer, folder):
    """tokenizer.save_pretrained, naming the class so that transformers 4 (e.g. under vLLM) loads it
    too: transformers 5 writes "TokenizersBackend", which 4 lacks; "PreTrainedTokenizerFast" is the
    same tokenizer.json-backed class in both (transformers 5 maps it back to TokenizersBackend)."""
    tokenizer.save_pretrained(folder)
    config_path = Path(folder, "tokenizer_config.json")
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_folder_atomically(out_dir, write, replace=True):
    """Call write(tmp) on a temporary folder beside out_dir, then rename it to out_dir.

    replace=True swaps an existing out_dir: rename old aside, rename new in, delete old (a crash in
    between leaves the old copy as .NAME.old-*). replace=False keeps an existing out_dir and
    discards the new copy (the first of two writers wins).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # on the same file system, so that the rename is atomic
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
