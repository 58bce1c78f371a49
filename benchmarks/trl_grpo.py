"""TRL's GRPOTrainer on the same GRPO step as train_ppo.py's, for bench.py (run it with TRL's
interpreter, from the repository root).

TRL is never a dependency of this project: install it in a virtual environment of its own, e.g.
    python -m venv /work/trl-venv --system-site-packages
    /work/trl-venv/bin/pip install trl==1.16.0
    /work/trl-venv/bin/python -m benchmarks.trl_grpo --steps 3
or let bench.py run it: python bench.py --trl_python /work/trl-venv/bin/python

Same model (SmolLM2-135M-Instruct, fp32, from model_zoo.py's converted folder), same prompts
(train_ppo.py's demo preset: MedQA dev, r1_chat_1shot, options shuffled, the questions of its first
steps), same reward (verifier.verify with the template-copy penalty), 8 completions of at most 128
tokens per step, one prompt per step, beta 0.01 (a reference model, as ours), the demo preset's
learning rate (actor_lr), no gradient checkpointing, CPU (--device cuda: one GPU, bf16 mixed
precision).
Prints one line `BENCH_TRL {json}`: seconds of each step (generation, reward, reference and update
all happen inside TRL's step) and the mean completion length TRL logged.
"""
import argparse
import json
import os
import time

import torch
import trl
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import data
import model_zoo
import train_ppo
import verifier
from experience import load_questions, step_prompt_indices
from model import load_policy


class StepClock(TrainerCallback):
    def __init__(self):
        self.starts = []
        self.seconds = []
        self.logs = []

    def on_step_begin(self, args, state, control, **kw):
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's queued GPU work belongs to it
        self.seconds.append(time.perf_counter() - self.starts[-1])

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="/tmp/bench_trl")
    p.add_argument("--device", default="cpu",
                   help="cpu (fp32) | cuda (bf16 autocast over fp32 weights, as ours on a GPU)")
    args = p.parse_args()
    if args.device == "cuda":  # bench.py's --cudnn_attention: the SDPA kernels ours ran with
        cudnn = os.environ.get("MEDRLVR_CUDNN_ATTENTION", "false") == "true"
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    cfg = train_ppo.parse_config(["--preset", "demo", "--advantage", "grpo",
                                  "--rollout_batch_size", "1", "--n_samples_per_prompt", "8",
                                  "--max_new_tokens", "128", "--train_batch_size", "8"])
    _, tok = load_policy(cfg.model)
    questions = load_questions(cfg, tok, print)
    records, texts = questions.records, questions.texts
    # the one prompt of each of ours' first steps (rank 0 of 1)
    picked = [step_prompt_indices(train_ppo.batching(cfg), len(records), s, 0, 1)[0][1]
              for s in range(1, args.steps + 1)]
    ds = Dataset.from_list([{"prompt": texts[i], "answer": records[i]["answer"],
                             "options": json.dumps(records[i]["options"])} for i in picked])
    prefill = data.PROMPT_PREFILL.get(cfg.prompt_style, "")
    rules = train_ppo.scoring(cfg).rules  # the demo's: --penalize_template_copy among them

    def reward(prompts, completions, answer, options, **kw):
        return [verifier.verify(prefill + text, gold, json.loads(opts), rules)["reward"]
                for text, gold, opts in zip(completions, answer, options)]

    targs = GRPOConfig(output_dir=args.out, per_device_train_batch_size=8, num_generations=8,
                       max_completion_length=128, max_steps=args.steps,
                       learning_rate=cfg.actor_lr, beta=cfg.kl_coef, gradient_checkpointing=False,
                       use_cpu=args.device == "cpu", bf16=args.device == "cuda", logging_steps=1,
                       save_strategy="no", report_to="none", temperature=1.0, top_p=1.0, top_k=0,
                       seed=cfg.seed)
    clock = StepClock()
    trainer = GRPOTrainer(model=str(model_zoo.smollm2_folder()), reward_funcs=reward, args=targs,
                          train_dataset=ds, processing_class=tok, callbacks=[clock])
    trainer.train()
    key = "completions/mean_length"
    lengths = [lg[key] for lg in clock.logs if key in lg]
    result = {"trl": trl.__version__, "seconds": clock.seconds, "mean_length": lengths}
    print("BENCH_TRL " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
