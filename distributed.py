"""Distributed plumbing shared by train_ppo.py and train_sft.py: torchrun, FSDP2, all-reduce.

One process (`python train_ppo.py`) runs with no process group and plain modules. Under `torchrun`
(any number of processes, one included) every model is sharded with PyTorch's own FSDP2:
`fully_shard` on each decoder layer, then on the whole model, so that each layer's parameters are
all-gathered just before its forward/backward and freed right after (ZeRO-3). Each rank keeps
1/N of the parameters, gradients and AdamW state.

Generation is the exception: decoding calls every layer once per new token, and all-gathering every
layer for every token would cost one full model's worth of communication per token. `gathered()`
unshards every FSDP unit once before the rollout and reshards after it, so the full weights live on
each rank for the length of the rollout phase (memory: one full copy of the weights in the compute
dtype per rank, on top of the 1/N shard).

Collectives get a timeout (`--collective_timeout_s`): a rank that dies leaves the others blocked in
a collective, and the timeout turns that hang into an error, so torchrun ends the whole job with a
non-zero exit code.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def setup(device: str = "auto", timeout_s: float = 600.0):
    """Start the process group if launched by torchrun. Returns (rank, world_size, device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:  # plain `python train_ppo.py`: a single process, no FSDP
        return 0, 1, torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        rank_device = torch.device("cuda", local_rank)
    else:
        rank_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if rank_device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), rank_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


def shard(model: torch.nn.Module, layers, mixed_precision: bool):
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, head).

    With `mixed_precision` (GPU, bf16), parameters are all-gathered and used in bf16 for compute,
    while the sharded master copy that the optimizer updates stays fp32 and gradients are reduced
    in fp32.
    """
    if not is_distributed():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if mixed_precision:
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp_policy = MixedPrecisionPolicy()
    # The mesh on the process group's device, said explicitly: fully_shard's default mesh is on the
    # machine's accelerator whenever it has one, so gloo ranks on a GPU machine would otherwise try
    # cuda:1 and up, GPUs that a one-GPU host does not have.
    mesh = init_device_mesh(comm_device().type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def autocast(dtype: str, device):
    """--dtype bfloat16 in one process: bf16 autocast over the fp32 weights (on a GPU, or a CPU:
    slow there, but the same numerics). Under FSDP2 the mixed-precision policy of `shard` casts
    instead, so autocast stays off."""
    on = dtype == "bfloat16" and not is_distributed()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=on)


def fsdp_units(model: torch.nn.Module):
    from torch.distributed.fsdp import FSDPModule
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Hold the full (unsharded) parameters for the whole block: used around generation."""
    units = fsdp_units(model) if is_distributed() else []
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def comm_device() -> torch.device:
    """Where tensors must be for collectives: the GPU under nccl, the CPU under gloo."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks (a new tensor, on t's device); identity on one process."""
    if not is_distributed():
        return t
    out = t.detach().to(comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_reduce_dict(sums: dict, op: str = "sum") -> dict:
    """Sum (or, op="max", the largest of) each float of a dict over all ranks, in one collective."""
    if not is_distributed() or not sums:
        return dict(sums)
    keys = sorted(sums)
    values = torch.tensor([float(sums[key]) for key in keys], dtype=torch.float64,
                          device=comm_device())
    dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return dict(zip(keys, values.tolist()))


def all_gather_objects(obj) -> list:
    """Every rank's object, in rank order (small Python objects: the rollout records)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier():
    if is_distributed():
        dist.barrier()


def grad_norm_and_clip(params: list, max_norm: float) -> float:
    """Global L2 norm of the gradients of `params` (over all shards), clipped to max_norm; returns
    the norm before clipping."""
    params = [param for param in params if param.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(full_tensor(norm))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (an all-gather: every rank calls it), else t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --- state dicts: full ones for Hugging Face folders, sharded ones for optimizer state ------------
def full_model_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's weights on CPU; under FSDP gathered onto rank 0 (other ranks get {})."""
    if not is_distributed():
        return {name: value.detach().cpu() for name, value in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state_dict(model, optimizer) -> dict:
    """Optimizer state keyed by parameter name; sharded (DTensors) under FSDP, so each rank holds
    1/N."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer)


def load_optimizer_state_dict(model, optimizer, state: dict):
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state)
