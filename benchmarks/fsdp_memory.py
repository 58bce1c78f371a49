"""Child of bench.py, started by torchrun: bytes per rank of the parameters, gradients and AdamW
state of the actor and the critic, sharded with FSDP2 exactly as train_ppo.py shards them
(distributed.shard). From the repository root:

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m benchmarks.fsdp_memory \
        --model smollm2-135m

Each model takes one forward + backward on a few tokens and one AdamW step, so gradients and
optimizer state exist; then every rank counts the bytes of its LOCAL shard of each tensor
(DTensor.to_local()). Rank 0 prints one line `BENCH_FSDP {json}` with every rank's counts. On CPU
the process group is gloo, with --device cuda nccl.
"""
import argparse
import json

import torch

from distributed import all_gather_objects, cleanup, setup, shard
from model import critic_values, layer_modules, load_critic, load_policy, token_logprobs


def local_bytes(t) -> int:
    """Bytes this rank holds of a tensor: its shard for a DTensor, all of it otherwise."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def measure(model, forward) -> dict:
    """Bytes of parameters, gradients and AdamW state on this rank after one forward (`forward`
    of the model) + backward + AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    forward(model).sum().backward()
    opt.step()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": sum(local_bytes(p) for p in model.parameters()),
            "grads": sum(local_bytes(g) for g in grads),
            "adamw": sum(local_bytes(v) for v in states)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu", help="cpu (gloo) | cuda (nccl, one GPU per process)")
    args = p.parse_args()
    rank, world, device = setup(args.device)
    policy, tok = load_policy(args.model, device=device)
    critic = load_critic(args.model, device=device)
    for m in (policy, critic):
        shard(m, layer_modules(m), mixed_precision=False)
    seeded = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (2, 16), generator=seeded).to(device)  # [2, 16]
    attn = torch.ones_like(ids)  # [2, 16]

    def actor_forward(m):
        return token_logprobs(m, ids, attn, 8)  # [2, 8]

    def critic_forward(m):
        return critic_values(m, ids, attn)  # [2, 16]

    out = {"actor": measure(policy, actor_forward), "critic": measure(critic, critic_forward)}
    every = all_gather_objects(out)
    if rank == 0:
        print("BENCH_FSDP " + json.dumps({"world": world, "ranks": every}), flush=True)
    # every rank past the last collective before any tears the group down: gloo aborts a rank
    # whose peer left while it was still finishing one
    torch.distributed.barrier()
    cleanup()


if __name__ == "__main__":
    main()
