"""lora.py against independent computations: the adapted linear against its formula written out,
the adapted model against the merged model, and our adapters against PEFT's, both ways, through
the files each writes."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, Phi3Config

import lora
from model_zoo import load_tiny

POLICY = lora.LoraConfig(rank=4, alpha=8.0)


def tiny(arch="qwen2", **kw):
    return load_tiny(arch, **kw)[0]


def token_ids(model, seed=0, shape=(3, 11)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, shape, generator=generator)


def randomize_b(model, name, seed=1):
    """B starts at zero, which hides every mistake in B A: give it values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.adapter_parameters(model, name)[1::2]:  # each wrapped linear's B
            b.copy_(torch.randn(b.shape, generator=generator, dtype=b.dtype) * 0.3)


def logits(model, ids, name="policy"):
    with torch.no_grad(), lora.adapter(model, name):
        return model(ids).logits


# --------------------------------------------------------------------------------------------------
# Step 0 and the formula.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_at_step_0_the_adapted_model_is_the_base_to_the_bit(arch):
    model = tiny(arch)
    ids = token_ids(model)
    with torch.no_grad():
        base = model(ids).logits
    lora.add_adapters(model, POLICY, names=("policy", "critic"))
    assert len(lora.lora_linears(model)) == len(lora.ALL_TARGETS) * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # names[0], the policy, starts active
    assert torch.equal(logits(model, ids, "critic"), base)
    assert torch.equal(logits(model, ids, None), base)


def test_the_same_seed_draws_the_same_adapters_and_leaves_the_global_rng_alone():
    first = lora.add_adapters(tiny(), POLICY, names=("policy", "critic"), seed=5)
    torch.manual_seed(0)
    expected_next_draw = torch.rand(3)
    torch.manual_seed(0)
    second = lora.add_adapters(tiny(), POLICY, names=("policy", "critic"), seed=5)
    assert torch.equal(torch.rand(3), expected_next_draw)
    other = lora.add_adapters(tiny(), POLICY, names=("policy", "critic"), seed=6)
    for name in ("policy", "critic"):
        a1, a2, a3 = (lora.adapter_parameters(m, name)[0] for m in (first, second, other))
        assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    a_policy, a_critic = (lora.adapter_parameters(first, n)[0] for n in ("policy", "critic"))
    assert not torch.equal(a_policy, a_critic)


def test_a_wrapped_linear_is_w_x_plus_b_plus_scaled_b_a_x_in_float64():
    base = nn.Linear(6, 5).double()
    wrapped = lora.LoraLinear(base)
    config = lora.LoraConfig(rank=3, alpha=6.0)
    wrapped.add_adapter("policy", config, torch.Generator().manual_seed(7))
    a, b = wrapped.lora_A["policy"].weight, wrapped.lora_B["policy"].weight
    assert a.dtype == b.dtype == torch.float64 and a.shape == (3, 6) and b.shape == (5, 3)
    assert torch.equal(b, torch.zeros(5, 3, dtype=torch.float64))
    # A ~ U(-1/sqrt(in), 1/sqrt(in)), nn.Linear's own init, drawn from the caller's generator
    bound = 1 / math.sqrt(6)
    expected_a = torch.empty(3, 6, dtype=torch.float64).uniform_(
        -bound, bound, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, expected_a, atol=1e-15, rtol=0)
    with torch.no_grad():
        b.copy_(torch.randn(5, 3, dtype=torch.float64))
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    s = config.alpha / config.rank
    w, bias = base.weight, base.bias
    expected = x @ w.T + bias + s * x @ a.T @ b.T
    wrapped.active = "policy"
    torch.testing.assert_close(wrapped(x), expected, atol=1e-12, rtol=0)
    merged = lora.merged_weight(wrapped, "policy")  # an fp64 base merges in fp64
    torch.testing.assert_close(merged, w + s * b @ a, atol=1e-12, rtol=0)
    wrapped.active = None
    torch.testing.assert_close(wrapped(x), x @ w.T + bias, atol=1e-12, rtol=0)


def test_dropout_reaches_only_the_adapters_input_and_only_in_training():
    config = lora.LoraConfig(rank=2, alpha=3.0, dropout=0.5)
    model = lora.add_adapters(tiny(), config)
    randomize_b(model, "policy")
    wrapped = model.model.layers[0].mlp.up_proj
    assert not wrapped.training and not wrapped.lora_dropout["policy"].training  # as the model
    x = torch.randn(4, 64)
    s = config.alpha / config.rank
    w, a, b = (m.weight.detach() for m in (wrapped.base_layer, wrapped.lora_A["policy"],
                                           wrapped.lora_B["policy"]))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), x @ w.T + s * x @ a.T @ b.T, atol=1e-5, rtol=0)
        model.train()
        torch.manual_seed(3)
        out = wrapped(x)
        torch.manual_seed(3)  # the same draws: the mask dropout applied above
        dropped = nn.functional.dropout(x, 0.5, training=True)
    assert (dropped == 0).any() and (dropped != 0).any()
    torch.testing.assert_close(out, x @ w.T + s * dropped @ a.T @ b.T, atol=1e-5, rtol=0)


def test_the_adapted_model_equals_the_merged_model():
    model = tiny("qwen2")
    lora.add_adapters(model, POLICY)
    randomize_b(model, "policy")
    ids = token_ids(model)
    adapted = logits(model, ids)
    plain = tiny("qwen2", seed=9)  # another model's weights, all overwritten by the load
    plain.load_state_dict(dict(lora.merged_parameters(model, "policy")))
    with torch.no_grad():
        merged = plain(ids).logits
    assert not torch.allclose(adapted, logits(model, ids, None), atol=1e-3)  # B A is not small
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# What trains: only the adapters, each on its own.
# --------------------------------------------------------------------------------------------------
def test_only_the_adapters_train_and_each_adapter_gets_its_own_gradients():
    model = tiny("llama")
    lora.add_adapters(model, POLICY, names=("policy", "critic"))
    policy = lora.adapter_parameters(model, "policy")
    critic = lora.adapter_parameters(model, "critic")
    assert len(policy) == len(critic) == 2 * len(lora.lora_linears(model))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in policy + critic}
    randomize_b(model, "policy", seed=1)
    randomize_b(model, "critic", seed=2)
    ids = token_ids(model)
    weights = torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(3))
    with lora.adapter(model, "critic"):
        (model(ids).logits * weights).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic)
    assert all(p.grad is None for p in model.parameters() if id(p) not in {id(q) for q in critic})
    critic_grads = [p.grad.clone() for p in critic]
    with lora.adapter(model, "policy"):
        (model(ids).logits * weights).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy)
    assert all(torch.equal(p.grad, g) for p, g in zip(critic, critic_grads))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_one_base_three_roles_and_the_selection_comes_back():
    model = tiny("qwen2")
    ids = token_ids(model)
    with torch.no_grad():
        base = model(ids).logits
    lora.add_adapters(model, POLICY, names=("policy", "critic"))
    randomize_b(model, "policy", seed=1)
    randomize_b(model, "critic", seed=2)
    policy, critic = logits(model, ids, "policy"), logits(model, ids, "critic")
    assert not torch.allclose(policy, critic, atol=1e-3)
    with torch.no_grad(), lora.adapter(model, "critic"):
        with lora.adapter(model, None):
            assert torch.equal(model(ids).logits, base)  # the reference policy: the base exactly
        assert torch.equal(model(ids).logits, critic)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, policy)  # the default selection, restored


def test_an_adapter_on_some_targets_leaves_the_others_as_the_base():
    model = tiny("qwen2")
    lora.add_adapters(model, POLICY)
    lora.add_adapters(model, lora.LoraConfig(rank=1, alpha=1.0, targets=("up_proj",)),
                      names=("critic",), seed=1)
    randomize_b(model, "policy")
    with torch.no_grad():
        for wrapped in lora.lora_linears(model).values():
            if "critic" in wrapped.lora_B:
                wrapped.lora_B["critic"].weight.fill_(0.5)
    ids = token_ids(model)
    plain = tiny("qwen2", seed=9)
    plain.load_state_dict(dict(lora.merged_parameters(model, "critic")))
    with torch.no_grad():
        merged = plain(ids).logits
    torch.testing.assert_close(logits(model, ids, "critic"), merged, atol=1e-5, rtol=0)
    assert lora.adapter_names(model) == ["policy", "critic"]
    assert len(lora.adapter_parameters(model, "critic")) == 2 * model.config.num_hidden_layers


# --------------------------------------------------------------------------------------------------
# Merging.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_merge_unmerge_and_merged_parameters(tied):
    model = tiny("llama", tie_embeddings=tied)
    unwrapped_keys = list(model.state_dict())
    lora.add_adapters(model, POLICY, names=("policy", "critic"))
    randomize_b(model, "policy")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    s = POLICY.alpha / POLICY.rank
    merged = dict(lora.merged_parameters(model, "policy"))
    assert list(merged) == unwrapped_keys
    wrapped = lora.lora_linears(model)
    for key, tensor in merged.items():
        path, _, leaf = key.rpartition(".")
        if path not in wrapped:
            expected = state[key]
        elif leaf == "bias":
            expected = state[f"{path}.base_layer.bias"]
        else:
            a, b = state[f"{path}.lora_A.policy.weight"], state[f"{path}.lora_B.policy.weight"]
            expected = state[f"{path}.base_layer.weight"] + s * b @ a
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0)
    ids = token_ids(model)
    adapted = logits(model, ids)
    lora.merge(model, "policy")
    for path, wrapped in lora.lora_linears(model).items():
        assert torch.equal(wrapped.base_layer.weight, merged[f"{path}.weight"])
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="'policy' is merged"):
        logits(model, ids, None)  # the base is not there any more: no silent wrong reference
    with pytest.raises(RuntimeError, match="'policy' is merged"):
        lora.merge(model, "critic")
    lora.unmerge(model, "policy")
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)


def test_merge_and_unload_gives_a_plain_model_that_saves_as_a_normal_folder(tmp_path):
    model = tiny("qwen2")
    plain_keys = list(model.state_dict())
    lora.add_adapters(model, POLICY, names=("policy", "critic"))
    randomize_b(model, "policy")
    ids = token_ids(model)
    adapted = logits(model, ids)
    unloaded = lora.merge_and_unload(model, "policy")
    assert not lora.lora_linears(unloaded)
    layer = unloaded.model.layers[1]
    assert type(layer.mlp.up_proj) is type(layer.self_attn.q_proj) is nn.Linear
    assert list(unloaded.state_dict()) == plain_keys
    unloaded.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert list(reloaded.state_dict()) == plain_keys
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(rank=0, alpha=1.0), "rank must be an integer >= 1, got 0"),
    (dict(rank=2.5, alpha=1.0), "rank must be an integer >= 1, got 2.5"),
    (dict(rank=1, alpha=0.0), "alpha must be > 0, got 0.0"),
    (dict(rank=1, alpha=-2), "alpha must be > 0, got -2"),
    (dict(rank=1, alpha=1.0, targets=("q_proj", "qproj")), "unknown LoRA target 'qproj'"),
    (dict(rank=1, alpha=1.0, targets="q_proj"), "non-empty tuple"),
    (dict(rank=1, alpha=1.0, dropout=1.0), "dropout must be in"),
])
def test_a_bad_config_names_what_is_wrong(fields, message):
    with pytest.raises(ValueError, match=message):
        lora.add_adapters(tiny(), lora.LoraConfig(**fields))


def test_an_architecture_without_the_target_or_the_layers_is_named():
    phi3 = AutoModelForCausalLM.from_config(Phi3Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))  # fused qkv_proj
    with pytest.raises(ValueError, match=r"'q_proj': model.layers.0.self_attn has no nn.Linear"):
        lora.add_adapters(phi3, lora.LoraConfig(rank=1, alpha=1.0, targets=("q_proj",)))
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no model.layers"):
        lora.add_adapters(gpt2, POLICY)
    model = lora.add_adapters(tiny(), lora.LoraConfig(rank=1, alpha=1.0, targets=("up_proj",)))
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj already has an adapter "
                                         "named 'policy'"):
        lora.add_adapters(model, POLICY)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # all or nothing
    with pytest.raises(ValueError, match="adapter name must be a Python identifier, got 'a.b'"):
        lora.add_adapters(model, POLICY, names=("a.b",))
    with pytest.raises(ValueError, match="no adapter named 'critic'; this model has 'policy'"):
        with lora.adapter(model, "critic"):
            pass


# --------------------------------------------------------------------------------------------------
# A bf16 base with fp32 adapters.
# --------------------------------------------------------------------------------------------------
def test_a_bf16_base_with_fp32_adapters_runs_with_and_without_autocast():
    model = tiny("qwen2", dtype="bfloat16")
    ids = token_ids(model)
    with torch.no_grad():
        base = model(ids).logits
    lora.add_adapters(model, POLICY)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    randomize_b(model, "policy")
    params = lora.adapter_parameters(model, "policy")
    assert all(p.dtype == torch.float32 for p in params)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    # the reference: the same numbers (bf16 base values, fp32 adapters) computed all in fp32
    reference = logits(copy.deepcopy(model).float(), ids)
    # bf16 rounding must stay small next to what the adapter changes
    tolerance = 0.05 * (reference - logits(copy.deepcopy(model).float(), ids, None)).abs().max()
    plain = model(ids).logits
    with torch.autocast("cpu", torch.bfloat16):
        autocast = model(ids).logits
    for out in (plain, autocast):
        assert out.dtype == torch.bfloat16
        assert (out.float() - reference).abs().max() < tolerance
        out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


# --------------------------------------------------------------------------------------------------
# PEFT's files, both ways (peft is a test dependency: lora.py never imports it).
# --------------------------------------------------------------------------------------------------
def save_adapter(folder, adapter_config, tensors):
    """What checkpoint.py writes: PEFT's two files."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    save_file(tensors, folder / "adapter_model.safetensors")


def test_an_adapter_saved_here_loads_in_peft_with_the_same_logits(tmp_path):
    import peft
    model = tiny("qwen2")
    model.save_pretrained(tmp_path / "base")
    config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1)  # dropout is off in eval mode
    lora.add_adapters(model, config, names=("critic", "policy"))
    randomize_b(model, "policy")
    save_adapter(tmp_path / "adapter", lora.peft_config(config, str(tmp_path / "base")),
                 lora.peft_state_dict(model, "policy"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    loaded = theirs.peft_config["default"]
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout) == (4, 8.0, 0.1)
    assert set(loaded.target_modules) == set(lora.ALL_TARGETS)
    ids = token_ids(model)
    with torch.no_grad():
        expected = theirs(ids).logits
    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(model, ids, None), atol=1e-3)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_an_adapter_saved_by_peft_loads_here_with_the_same_logits(tmp_path):
    import peft
    tiny("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torch.manual_seed(4)  # init_lora_weights=False: PEFT draws B at random too, from torch's RNG
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
        task_type="CAUSAL_LM", init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ids = token_ids(base)
    with torch.no_grad():
        expected = theirs(ids).logits
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config = lora.config_from_peft(adapter_config)
    assert config == lora.LoraConfig(rank=2, alpha=3, dropout=0.0,
                                     targets=("gate_proj", "k_proj", "o_proj", "up_proj"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lora.add_adapters(model, config, names=("critic",))
    lora.load_peft_state_dict(model, "critic",
                              load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    ours = logits(model, ids, "critic")
    assert not torch.allclose(ours, logits(model, ids, None), atol=1e-3)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_a_peft_state_dict_that_does_not_fit_names_the_key():
    model = lora.add_adapters(tiny(), lora.LoraConfig(rank=2, alpha=2.0, targets=("v_proj",)))
    tensors = lora.peft_state_dict(model, "policy")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert key in tensors and len(tensors) == 2 * model.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"missing 1 key.*'policy', the first '{key}'"):
        lora.load_peft_state_dict(model, "policy", {k: v for k, v in tensors.items() if k != key},
                                  source="run/adapter_model.safetensors")
    extra = key.replace("v_proj", "q_proj")
    with pytest.raises(ValueError, match=f"unexpected key '{extra}'"):
        lora.load_peft_state_dict(model, "policy", {**tensors, extra: tensors[key]})
    with pytest.raises(ValueError, match=rf"{key} has shape \[3, 2\].*expects \[32, 2\]"):
        lora.load_peft_state_dict(model, "policy", {**tensors, key: torch.zeros(3, 2)})


@pytest.mark.parametrize("change, message", [
    (dict(peft_type="IA3"), "peft_type is 'IA3'"),
    (dict(use_dora=True), "use_dora=True is not supported"),
    (dict(use_rslora=True), "use_rslora=True is not supported"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern="),
    (dict(bias="all"), "bias 'all'"),
    (dict(target_modules=".*proj"), "target_modules must be a list"),
    (dict(target_modules=["lm_head"]), "unknown LoRA target 'lm_head'"),
    (dict(r=0), "rank must be an integer >= 1, got 0"),
])
def test_a_peft_config_this_file_cannot_compute_is_named(change, message):
    adapter_config = {**lora.peft_config(POLICY), **change}
    with pytest.raises(ValueError, match=f"^run/adapter_config.json: .*{message}"):
        lora.config_from_peft(adapter_config, source="run/adapter_config.json")
