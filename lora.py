"""LoRA written out by hand: low-rank adapters on one frozen base that serves three roles.

Copy this file on its own: it needs only torch. LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models") freezes each pretrained weight W [out, in] and learns a low-rank update
beside it:
    y = W x + b + (alpha / r) B A x,    A [r, in] random,  B [out, r] zero
so that at step 0 the adapted model IS the base, to the bit. Only A and B train: for Qwen2.5-3B at
rank 1 on every linear, well under 0.1% of the parameters, which is what lets the policy, the
critic and the reference fit one GPU on ONE shared base:
    policy    = base + the "policy" adapters            (with adapter(model, "policy"))
    reference = the same base, adapters off             (with adapter(model, None))
    critic    = the same base + the "critic" adapters   (with adapter(model, "critic")) + a value
                head, which the caller owns
"LoRA Without Regret" (Schulman et al., Thinking Machines, 2025) is why this is enough for RL: in
policy-gradient training even rank-1 LoRA matches full fine-tuning when the adapters sit on every
layer, MLPs above all (ALL_TARGETS, the default), with a learning rate about 10x full
fine-tuning's.

In the order a run uses them: add_adapters wraps the target linears and freezes everything else;
adapter selects which adapter (or none) every wrapped linear applies; adapter_parameters is what
each adapter's optimizer updates; merged_parameters is what the sampler loads once a step (it
samples from merged weights, never through the per-token adapter arithmetic); merge, unmerge and
merge_and_unload fold an adapter into the base for evaluation with plain Hugging Face code.
Last, PEFT's on-disk layout (peft_config, peft_state_dict and their inverses), so that
`peft.PeftModel.from_pretrained(base, folder)` loads what a run saved and the other way round; the
caller writes the files (json and safetensors), this file only builds what goes in them.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

# The seven linears of a Llama-family decoder layer (llama, mistral, qwen2, qwen3): attention's
# under `self_attn`, the SwiGLU MLP's under `mlp`.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """At least fp32: a bf16 base's adapters, and every merge, are computed in fp32 (the adapter is
    then AdamW's master weight); an fp64 base keeps fp64."""
    return torch.promote_types(base_dtype, torch.float32)


@dataclass(frozen=True)
class LoraConfig:
    """One adapter's shape: its rank r, its alpha (the update is scaled by alpha / r), the linears
    it adapts, and the dropout on its input (0: none, the default)."""
    rank: int
    alpha: float
    targets: tuple[str, ...] = ALL_TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty tuple of names from "
                             f"{', '.join(ALL_TARGETS)}; got {self.targets!r}")
        for target in self.targets:
            if target not in ALL_TARGETS:
                raise ValueError(f"unknown LoRA target {target!r}: the targets are the linears "
                                 f"of a decoder layer, {', '.join(ALL_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets name a linear twice: {self.targets!r}")
        # In one order whatever the caller's (PEFT saves a set): the same targets are the same
        # config, and add_adapters draws the same adapters for them.
        object.__setattr__(self, "targets", tuple(t for t in ALL_TARGETS if t in self.targets))


# --------------------------------------------------------------------------------------------------
# The wrapped linear.
# --------------------------------------------------------------------------------------------------
class LoraLinear(nn.Module):
    """A frozen nn.Linear with several named adapters beside it, at most one of them active.

    The names of its parameters are PEFT's in memory: the base keeps its own under `base_layer`
    (`<path>.base_layer.weight`), adapter "policy" is `<path>.lora_A.policy.weight` [r, in] and
    `<path>.lora_B.policy.weight` [out, r].
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None  # None: the adapters are off, this is the base linear
        self.merged: str | None = None  # the adapter folded into base_layer.weight, if any
        self.train(base_layer.training)  # a model in eval mode stays in it: no dropout

    def add_adapter(self, name: str, config: LoraConfig, generator: torch.Generator):
        """Add adapter `name`: A drawn from `generator`, B zero, both in adapter_dtype."""
        base = self.base_layer.weight
        dtype = adapter_dtype(base.dtype)
        # Drawn on the CPU, then moved: the same seed gives the same adapter on every device, so
        # every torchrun rank builds the same one.
        a = torch.empty(config.rank, self.base_layer.in_features, dtype=dtype)
        # A ~ U(-1/sqrt(in), 1/sqrt(in)): nn.Linear's default init (kaiming_uniform_ with
        # a = sqrt(5)), which PEFT draws for A where Hu et al. 2021 (section 4.1) say "a random
        # Gaussian": either keeps B A x at zero while B = 0; this one matches PEFT's adapters.
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        # B = 0, so B A = 0 and the adapted layer is the base layer at step 0 (Hu et al. 2021,
        # section 4.1: "zero initialization for B, so delta W = B A is zero at the beginning").
        b = torch.zeros(self.base_layer.out_features, config.rank, dtype=dtype)
        self.lora_A[name] = linear_holding(a.to(base.device))
        self.lora_B[name] = linear_holding(b.to(base.device))
        dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_dropout[name] = dropout.train(self.training)
        # alpha / r (Hu et al. 2021, section 4.1): it "helps to reduce the need to retune
        # hyperparameters when we vary r".
        self.scaling[name] = config.alpha / config.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.active == self.merged:
            return y  # the base, or the adapter already folded into it (merge)
        if self.merged is not None:
            # the base weight is not W any more: no silent wrong reference policy
            raise RuntimeError(f"adapter {self.merged!r} is merged into the base weight: "
                               f"unmerge it before using {self.active or 'the base'!r}")
        if self.active is None:
            return y
        lora_a = self.lora_A[self.active]
        lora_b = self.lora_B[self.active]
        # The adapter's path runs in the adapter's dtype (a bf16 base's activations are cast up
        # to the fp32 adapter unless autocast casts them all down)
        x = self.lora_dropout[self.active](x.to(lora_a.weight.dtype))
        # h = W x + (alpha / r) B A x (Hu et al. 2021, eq. 3 with the scaling of section 4.1);
        # the sum is rounded to y's dtype once.
        update = lora_b(lora_a(x)) * self.scaling[self.active]
        return (y + update).to(y.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """(alpha / r) B A [out, in] in adapter_dtype, without grad: what merging adds to W."""
        lora_a = self.lora_A[name].weight.detach()
        lora_b = self.lora_B[name].weight.detach()
        # delta W = (alpha / r) B A (Hu et al. 2021, eq. 3 and section 4.1)
        return (lora_b @ lora_a) * self.scaling[name]


def linear_holding(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear without bias whose weight is `weight`, built without drawing a default init
    (which would use, and move, the caller's global random state)."""
    module = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=False,
                                device="meta")
    module.weight = nn.Parameter(weight)
    return module


# --------------------------------------------------------------------------------------------------
# Adding adapters to a model, and choosing which one is on.
# --------------------------------------------------------------------------------------------------
def add_adapters(model: nn.Module, config: LoraConfig, names=("policy",), seed: int = 0):
    """Wrap `config.targets` in every decoder layer (`model.model.layers[i].self_attn` and `.mlp`)
    and add one adapter per name to each; then freeze every parameter of the model that is not an
    adapter's (base weights, embeddings, norms, head). Linears wrapped by an earlier call keep their
    adapters and their selection; a linear wrapped here starts with `names[0]` active. Every
    adapter's A is drawn from one generator seeded with `seed`, layer by layer, target by target,
    name by name: same seed, same adapters, on every rank. Returns the model."""
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"adapter name must be a Python identifier, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat: {names!r}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: add_adapters knows the "
                         f"Llama family's decoder layers (llama, mistral, qwen2, qwen3)")
    sites = []  # (block, target, linear): every check passes before the model changes
    for i, layer in enumerate(layers):
        for target in config.targets:
            block_name = "self_attn" if target in ATTENTION_TARGETS else "mlp"
            block = getattr(layer, block_name, None)
            module = getattr(block, target, None)
            if not isinstance(module, (nn.Linear, LoraLinear)):
                raise ValueError(f"LoRA target {target!r}: model.layers.{i}.{block_name} has no "
                                 f"nn.Linear named {target!r} in this {type(model).__name__}")
            taken = [name for name in names if name in getattr(module, "lora_A", {})]
            if taken:
                raise ValueError(f"model.layers.{i}.{block_name}.{target} already has an "
                                 f"adapter named {taken[0]!r}")
            sites.append((block, target, module))
    generator = torch.Generator().manual_seed(seed)
    for block, target, module in sites:
        if isinstance(module, nn.Linear):
            module = LoraLinear(module)
            module.active = names[0]
            setattr(block, target, module)
        for name in names:
            module.add_adapter(name, config, generator)
    for p in model.parameters():
        p.requires_grad_(False)
    for wrapped in lora_linears(model).values():
        for p in [*wrapped.lora_A.parameters(), *wrapped.lora_B.parameters()]:
            p.requires_grad_(True)
    return model


def lora_linears(model: nn.Module) -> dict[str, LoraLinear]:
    """Every wrapped linear of the model, by its module path ("model.layers.0.self_attn.q_proj")."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters of the model, in the order they were added."""
    names = {}
    for wrapped in lora_linears(model).values():
        names.update(dict.fromkeys(wrapped.lora_A))
    return list(names)


def check_adapter(model: nn.Module, name: str):
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; this model has "
                         f"{', '.join(map(repr, names)) or 'none (add_adapters first)'}")


@contextlib.contextmanager
def adapter(model: nn.Module, name: str | None):
    """Make adapter `name` the active one on every wrapped linear (None: the adapters off, i.e. the
    base, the reference policy) for the `with` block; the previous selection comes back on exit.
    One base, three roles: `with lora.adapter(model, "critic"): values = critic(...)`."""
    if name is not None:
        check_adapter(model, name)
    wrapped = list(lora_linears(model).values())
    previous = [m.active for m in wrapped]
    for m in wrapped:
        m.active = name if name in m.lora_A else None  # a linear without `name` is the base
    try:
        yield model
    finally:
        for m, active in zip(wrapped, previous):
            m.active = active


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter `name`, linear by linear, A then B: what that
    adapter's optimizer updates."""
    check_adapter(model, name)
    params = []
    for wrapped in lora_linears(model).values():
        if name in wrapped.lora_A:
            params += [wrapped.lora_A[name].weight, wrapped.lora_B[name].weight]
    return params


# --------------------------------------------------------------------------------------------------
# Merging: W + (alpha / r) B A, for the sampler and for plain-model evaluation.
# --------------------------------------------------------------------------------------------------
def merged_weight(wrapped: LoraLinear, name: str) -> torch.Tensor:
    """W + (alpha / r) B A (Hu et al. 2021, section 4.1, "No Additional Inference Latency": "we
    can explicitly compute and store W = W0 + BA"), summed in adapter_dtype, returned in W's."""
    weight = wrapped.base_layer.weight.detach()
    if wrapped.merged == name:
        return weight
    if wrapped.merged is not None:
        raise RuntimeError(f"adapter {wrapped.merged!r} is merged into the base weight: unmerge "
                           f"it before merging {name!r}")
    return (weight.to(adapter_dtype(weight.dtype)) + wrapped.delta_weight(name)).to(weight.dtype)


@torch.no_grad()
def merged_parameters(model: nn.Module, name: str):
    """Yield (name, tensor) for every parameter of the model under the names of the UNWRAPPED
    Hugging Face model ("model.layers.0.self_attn.q_proj.weight", tied aliases included, as its
    state dict has them), each wrapped weight replaced by W + (alpha / r) B A of adapter `name`.
    The adapters' own parameters are left out. Plain tensors in, plain tensors out: under FSDP2,
    gather the shards first."""
    check_adapter(model, name)
    wrapped = lora_linears(model)
    adapter_modules = {f"{path}.{part}.{adapter_name}" for path, m in wrapped.items()
                       for part in ("lora_A", "lora_B") for adapter_name in m.lora_A}
    for key, tensor in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = key.rpartition(".")
        if owner in adapter_modules:
            continue
        wrapper_path = owner.removesuffix(".base_layer")
        if wrapper_path not in wrapped:
            yield key, tensor.detach()
        elif leaf == "weight" and name in wrapped[wrapper_path].lora_A:
            yield f"{wrapper_path}.weight", merged_weight(wrapped[wrapper_path], name)
        else:
            yield f"{wrapper_path}.{leaf}", tensor.detach()


@torch.no_grad()
def merge(model: nn.Module, name: str):
    """Fold adapter `name` into every base weight in place: W <- W + (alpha / r) B A. The model
    then runs as fast as the base while `name` is active; selecting another adapter, or none,
    raises until unmerge. In bf16, merge then unmerge rounds W twice: use merged_parameters for a
    copy that leaves the model untouched."""
    check_adapter(model, name)
    wrapped = [m for m in lora_linears(model).values() if name in m.lora_A]
    others = {m.merged for m in wrapped} - {None, name}
    if others:  # checked before any weight changes: all or nothing
        raise RuntimeError(f"adapter {others.pop()!r} is merged into the base weight: unmerge it "
                           f"before merging {name!r}")
    for module in wrapped:
        module.base_layer.weight.copy_(merged_weight(module, name))
        module.merged = name


@torch.no_grad()
def unmerge(model: nn.Module, name: str):
    """Undo merge: W <- W - (alpha / r) B A, in adapter_dtype, back in W's dtype."""
    check_adapter(model, name)
    for wrapped in lora_linears(model).values():
        if wrapped.merged == name:
            weight = wrapped.base_layer.weight
            exact = weight.to(adapter_dtype(weight.dtype)) - wrapped.delta_weight(name)
            weight.copy_(exact.to(weight.dtype))
            wrapped.merged = None


@torch.no_grad()
def merge_and_unload(model: nn.Module, name: str) -> nn.Module:
    """The plain model: every wrapper replaced, in place, by its base nn.Linear holding
    W + (alpha / r) B A of adapter `name`; the other adapters are dropped. Its state dict has the
    Hugging Face names and `save_pretrained` writes a normal folder. Its parameters stay frozen
    as add_adapters left them."""
    merge(model, name)
    for path, wrapped in lora_linears(model).items():
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, wrapped.base_layer)
    return model


# --------------------------------------------------------------------------------------------------
# PEFT's on-disk layout: adapter_config.json and adapter_model.safetensors.
# --------------------------------------------------------------------------------------------------
# PEFT options that change the arithmetic above (rank-stabilised scaling, DoRA, per-module ranks,
# extra trained modules, ...): an adapter_config.json that turns one on cannot load here.
PEFT_OPTIONS_NOT_HANDLED = (
    "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern",
    "modules_to_save", "layers_to_transform", "layers_pattern", "layer_replication",
    "exclude_modules", "target_parameters", "trainable_token_indices", "use_qalora",
    "alora_invocation_tokens", "use_bdlora")
PEFT_PREFIX = "base_model.model."  # where PeftModel puts the wrapped Hugging Face model


def peft_config(config: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json of an adapter of this shape, as peft.PeftModel.from_pretrained
    reads it (PEFT fills every field left out with its default)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path, "r": config.rank,
            "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": list(config.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None}


def config_from_peft(adapter_config: dict, source="adapter_config.json") -> LoraConfig:
    """The LoraConfig of a PEFT adapter_config.json's contents; ValueError naming `source` and the
    field for anything this file does not compute the same way."""
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type is {adapter_config.get('peft_type')!r}, not "
                         f"'LORA'")
    if adapter_config.get("bias", "none") != "none":
        raise ValueError(f"{source}: bias {adapter_config['bias']!r} trains the base's biases; "
                         f"only 'none' loads here")
    for option in PEFT_OPTIONS_NOT_HANDLED:
        if adapter_config.get(option):
            raise ValueError(f"{source}: {option}={adapter_config[option]!r} is not supported "
                             f"here (it changes what the adapter computes)")
    targets = adapter_config.get("target_modules")
    if not isinstance(targets, (list, tuple)):
        raise ValueError(f"{source}: target_modules must be a list of names from "
                         f"{', '.join(ALL_TARGETS)}, got {targets!r}")
    try:
        return LoraConfig(rank=adapter_config.get("r"), alpha=adapter_config.get("lora_alpha"),
                          targets=tuple(targets), dropout=adapter_config.get("lora_dropout", 0.0))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{source}: {error}") from None


def peft_keyed_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s parameters under the keys PEFT saves (adapter_model.safetensors):
    `base_model.model.<path>.lora_A.weight`, the adapter's name dropped."""
    check_adapter(model, name)
    params = {}
    for path, wrapped in lora_linears(model).items():
        if name in wrapped.lora_A:
            params[f"{PEFT_PREFIX}{path}.lora_A.weight"] = wrapped.lora_A[name].weight
            params[f"{PEFT_PREFIX}{path}.lora_B.weight"] = wrapped.lora_B[name].weight
    return params


def peft_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """What adapter_model.safetensors holds for adapter `name`: its tensors under PEFT's keys."""
    return {key: p.detach() for key, p in peft_keyed_parameters(model, name).items()}


@torch.no_grad()
def load_peft_state_dict(model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
                         source="adapter_model.safetensors"):
    """Copy a PEFT-layout adapter (peft_state_dict's keys) into adapter `name`, which add_adapters
    made with the same LoraConfig (config_from_peft of the adapter_config.json). Every key must
    match one of the adapter's tensors, in shape: ValueError naming `source` and the key
    otherwise."""
    own = peft_keyed_parameters(model, name)
    missing = [key for key in own if key not in tensors]
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} key(s) of adapter {name!r}, the "
                         f"first {missing[0]!r}")
    unexpected = [key for key in tensors if key not in own]
    if unexpected:
        raise ValueError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all): "
                         f"adapter {name!r} has no such tensor")
    for key, param in own.items():
        if tensors[key].shape != param.shape:
            raise ValueError(f"{source}: {key} has shape {list(tensors[key].shape)}, adapter "
                             f"{name!r} expects {list(param.shape)}")
        param.copy_(tensors[key])
