"""Child of bench.py: run train_ppo.py's own main() for a few steps in this process and report, per
step, the peak memory (on a GPU the peak of torch.cuda.max_memory_allocated, else the process's
peak resident set, VmHWM) and what that memory must at least hold. From the repository root
(train_ppo.py's flags):

    python -m benchmarks.ppo_step --preset demo --max_steps 1 --out_dir /tmp/bench_step

Prints one line `BENCH_STEP {json}`: the metrics.jsonl lines, each step's peak memory ("peak"), and
the bytes every step holds ("budget"): the roles' weights (each tensor once: LoRA's roles share a
base), the trained parameters' gradients and AdamW state, the sampler's own weights (where it keeps
a copy) and its KV cache. A step's peak is measured from its start (train_ppo.ppo_step's call,
generation included) to its return; a step whose update was skipped (e.g. GRPO with equal rewards)
has none. Checkpoints are not written (the benchmark does not need them; their time is not in the
step's time_* fields either).
"""
import json
import sys
from pathlib import Path

import checkpoint
import engine
import train_ppo
from benchmarks.measure import peak_bytes, reset_peak


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors, each counted once however often it is listed."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def memory_budget(cfg, models, longest_prompt: int) -> dict:
    """The bytes a step must at least hold (see the module docstring). longest_prompt: tokens of
    the run's longest prompt, which the sampler's cache is sized for."""
    roles = [m for m in (models.policy, models.reference, models.critic, models.base)
             if m is not None]
    trained = tensor_bytes(p for item in models.trained.values() for p in item.params)
    sampler = models.sampler
    owns = isinstance(sampler, engine.Engine) and not sampler.shares_weights
    c = models.policy.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    compute = 2 if cfg.dtype == "bfloat16" else 4
    rows = min(cfg.rollout_batch_size * cfg.n_samples_per_prompt, cfg.generate_batch_size)
    # K and V of every layer: [rows, kv_heads, longest prompt + max_new_tokens, head_dim]
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * compute
    return {"weights": tensor_bytes(p for m in roles for p in m.parameters()),
            "gradients": trained, "adamw": 2 * trained,
            "sampler_weights": tensor_bytes(sampler.model.parameters()) if owns else 0,
            "kv_cache": rows * (longest_prompt + cfg.max_new_tokens) * per_token}


def no_checkpoint(*args, **kwargs):
    """Stands in for checkpoint.save_training: checkpoints are not part of what is measured."""


def main(argv):
    report = {"peak": {}, "budget": None}
    inner_step = train_ppo.ppo_step

    def ppo_step(cfg, run, models, questions, step, kl_coef, timer):
        reset_peak(run.device)
        metrics, samples = inner_step(cfg, run, models, questions, step, kl_coef, timer)
        if "skipped" not in metrics:  # the peak of a step that ran its update
            report["peak"][step] = peak_bytes(run.device)
        if report["budget"] is None:
            report["budget"] = memory_budget(cfg, models, questions.longest)
        return metrics, samples

    inner_save = checkpoint.save_training
    train_ppo.ppo_step = ppo_step
    checkpoint.save_training = no_checkpoint
    try:
        cfg = train_ppo.parse_config(argv)
        train_ppo.main(argv)
    finally:
        train_ppo.ppo_step = inner_step
        checkpoint.save_training = inner_save
    lines = Path(cfg.out_dir, "metrics.jsonl").read_text().splitlines()
    report["metrics"] = [json.loads(ln) for ln in lines]
    print("BENCH_STEP " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
