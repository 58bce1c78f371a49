"""The memory a training run holds on one GPU at its peak, by arithmetic from the model's shape and
the run's flags: what decides whether a setting fits a GPU before it is tried (bench.py's paper
section runs only what fits, and compares the measured peak with this), and BENCHMARKS.md's table of
the paper's settings on one 80 GB GPU.

    python -m benchmarks.memory_plan            # the table, for Qwen2.5-3B's shape

A full fine-tuning step holds, per trained model, its fp32 master weights (4 bytes a parameter),
their fp32 gradients (4, as autocast leaves them) and AdamW's two fp32 moments (8): 16 bytes a
parameter, the total of ZeRO's accounting of mixed-precision Adam (Rajbhandari et al. 2020, section
3.1, there 2 + 2 + 12); the frozen reference its fp32 weights; the sampler its own copy in the
compute dtype and its KV cache, kept for the whole run (engine.py). On top of that, at two moments
of the update:
  - a backward: under gradient checkpointing each decoder layer's input (the residual stream, fp32
    under autocast over fp32 weights), one layer's activations recomputed, and one chunk of the LM
    head's logits (model.response_logprobs: bf16 logits, two fp32 copies, their fp32 gradient);
  - AdamW's step: torch's foreach AdamW computes sqrt(v) for every parameter at once, a temporary
    as large as the fp32 parameters (the activations are gone by then).
With LoRA (roles.py) one frozen base in the compute dtype serves all three roles, and only the
adapters (fp32) have gradients and AdamW state. Attention keeps no [L, L] scores (flash or
memory-efficient kernels). Sizes are upper bounds: every micro-batch row and every sampled row at
--max_prompt_tokens + --max_new_tokens.
"""
import copy
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

import lora
import model_zoo
import roles
import train_ppo
from benchmarks.measure import GB

# The logits chunk of model.response_logprobs
HEAD_CHUNK_TOKENS = 1024
# What "fits one 80 GB GPU" is checked against (an H100's 80 GiB hold more: this leaves room for
# the CUDA context and the allocator's fragments)
GPU_80GB = 80e9


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs of a model: counts from its config, exact (a model built on the
    meta device, which allocates nothing)."""
    parameters: int  # the causal LM's, tied embeddings once
    critic_parameters: int  # the value model's: the backbone and a value head
    layers: int
    hidden: int
    kv_numbers: int  # a token's K or V numbers in one layer: KV heads x head dim
    intermediate: int
    vocab: int
    adapter_sides: dict  # LoRA target -> in + out features of that linear (the same every layer)


def config_for(model: str):
    """A model name's config: model_zoo's random shapes by name, Qwen/Qwen2.5-3B as model_zoo's copy
    of its config.json (no download), else transformers' (a folder, or the Hub's cache)."""
    if model in model_zoo.RANDOM_NAMES:
        return model_zoo.qwen25_3b_config(**model_zoo.RANDOM_NAMES[model])
    if model == "Qwen/Qwen2.5-3B":
        return model_zoo.qwen25_3b_config()
    return AutoConfig.from_pretrained(model)


def shape_of(config) -> Shape:
    value_config = copy.deepcopy(config)
    value_config.num_labels = 1  # model.load_critic's value model: one number a token
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(config)
        critic = AutoModelForTokenClassification.from_config(value_config)
    layer = causal.model.layers[0]
    sides = {}
    for target in lora.ALL_TARGETS:
        block = layer.self_attn if target in lora.ATTENTION_TARGETS else layer.mlp
        linear = getattr(block, target)
        sides[target] = linear.in_features + linear.out_features
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(parameters=sum(p.numel() for p in causal.parameters()),
                 critic_parameters=sum(p.numel() for p in critic.parameters()),
                 layers=config.num_hidden_layers, hidden=config.hidden_size,
                 kv_numbers=config.num_key_value_heads * head_dim,
                 intermediate=config.intermediate_size, vocab=config.vocab_size,
                 adapter_sides=sides)


@dataclass(frozen=True)
class Item:
    """Bytes held at the peak, and when: "always" (the whole update), "backward" (the activations
    of one micro-batch), or "step" (during AdamW's step)."""
    name: str
    bytes: float
    when: str


@dataclass(frozen=True)
class Plan:
    items: list

    def at(self, when: str) -> float:
        return sum(i.bytes for i in self.items if i.when == when)

    @property
    def peak(self) -> float:
        """The larger of the two moments: a backward, AdamW's step."""
        return self.at("always") + max(self.at("backward"), self.at("step"))


def plan(cfg: train_ppo.Config, shape: Shape, with_sampler: bool = True) -> Plan:
    """The bytes of a one-process run of `cfg` at its peak (see the module docstring).
    with_sampler: count the sampler's own weights and KV cache (bench.py's update section builds
    no sampler)."""
    compute = 2 if cfg.dtype == "bfloat16" else 4  # bytes of a number in the compute dtype
    n = shape.parameters
    with_critic = cfg.advantage == "gae"
    items = []
    if cfg.lora_rank:
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        # an adapter's A [r, in] and B [out, r] on each target of every layer (Hu et al. 2021)
        adapter = cfg.lora_rank * shape.layers * sum(shape.adapter_sides[t] for t in targets)
        trained = adapter * (1 + with_critic) + shape.hidden * with_critic  # + the value head
        items.append(Item("frozen base in the compute dtype (every role's)", compute * n,
                          "always"))
        items.append(Item("adapters and value head: fp32 weights", 4 * trained, "always"))
        residual = compute  # the base computes in its own dtype
    else:
        trained = n + shape.critic_parameters * with_critic
        items.append(Item("policy: fp32 master weights", 4 * n, "always"))
        if with_critic:
            items.append(Item("critic: fp32 master weights", 4 * shape.critic_parameters,
                              "always"))
        if roles.needs_reference(cfg):
            items.append(Item("reference: fp32 weights (frozen)", 4 * n, "always"))
        residual = 4  # fp32 embeddings and residual adds under autocast over fp32 weights
    items.append(Item("trained: fp32 gradients", 4 * trained, "always"))
    items.append(Item("trained: AdamW's two fp32 moments", 8 * trained, "always"))
    sequence = cfg.max_prompt_tokens + cfg.max_new_tokens
    if with_sampler and cfg.engine != "plain":
        if roles.sampler_owns_weights(cfg):
            items.append(Item("sampler: its own weights in the compute dtype", compute * n,
                              "always"))
        # K and V of every layer for every row of a generate call, at the longest sequence
        kv = cfg.generate_batch_size * sequence * shape.layers * 2 * shape.kv_numbers * compute
        items.append(Item("sampler: KV cache", kv, "always"))
    tokens = cfg.micro_batch_size * sequence
    # a decoder layer's saved activations per token under autocast: its two norms' inputs in
    # the residual's dtype; in bf16 the q/k/v input, q and the GQA-repeated k and v, the attention
    # output, the MLP input, and gate, silu(gate), up and their product (3 + 4 hidden-sized ones
    # counted as 6 with q, k and v at hidden width, and 4 intermediate-sized)
    layer = 2 * residual * shape.hidden + compute * (6 * shape.hidden + 4 * shape.intermediate)
    if cfg.gradient_checkpointing:
        items.append(Item("activations: each layer's input (checkpoints)",
                          shape.layers * tokens * shape.hidden * residual, "backward"))
        items.append(Item("activations: one layer recomputed", tokens * layer, "backward"))
    else:
        items.append(Item("activations: every layer's", shape.layers * tokens * layer,
                          "backward"))
    chunk = min(HEAD_CHUNK_TOKENS, cfg.micro_batch_size * cfg.max_new_tokens)
    items.append(Item("activations: an LM-head chunk's logits and gradient",
                      chunk * shape.vocab * (compute + 3 * 4), "backward"))
    items.append(Item("AdamW's step: the foreach temporary sqrt(v)", 4 * trained, "step"))
    return Plan(items)


# ==================================================================================================
# BENCHMARKS.md's table
# ==================================================================================================
# The paper's settings on one GPU: the study's own, the critic-free ones, and LoRA
PAPER_SETTINGS = (("--preset paper", ["--preset", "paper"]),
                  ("--preset paper --advantage reinforce_pp",
                   ["--preset", "paper", "--advantage", "reinforce_pp"]),
                  ("--preset paper --advantage reinforce_pp --kl_coef 0",
                   ["--preset", "paper", "--advantage", "reinforce_pp", "--kl_coef", "0"]),
                  ("--preset paper_lora", ["--preset", "paper_lora"]))


def markdown(settings=PAPER_SETTINGS, model: str = "random-qwen2.5-3b") -> str:
    """One column a setting, one row an item, GB; the peaks and whether each fits 80 GB."""
    shape = shape_of(config_for(model))
    plans = [plan(train_ppo.parse_config(flags + ["--model", model]), shape)
             for _, flags in settings]
    names = []  # every plan's items, each after the item before it in its own plan
    for p in plans:
        previous = -1
        for item in p.items:
            if item.name not in names:
                names.insert(previous + 1, item.name)
            previous = names.index(item.name)
    lines = [f"Qwen2.5-3B's shape: {shape.parameters:,} parameters, {shape.layers} layers, hidden "
             f"{shape.hidden}, K and V {shape.kv_numbers} numbers a token and layer, MLP "
             f"{shape.intermediate}, vocabulary {shape.vocab:,}. GB = 1e9 bytes.", "",
             "| held at the peak (GB) | " + " | ".join(f"`{s}`" for s, _ in settings) + " |",
             "|---|" + "---:|" * len(settings)]
    for name in names:
        cells = []
        for p in plans:
            found = [i.bytes for i in p.items if i.name == name]
            cells.append(f"{found[0] / GB:.2f}" if found else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, when in (("peak during a backward", "backward"), ("peak during AdamW's step",
                                                                  "step")):
        cells = [f"{(p.at('always') + p.at(when)) / GB:.2f}" for p in plans]
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    lines.append("| **fits 80 GB** | " + " | ".join(
        "yes" if p.peak <= GPU_80GB else "no" for p in plans) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
