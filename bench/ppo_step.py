"""Child of bench.py: run train_ppo.py's own main() for a few steps in this process and report, per step,
the peak resident memory (VmHWM; on a GPU, the peak of torch.cuda.max_memory_allocated) and what that
memory must at least hold.

    python bench/ppo_step.py --preset demo --max_steps 1 --out_dir /tmp/bench_step     # train_ppo.py flags

Prints one line `BENCH_STEP {json}`: the metrics.jsonl lines, each step's peak memory ("peak"), and the bytes of
weights (policy + reference + critic), gradients and AdamW state (the trained models, fp32) and the KV cache
of one rollout.generate call. The peak of a step is measured from its start: the kernel's high-water mark
(and PyTorch's GPU peak) is reset when make_experience begins, and read when ppo_update returns (a step
whose update was skipped, e.g. GRPO with equal rewards, has no peak). Checkpoints are not written (the
benchmark does not need them; their time is not in the step's time_* fields either).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's flat modules

import torch  # noqa: E402

import data  # noqa: E402
import train_ppo  # noqa: E402


def vm_hwm() -> int:
    """Peak resident set size of this process since the last reset, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
        f.write("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int:
    """Peak memory since reset_hwm: on a GPU the bytes PyTorch allocated there (where the models live), else RSS."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else vm_hwm()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0


def main(argv):
    report = {"peak": {}, "budget": None}
    inner_make, inner_update = train_ppo.make_experience, train_ppo.ppo_update

    def make_experience(cfg, step, recs, texts, positions, policy, ref, critic, tok, device, timer):
        reset_hwm()
        if report["budget"] is None:
            trained = param_bytes(policy) + param_bytes(critic)  # fp32 master weights of what the optimizer updates
            ids = data.tokenize_prompts(tok, texts, None)[0]  # [b, P]
            c = policy.config
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            rows = min(len(texts) * cfg.n_samples_per_prompt, cfg.generate_batch_size)
            elem = next(policy.parameters()).element_size()
            # rollout.generate preallocates K and V of every layer: [rows, kv_heads, P + max_new_tokens, head_dim]
            kv = rows * (ids.shape[1] + cfg.max_new_tokens) * c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * elem
            report["budget"] = {"weights": trained + param_bytes(ref), "gradients": trained,
                                "adamw": 2 * trained, "kv_cache": kv}
        return inner_make(cfg, step, recs, texts, positions, policy, ref, critic, tok, device, timer)

    def ppo_update(cfg, step, *args, **kwargs):
        out = inner_update(cfg, step, *args, **kwargs)
        report["peak"][step] = peak_bytes()
        return out

    train_ppo.make_experience, train_ppo.ppo_update = make_experience, ppo_update
    train_ppo.C.save_training = lambda *a, **k: None  # no checkpoints: not part of what is measured
    cfg = train_ppo.parse_config(argv)
    train_ppo.main(argv)
    lines = Path(cfg.out_dir, "metrics.jsonl").read_text().splitlines()
    report["metrics"] = [json.loads(ln) for ln in lines]
    print("BENCH_STEP " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
