"""bench.py's paper section: the study's model size on one GPU, model_zoo's random-qwen2.5-3b
(Qwen2.5-3B's shape, random weights: speed and memory do not depend on the weights), in bf16:

  decode  batch 64 and 256, transformers' generate against --engine static (CUDA graphs), rows
          running to the length limit, against the HBM bound (the generation section's rows)
  update  the packed PPO update of 16 prompts x 4 samples, gradient checkpointing: actor alone,
          actor + critic, actor + critic with LoRA; MFU and peak memory (update_bench.paper_parts)
  step    one whole step, 16 prompts, of each PAPER_STEPS setting: by phase, and its peak memory
          against benchmarks/memory_plan.py's arithmetic

The study's own setting (--preset paper: GAE, so policy, critic and reference, fully trained in fp32
with AdamW) holds about 147 GB at its peak, AdamW's step: it does not fit one 80 GB GPU
(memory_plan's table, in BENCHMARKS.md). The steps measured are the two that do: full fine-tuning
without the critic and without the reference (--advantage reinforce_pp --kl_coef 0), and the study's
GAE with LoRA (--preset paper_lora). A setting the arithmetic puts above the GPU's memory is not
tried.

Without a GPU every row says "not measured: no GPU"; --quick runs them all at the shape scaled down
(random-qwen2.5-3b-mini) on any device, with small sizes: it checks the code a GPU runs.
"""
import argparse

import train_ppo
from benchmarks import generation, memory_plan, update_bench
from benchmarks.measure import GB, Part, device_memory, row
from benchmarks.steps import budget_text, held, peak_of, ppo_steps

PAPER_STEPS = {"full fine-tuning, critic-free, no KL": ["--preset", "paper", "--advantage",
                                                        "reinforce_pp", "--kl_coef", "0"],
               "LoRA, GAE with the critic": ["--preset", "paper_lora"]}
# A random model writes nothing the verifier accepts: every reward would be -1, and a critic-free
# step whose rewards are all equal skips its update (train_ppo.skip_reason). Forced text ending in
# answer C (--prefill) makes the reward +1 or 0 with the gold letter (-1 where a stray character
# follows): rewards that vary, as a real model's do (the first step's questions have C and other
# gold letters, from the data folder's MedQA dev as from the embedded subset).
VARIED_REWARDS = ["--prefill", "<think>random weights</think><answer>C</answer>"]
NO_GPU = ("decode, batch 64 and 256, transformers' generate and --engine static: tokens/s "
          "against the HBM bound (target >= 40% at 256)",
          "update, 16 prompts x 4 samples x 512 + up to 512 tokens, packed: actor alone, actor + "
          "critic, actor + critic with LoRA: MFU (target >= 35%), peak memory against memory_plan",
          "one step, 16 prompts, of --preset paper --advantage reinforce_pp --kl_coef 0 and of "
          "--preset paper_lora: phases (generation under half the step), peak GPU memory against "
          "memory_plan")


def parts(args, limits: dict) -> list[Part]:
    if args.device != "cuda" and not args.quick:
        return [Part("paper", what, lambda what=what: [
            row("paper", what, "not measured: no GPU",
                "python bench.py --only paper on a CUDA machine")]) for what in NO_GPU]
    model = "random-qwen2.5-3b-mini" if args.quick else "random-qwen2.5-3b"
    workloads = ["paper3b-mini-b8"] if args.quick else ["paper3b-b64", "paper3b-b256"]
    decode = argparse.Namespace(**{**vars(args), "gen_repeats": 1})
    sizes = dict(update_batch=64, micro_batch=16, update_group=4, prompt_len=512, response_len=512)
    if args.quick:
        sizes.update(update_batch=8, micro_batch=4, prompt_len=32, response_len=16)
    update = argparse.Namespace(**{**vars(args), **sizes, "repeats": 1})
    return [*generation.parts(decode, limits, "paper", workloads, ("transformers", "static")),
            *update_bench.paper_parts(update, limits, model),
            *[Part("paper", f"step, {label}", lambda label=label: step_rows(args, model, label))
              for label in PAPER_STEPS]]


def step_flags(args, model: str, label: str) -> list[str]:
    """PAPER_STEPS[label] for one step of 16 prompts (4 in --quick, 16 new tokens at most), the
    GPU's sampler, the embedded MedQA dev questions (prompts of the character tokenizer: one token
    a character, at most --max_prompt_tokens 1024)."""
    prompts = "4" if args.quick else "16"
    flags = [*PAPER_STEPS[label], *VARIED_REWARDS, "--model", model, "--train_data", "medqa_dev",
             "--rollout_batch_size", prompts, "--train_batch_size", prompts,
             "--generate_batch_size", prompts, "--engine", "static", "--max_steps", "1",
             "--eval_every", "0", *args.train_device]
    if args.quick:
        flags += ["--micro_batch_size", "2", "--max_new_tokens", "16"]
    return flags


def step_rows(args, model: str, label: str) -> list[str]:
    """One step: the whole, its phases, its peak memory against memory_plan's arithmetic; not run
    where the arithmetic says it does not fit the GPU."""
    flags = step_flags(args, model, label)
    cfg = train_ppo.parse_config(flags)
    need = memory_plan.plan(cfg, memory_plan.shape_of(memory_plan.config_for(model))).peak
    what = f"step, {label} ({' '.join(PAPER_STEPS[label])})"
    capacity = device_memory(args.device)
    if capacity is not None and need > capacity:
        return [row("paper", what, "not run", f"memory_plan: needs {need / GB:.1f} GB, the GPU "
                                              f"holds {capacity / GB:.1f} GB")]
    r = ppo_steps(flags, 1800)
    m = r["metrics"][0]
    if "skipped" in m:
        raise RuntimeError(f"the step skipped its update ({m['skipped']}): not a whole step")
    step = m["time_step"]
    phases = "; ".join(f"{phase} {m.get(f'time_{phase}', 0.0):.1f} s "
                       f"({m.get(f'time_{phase}', 0.0) / step:.0%})"
                       for phase in train_ppo.PHASES if phase != "eval")
    generate = m.get("time_generate", 0.0) / step
    peak = peak_of(r)
    return [row("paper", f"{what}, {cfg.rollout_batch_size} prompts x <= {cfg.max_new_tokens} "
                         f"new tokens ({m['response_tokens']:.0f} a sample): whole step",
                f"{step:.1f} s", f"generation {generate:.0%} of it (target < 50%)"),
            row("paper", f"{what}: phases", phases),
            row("paper", f"{what}: {held(args.device)} of the step",
                f"{peak / GB:.2f} GB", f"memory_plan {need / GB:.2f} GB (held by every step: "
                                       f"{budget_text(r['budget'])})")]
