"""Which sampler a run draws its responses from: the one table of --engine.

    plain    rollout.generate over the policy's own modules: the teaching core, as the reader
             meets it (under FSDP2 every unit gathered for the call; with LoRA the adapters
             applied token by token, in the run's autocast)
    dynamic  engine.Engine with the CPU's code paths (engine.DYNAMIC)
    static   engine.Engine with the GPU's code paths (engine.STATIC): static shapes, CUDA graphs
             on CUDA; on the CPU the same code runs eagerly
    auto     static on CUDA, dynamic elsewhere

Every sampler has `load_weights(named_tensors)`, called once a step before sampling (the engine
copies the training weights into its own; the plain sampler reads the policy itself and takes
nothing), and `generate(...)` with rollout.generate's arguments. All give the same samples in fp32
(tests/test_engine.py). The trainers, eval.py's held-out evaluation and bench.py build theirs here.
"""
import contextlib

import torch

import distributed
import engine
import rollout

ENGINES = ("auto", "plain", "dynamic", "static")


class Plain:
    """The teaching core as a run's sampler."""

    def __init__(self, policy, dtype: torch.dtype):
        self.policy, self.dtype = policy, dtype
        self.device = policy.get_input_embeddings().weight.device

    def load_weights(self, named_tensors) -> None:
        """Nothing to copy: rollout.generate reads the policy's own modules."""

    def generate(self, input_ids, attention_mask, max_new_tokens, **sampling) -> rollout.Rollout:
        # one process: bf16 autocast over the fp32 weights, as the training forwards run; under
        # FSDP2 the gathered parameters are already in the mixed-precision policy's dtype
        amp = self.dtype != torch.float32 and not distributed.is_distributed()
        with distributed.gathered(self.policy), contextlib.ExitStack() as stack:
            if amp:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
            return rollout.generate(self.policy, input_ids, attention_mask, max_new_tokens,
                                    **sampling)


def make_sampler(choice: str, policy, dtype: torch.dtype, own_weights: bool, max_rows: int,
                 max_len: int, compile_decode: bool = False):
    """The sampler --engine `choice` names, for `policy` computing in `dtype`. own_weights: the
    engine keeps a copy (bf16, FSDP2 shards, LoRA adapters to merge) instead of sharing the
    policy's fp32 weights. max_rows, max_len: the largest generate call of the run."""
    if choice == "plain":
        return Plain(policy, dtype)
    device = policy.get_input_embeddings().weight.device
    settings = engine.settings_for(choice, device, compile_decode)
    return engine.Engine(policy, settings, dtype=dtype, max_rows=max_rows, max_len=max_len,
                         share_weights=not own_weights)
