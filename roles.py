"""The three roles of a PPO run: the policy being trained, the frozen reference, the critic.

Full fine-tuning (--lora_rank 0, the study's): three models of their own, fp32 master weights
(bf16 compute by autocast in one process, by FSDP2's mixed precision under torchrun), the policy
and the critic each with AdamW. The reference is the policy's starting point, frozen, run as the
policy runs, so that the first KL is exactly 0. With no KL at all (--kl_coef 0, neither in the
reward nor in the loss) no reference is loaded.

LoRA (--lora_rank r; Hu et al. 2021, lora.py): ONE frozen base, in the compute dtype, serves all
three roles:
    policy    = base + the policy adapters
    reference = the same base, adapters off          (nothing is loaded twice)
    critic    = the same base + the critic adapters + a value head (OpenRLHF's)
Each role is a `Role`: a view of the base whose forward enters its adapter (lora.adapter). Only
the adapters and the value head have gradients and AdamW state.

What the trainers see either way is `Models`: the three roles (each takes a forward like a Hugging
Face model: model.response_logprobs and response_values run them), `trained` (each optimizer's
parameters and how a checkpoint holds them: a Hugging Face folder, or an adapter in PEFT's layout),
and `sampler_weights`: what the run's sampler copies into its own weights once a step (with LoRA
the merged W + (alpha / r) B A: sampling never runs the adapters token by token).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import TokenClassifierOutput

import common
import distributed
import flex
import lora
from model import layer_modules, load_critic, load_policy, save_model, save_tokenizer


@dataclass
class Trained:
    """What one optimizer trains, and how a checkpoint holds it."""
    module: nn.Module  # names the parameters: the keys of the optimizer's saved state
    params: list  # what the optimizer updates
    adapter: str | None = None  # LoRA: the adapter trained (saved in PEFT's layout); None: a model
    head: nn.Module | None = None  # the critic's value head, saved beside its adapter
    base_name: str = ""  # what the adapter is applied to (--model), for PEFT's config

    def gather(self) -> dict:
        """The weights to save, whole (under FSDP2 gathered; a collective, every rank calls it)."""
        if self.adapter is None:
            return distributed.full_model_state_dict(self.module)  # rank 0's; {} elsewhere
        base = self.module.base if isinstance(self.module, Role) else self.module
        tensors = lora.peft_state_dict(base, self.adapter)
        if self.head is not None:
            tensors["score.weight"] = self.head.weight
        return {name: distributed.full_tensor(t).detach().cpu() for name, t in tensors.items()}

    def write(self, folder: Path, state: dict, tokenizer) -> None:
        """Rank 0 writes the gathered weights: a Hugging Face folder, or PEFT's adapter folder
        (adapter_config.json, adapter_model.safetensors; the critic's value_head.safetensors)."""
        if self.adapter is None:
            save_model(self.module, tokenizer, folder, state_dict=state)
            return
        folder.mkdir(parents=True)
        head = {k: v for k, v in state.items() if k == "score.weight"}
        adapter = {k: v.contiguous() for k, v in state.items() if k not in head}
        base = self.module.base if isinstance(self.module, Role) else self.module
        config = lora.peft_config(lora_config_of(base), self.base_name)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
        save_file(adapter, folder / "adapter_model.safetensors")
        if head:
            save_file(head, folder / VALUE_HEAD)
        save_tokenizer(tokenizer, folder)


VALUE_HEAD = "value_head.safetensors"


@dataclass
class Models:
    """What a run trains and reads (see the module docstring)."""
    policy: nn.Module
    reference: nn.Module | None  # None: no KL, no reference
    critic: nn.Module | None  # None: critic-free advantages
    tokenizer: object
    device: torch.device
    trained: dict  # "policy" / "critic" -> Trained: the checkpoint's folder names
    base: nn.Module | None = None  # the shared frozen base of the LoRA roles
    sampler: object = None  # samplers.py's, set once the run knows its prompt lengths
    optimizers: dict = field(default_factory=dict)  # the names of `trained` -> AdamW
    schedulers: dict = field(default_factory=dict)  # the same names -> its LambdaLR


def base_name(cfg) -> str:
    """What a saved adapter names as its base: --model, a local folder made absolute (so that the
    run's adapters load from anywhere)."""
    return str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model


def needs_reference(cfg) -> bool:
    """A KL to the reference anywhere: in the reward, in the loss, or an adaptive beta's target."""
    return cfg.kl_coef > 0


def load(cfg, run) -> Models:
    """The run's roles (from the checkpoint when resuming), each sharded with FSDP2 under
    torchrun, mixed precision when --dtype bfloat16."""
    check_resumed_kind(cfg, run.resume_from)
    if cfg.lora_rank:
        return load_lora(cfg, run)
    amp = cfg.dtype == "bfloat16"
    resumed = run.resume_from
    policy, tokenizer = load_policy(str(resumed / "policy") if resumed else cfg.model,
                                    dtype="float32", device=run.device,
                                    gradient_checkpointing=cfg.gradient_checkpointing)
    reference = None
    if needs_reference(cfg):
        reference = load_policy(cfg.model, dtype="float32", device=run.device)[0]
        reference.requires_grad_(False)
    critic = None
    if cfg.advantage == "gae":
        source = str(resumed / "critic") if resumed else (cfg.critic_model or cfg.model)
        critic = load_critic(source, dtype="float32", device=run.device,
                             gradient_checkpointing=cfg.gradient_checkpointing)
    for m in (policy, reference, critic):
        if m is not None:
            flex.prepare_for_training(m, cfg.attention, cfg.compile, run.device)
            distributed.shard(m, layer_modules(m), mixed_precision=amp)
    # after sharding: FSDP2 replaces each parameter by its shard
    trained = {"policy": Trained(policy, list(policy.parameters()))}
    if critic is not None:
        trained["critic"] = Trained(critic, list(critic.parameters()))
    for item in trained.values():
        item.module.train()  # no dropout in these models: train() turns checkpointing on
    return Models(policy, reference, critic, tokenizer, run.device, trained)


def check_resumed_kind(cfg, checkpoint: Path | None) -> None:
    """A checkpoint of the other kind (LoRA adapters for a full fine-tuning run, or whole models for
    a LoRA run) stops the run as a bad --lora_rank, before anything is loaded from it."""
    if checkpoint is None:
        return
    holds_adapters = (checkpoint / "policy" / "adapter_config.json").is_file()
    if holds_adapters and not cfg.lora_rank:
        raise common.BadFlag(f"--lora_rank 0: {checkpoint / 'policy'} holds LoRA adapters; resume "
                             f"with the --lora_rank, --lora_alpha and --lora_targets it was "
                             f"trained with")
    if cfg.lora_rank and not holds_adapters:
        raise common.BadFlag(f"--lora_rank {cfg.lora_rank}: {checkpoint / 'policy'} holds a whole "
                             f"model, not LoRA adapters; resume it with --lora_rank 0")


# --------------------------------------------------------------------------------------------------
# LoRA: one frozen base for three roles
# --------------------------------------------------------------------------------------------------
class Role(nn.Module):
    """One role of the shared LoRA base: `base` run with `adapter` on (None: the reference), and
    for the critic a value head on the base's final hidden states. Takes the Hugging Face forward's
    arguments; `model`, `lm_head` and `config` are the base's."""

    def __init__(self, base, adapter: str | None, head: nn.Module | None = None):
        super().__init__()
        self.base, self.adapter, self.score = base, adapter, head
        self.config = base.config

    @property
    def model(self):
        return self.base.model

    @property
    def lm_head(self):
        return self.base.lm_head

    def forward(self, **kwargs):
        with lora.adapter(self.base, self.adapter):
            if self.score is None:
                return self.base(**kwargs)
            caught = []  # the backbone's output: the base runs whole, so FSDP2's hooks run
            hook = self.base.model.register_forward_hook(
                lambda module, args, out: caught.append(out.last_hidden_state))
            try:
                self.base(**kwargs, logits_to_keep=1)
            finally:
                hook.remove()
            return TokenClassifierOutput(logits=self.score(caught[0]))  # [R, L, 1]


def lora_config(cfg) -> lora.LoraConfig:
    """--lora_rank, --lora_alpha, --lora_targets as lora.py's config (ValueError when bad)."""
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    return lora.LoraConfig(cfg.lora_rank, cfg.lora_alpha, targets)


def lora_config_of(base) -> lora.LoraConfig:
    """The config the base's adapters were built with (for PEFT's adapter_config.json)."""
    return base.lora_config


def value_head(hidden: int, seed: int) -> nn.Linear:
    """OpenRLHF's value head: a linear map of the final hidden state to V, weights
    N(0, 1/(hidden + 1)^2), no bias; drawn from its own seeded generator (every rank the same)."""
    head = nn.Linear(hidden, 1, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 1 / (hidden + 1), generator=torch.Generator().manual_seed(seed))
    return head


def lora_base(cfg, run, names: tuple):
    """The frozen base in the compute dtype, with the named adapters (from the checkpoint when
    resuming). A --lora_targets linear the architecture lacks stops the run as a bad flag."""
    base, tokenizer = load_policy(cfg.model, dtype=cfg.dtype, device=run.device,
                                  gradient_checkpointing=cfg.gradient_checkpointing)
    config = lora_config(cfg)
    try:
        lora.add_adapters(base, config, names, seed=cfg.seed)
    except ValueError as e:
        raise common.BadFlag(f"--lora_targets {cfg.lora_targets!r}, --model {cfg.model}: "
                             f"{e}") from None
    base.lora_config = config
    if run.resume_from:
        load_adapter(base, "policy", run.resume_from / "policy")
    return base, tokenizer


def load_lora(cfg, run) -> Models:
    amp = cfg.dtype == "bfloat16"
    with_critic = cfg.advantage == "gae"
    base, tokenizer = lora_base(cfg, run, ("policy", "critic") if with_critic else ("policy",))
    head = value_head(base.config.hidden_size, cfg.seed).to(run.device) if with_critic else None
    if run.resume_from and with_critic:
        load_adapter(base, "critic", run.resume_from / "critic", head)
    flex.prepare_for_training(base, cfg.attention, cfg.compile, run.device)
    distributed.shard(base, layer_modules(base), mixed_precision=amp)
    if head is not None:
        distributed.shard(head, [], mixed_precision=amp)
    policy = Role(base, "policy")
    reference = Role(base, None) if needs_reference(cfg) else None
    critic = Role(base, "critic", head) if with_critic else None
    base.train()  # gradient checkpointing; the frozen base has no dropout either
    # after sharding: FSDP2 replaces each parameter by its shard
    trained = {"policy": Trained(base, lora.adapter_parameters(base, "policy"), "policy",
                                 base_name=base_name(cfg))}
    if with_critic:
        trained["critic"] = Trained(critic, lora.adapter_parameters(base, "critic") +
                                    [head.weight], "critic", head, base_name=base_name(cfg))
    return Models(policy, reference, critic, tokenizer, run.device, trained, base=base)


def load_sft(cfg, run):
    """train_sft.py's one role, the policy: (the module its forwards run, tokenizer, `trained` for
    the optimizer and the checkpoints): every weight, or LoRA adapters on a frozen base."""
    check_resumed_kind(cfg, run.resume_from)
    if cfg.lora_rank:
        policy, tokenizer = lora_base(cfg, run, ("policy",))
    else:
        source = str(run.resume_from / "policy") if run.resume_from else cfg.model
        policy, tokenizer = load_policy(source, dtype="float32", device=run.device,
                                        gradient_checkpointing=cfg.gradient_checkpointing)
    flex.prepare_for_training(policy, "sdpa", cfg.compile, run.device)
    distributed.shard(policy, layer_modules(policy), mixed_precision=cfg.dtype == "bfloat16")
    policy.train()
    # after sharding: FSDP2 replaces each parameter by its shard
    if cfg.lora_rank:
        item = Trained(policy, lora.adapter_parameters(policy, "policy"), "policy",
                       base_name=base_name(cfg))
    else:
        item = Trained(policy, list(policy.parameters()))
    return policy, tokenizer, {"policy": item}


def load_adapter(base, name: str, folder: Path, head: nn.Module | None = None) -> None:
    """A saved adapter (PEFT's layout) into adapter `name` of the base, in place: its config must be
    the run's (--lora_rank, --lora_alpha, --lora_targets); the value head too, if given."""
    folder = Path(folder)
    saved = lora.config_from_peft(read_json(folder / "adapter_config.json"),
                                  source=folder / "adapter_config.json")
    if saved != base.lora_config:  # resumed with other --lora_* flags than it was trained with
        raise common.BadFlag(f"{folder / 'adapter_config.json'}: saved with rank {saved.rank}, "
                             f"alpha {saved.alpha}, targets {','.join(saved.targets)}; this run "
                             f"has --lora_rank {base.lora_config.rank} --lora_alpha "
                             f"{base.lora_config.alpha} --lora_targets "
                             f"{','.join(base.lora_config.targets)}")
    tensors = load_file(folder / "adapter_model.safetensors")
    lora.load_peft_state_dict(base, name, tensors, source=folder / "adapter_model.safetensors")
    if head is not None:
        with torch.no_grad():
            head.weight.copy_(load_file(folder / VALUE_HEAD)["score.weight"])


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def load_merged(folder, dtype="float32", device="cpu"):
    """A saved policy adapter (PEFT's layout) applied to its base and merged: (a plain Hugging Face
    model, tokenizer), for evaluating a LoRA run."""
    folder = Path(folder)
    peft = read_json(folder / "adapter_config.json")
    config = lora.config_from_peft(peft, source=folder / "adapter_config.json")
    model, tokenizer = load_policy(peft["base_model_name_or_path"], dtype=dtype, device=device)
    lora.add_adapters(model, config, ("policy",))
    model.lora_config = config
    load_adapter(model, "policy", folder)
    return lora.merge_and_unload(model, "policy"), tokenizer


# --------------------------------------------------------------------------------------------------
# What the sampler reads
# --------------------------------------------------------------------------------------------------
def sampler_weights(models: Models):
    """Every parameter of the policy, whole, by its Hugging Face name: what the sampler copies into
    its own weights once a step. Lazy: a sampler that reads the policy itself takes none, and then
    nothing is gathered. Under FSDP2 every unit is gathered while it runs (a collective)."""
    if models.base is not None:
        with distributed.gathered(models.base):
            yield from lora.merged_parameters(models.base, "policy")
    else:
        with distributed.gathered(models.policy):
            yield from models.policy.named_parameters()


def sampler_owns_weights(cfg) -> bool:
    """Whether the sampler keeps weights of its own (bf16, shards, adapters to merge) rather than
    reading the policy's fp32 ones."""
    return distributed.is_distributed() or bool(cfg.lora_rank) or cfg.dtype != "float32"
