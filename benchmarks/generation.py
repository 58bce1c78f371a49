"""bench.py's generation rows: benchmarks/rollout_bench.py's generators on its workloads, each
generator's useful tokens/s against transformers' generate in the same run, its prefill, and its
decode ms/step against the memory-bandwidth bound. One part a workload; within it a generator that
fails gets its own "failed" row and the others stay."""
import torch

from benchmarks import machine, rollout_bench
from benchmarks.measure import Part, row


def decode_bound_ms(model, batch: int, mean_prompt: float, steps: float, bandwidth: float) -> float:
    """Least time of one decode step at full batch: every weight read once, plus each row's K and V
    cache (at its mean length over the decode, prompt + steps / 2), at the measured copy
    bandwidth."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * elem
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * elem
    kv = batch * (mean_prompt + steps / 2) * kv_per_token
    return 1000 * (weights + kv) / bandwidth


def parts(args, limits: dict, section="generation", workloads=None, generators=None) -> list:
    """One part a workload (args.workloads unless given), each running `generators` (default:
    rollout_bench.DEFAULT_GENERATORS) args.gen_repeats times, alternating."""
    generators = generators or rollout_bench.DEFAULT_GENERATORS
    return [Part(section, name, lambda name=name: workload_rows(args, limits, section, name,
                                                                generators))
            for name in workloads or args.workloads]


def workload_rows(args, limits: dict, section: str, name: str, generators) -> list[str]:
    w = rollout_bench.load(name, args.device, args.dtype)
    totals, failed = rollout_bench.compare(w, generators, args.max_new_tokens, 0,
                                           args.gen_repeats)
    baseline = totals.get("transformers")
    mean_prompt = float(w.mask.sum(1).float().mean())
    batch = len(w.ids)
    rows = []
    for impl, r in totals.items():
        label = f"{name} {rollout_bench.GENERATORS[impl]}"
        tok_s = r["useful"] / r["wall"]
        vs = f"{tok_s / (baseline['useful'] / baseline['wall']):.2f}x transformers" \
            if baseline else "transformers failed"
        rows.append(row(section, f"{label}: useful tokens/s (B={batch}, prompt {mean_prompt:.0f} "
                                 f"tokens, {args.max_new_tokens} new)", f"{tok_s:.1f}", vs))
        steps = r["steps"] / args.gen_repeats
        bound = decode_bound_ms(w.model, batch, mean_prompt, steps,
                                machine.limit(limits, "bandwidth"))
        rows.append(row(section, f"{label}: prefill s; decode ms/step vs bound (weights + KV "
                                 f"cache / bandwidth)",
                        f"{r['prefill'] / args.gen_repeats:.2f} s; {r['step_ms']:.1f} ms vs "
                        f"{bound:.2f} ms", f"{bound / r['step_ms']:.1%} of the bound"))
    for impl, why in failed.items():
        rows.append(row(section, f"{name} {rollout_bench.GENERATORS[impl]}: failed: {why}"))
    del w
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next workload's model gets this one's memory
    return rows
