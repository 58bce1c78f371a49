"""--compile with gradient checkpointing (flex.compile_decoder_layers): the decoder layers' forward
and their recomputation in the backward are compiled, with no graph break, and give the eager
checkpointed run's log-probs and gradients; the compiled forward keeps no MLP activation for the
backward, as checkpointing promises; a new length compiles nothing new; eval() no-grad forwards
work too. Inductor compiles C++ with gcc on the CPU: tens of seconds, hence slow."""
import copy
import math

import pytest
import torch
import torch._dynamo
from test_model import PACK_PROMPTS, PACK_RESPONSES, sampled_batch
from torch._dynamo.utils import counters

import flex
import model_zoo
from model import pack, response_logprobs, set_gradient_checkpointing

INTERMEDIATE = 96  # the MLP width, unlike any other dimension of these batches


def packed_batch(tok, rows):
    seq, attn, mask = sampled_batch(tok, [PACK_PROMPTS[i] for i in rows],
                                    [PACK_RESPONSES[i] for i in rows])
    (packed,) = pack(seq, attn, mask)
    return packed


def training_step(model, batch):
    """The trainer's update forward and backward: log-probs [B, T], {name: grad}, and the shapes of
    the tensors autograd keeps for the backward."""
    model.zero_grad()
    kept = []

    def keep(tensor):
        kept.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logprobs = response_logprobs(model, batch, chunk_tokens=8)
    (logprobs * torch.linspace(-1, 1, logprobs.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logprobs.detach(), grads, kept


def keeps_mlp_activations(kept, batch) -> bool:
    """Whether a kept tensor is an MLP activation of the whole batch: [R, L, I], or [R * L, I]."""
    rows, length = batch.input_ids.shape
    return any(shape[-1:] == (INTERMEDIATE,) and math.prod(shape) == rows * length * INTERMEDIATE
               for shape in kept)


def assert_same_run(compiled, eager):
    """Log-probs and every parameter's gradient agree to float rounding (fp32)."""
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    assert compiled[1].keys() == eager[1].keys()
    for name, grad in compiled[1].items():
        torch.testing.assert_close(grad, eager[1][name], atol=1e-5, rtol=1e-5,
                                   msg=lambda text: f"{name}: {text}")


@pytest.mark.slow
def test_checkpointed_layers_compile_and_give_the_eager_run():
    policy, tok = model_zoo.load_tiny("llama", seed=0, intermediate=INTERMEDIATE)
    unchecked = copy.deepcopy(policy).train()
    set_gradient_checkpointing(policy, True)
    policy.train()
    eager = copy.deepcopy(policy)
    first, second = packed_batch(tok, range(6)), packed_batch(tok, [0, 1, 2, 4])
    assert first.input_ids.shape[1] != second.input_ids.shape[1]  # a new length
    # Without checkpointing the layers keep their MLP activations: what the check below looks for.
    assert keeps_mlp_activations(training_step(unchecked, first)[2], first)

    torch._dynamo.reset()
    counters.clear()
    flex.prepare_for_training(policy, "sdpa", True, "cpu")
    compiled_run = training_step(policy, first)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0 and not counters["graph_break"], dict(counters["graph_break"])
    assert not keeps_mlp_activations(compiled_run[2], first)  # they are recomputed instead
    assert_same_run(compiled_run, training_step(eager, first))

    assert_same_run(training_step(policy, second), training_step(eager, second))
    assert counters["stats"]["unique_graphs"] == graphs  # dynamic shapes: no recompile

    for model in (policy, eager):
        model.eval()
    with torch.no_grad():
        ours, reference = response_logprobs(policy, second), response_logprobs(eager, second)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] > graphs and not counters["graph_break"]
