"""Child of bench.py, started by torchrun: bytes per rank of the parameters, gradients and AdamW state of the
actor and the critic, sharded with FSDP2 exactly as train_ppo.py shards them (distributed.shard).

    torchrun --standalone --nproc_per_node 2 bench/fsdp_memory.py --model smollm2-135m

Each model takes one forward + backward on a few tokens and one AdamW step, so gradients and optimizer state
exist; then every rank counts the bytes of its LOCAL shard of each tensor (DTensor.to_local()). Rank 0
prints one line `BENCH_FSDP {json}` with every rank's counts. On CPU the process group is gloo, with
--device cuda nccl.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's flat modules

import torch  # noqa: E402

import distributed as D  # noqa: E402
import model as M  # noqa: E402


def local_bytes(t) -> int:
    """Bytes this rank holds of a tensor: its shard for a DTensor, all of it otherwise."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def measure(model, forward) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    forward(model).sum().backward()
    opt.step()
    return {"params": sum(local_bytes(p) for p in model.parameters()),
            "grads": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
            "adamw": sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu", help="cpu (gloo) | cuda (nccl, one GPU per process)")
    args = p.parse_args()
    rank, world, device = D.setup(args.device)
    policy, tok = M.load_policy(args.model, device=device)
    critic = M.load_critic(args.model, device=device)
    for m in (policy, critic):
        D.shard(m, M.layer_modules(m), mixed_precision=False)
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0)).to(device)  # [2, 16]
    attn = torch.ones_like(ids)  # [2, 16]
    out = {"actor": measure(policy, lambda m: M.token_logprobs(m, ids, attn, 8)),  # [2, 8]
           "critic": measure(critic, lambda m: M.critic_values(m, ids, attn))}  # [2, 16]
    every = D.all_gather_objects(out)
    if rank == 0:
        print("BENCH_FSDP " + json.dumps({"world": world, "ranks": every}), flush=True)
    D.cleanup()


if __name__ == "__main__":
    main()
