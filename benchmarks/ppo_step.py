"""Child of bench.py: run train_ppo.py's own main() for a few steps in this process and report, per
step, the peak resident memory (VmHWM; on a GPU, the peak of torch.cuda.max_memory_allocated) and
what that memory must at least hold. From the repository root (train_ppo.py's flags):

    python -m benchmarks.ppo_step --preset demo --max_steps 1 --out_dir /tmp/bench_step

Prints one line `BENCH_STEP {json}`: the metrics.jsonl lines, each step's peak memory ("peak"), and
the bytes of weights (policy + reference + critic), gradients and AdamW state (the trained models,
fp32) and the KV cache of one generate call. The peak of a step is measured from its start: the
kernel's high-water mark (and PyTorch's GPU peak) is reset when experience.sample_responses begins,
and read when train_ppo.ppo_step returns (a step whose update was skipped, e.g. GRPO with equal
rewards, has no peak). Checkpoints are not written (the benchmark does not need them; their time is
not in the step's time_* fields either).
"""
import json
import sys
from pathlib import Path

import torch

import checkpoint
import data
import experience
import train_ppo


def vm_hwm() -> int:
    """Peak resident set size of this process since the last reset, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm():
    # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int:
    """Peak memory since reset_hwm: on a GPU the bytes PyTorch allocated there (where the models
    live), else RSS."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else vm_hwm()


def param_bytes(model) -> int:
    if model is None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters())


def memory_budget(cfg, models, prompts) -> dict:
    """The bytes a step must at least hold: every model's weights, the trained models' gradients
    and AdamW state (two numbers a parameter), and the KV cache of one generate call."""
    trained = param_bytes(models.policy) + param_bytes(models.critic)  # fp32 master weights
    ids = data.tokenize_prompts(models.tokenizer, prompts.texts, None)[0]  # [b, P]
    c = models.policy.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rows = min(len(prompts.texts) * cfg.n_samples_per_prompt, cfg.generate_batch_size)
    elem = next(models.policy.parameters()).element_size()
    # both generators preallocate K and V of every layer: [rows, kv_heads, P + max_new_tokens,
    # head_dim]
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * elem
    kv = rows * (ids.shape[1] + cfg.max_new_tokens) * per_token
    return {"weights": trained + param_bytes(models.reference), "gradients": trained,
            "adamw": 2 * trained, "kv_cache": kv}


def no_checkpoint(*args, **kwargs):
    """Stands in for checkpoint.save_training: checkpoints are not part of what is measured."""


def main(argv):
    report = {"peak": {}, "budget": None}
    inner_sample, inner_step = experience.sample_responses, train_ppo.ppo_step

    def sample_responses(cfg, models, prompts, step):
        reset_hwm()
        if report["budget"] is None:
            report["budget"] = memory_budget(cfg, models, prompts)
        return inner_sample(cfg, models, prompts, step)

    def ppo_step(cfg, run, models, questions, step, kl_coef, timer):
        metrics, samples = inner_step(cfg, run, models, questions, step, kl_coef, timer)
        if "skipped" not in metrics:  # the peak of a step that ran its update
            report["peak"][step] = peak_bytes()
        return metrics, samples

    inner_save = checkpoint.save_training
    experience.sample_responses = sample_responses
    train_ppo.ppo_step = ppo_step
    checkpoint.save_training = no_checkpoint
    try:
        cfg = train_ppo.parse_config(argv)
        train_ppo.main(argv)
    finally:
        experience.sample_responses = inner_sample
        train_ppo.ppo_step = inner_step
        checkpoint.save_training = inner_save
    lines = Path(cfg.out_dir, "metrics.jsonl").read_text().splitlines()
    report["metrics"] = [json.loads(ln) for ln in lines]
    print("BENCH_STEP " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
