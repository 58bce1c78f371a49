r"""Evaluate a model on medical multiple-choice sets, and compare runs side by side (the study's
Figure 3).

    python eval.py --model smollm2-135m --data medqa_test mmlu_pro_health --prompt r1_chat \
        --out runs/eval_base
    python eval.py --compare runs/eval_base runs/eval_ppo runs/eval_sft [--plot compare.png]
    python eval.py --model runs/ppo --data medqa_test --num_samples 8 --temperature 1 --out OUT

Decoding is greedy (temperature 0) by default, through the sampler --engine names (samplers.py:
the fast engine by default, --engine plain the teaching core rollout.generate: the same tokens),
batched, with prompts sorted by length so that a batch wastes little padding (the output keeps the
data set's order). Scoring depends on the prompt style:

- r1 styles (r1, r1_think, r1_chat, r1_chat_1shot): verifier.verify(PROMPT_PREFILL[style] +
  response, gold, options), the reward the policy was trained on; generation stops at "</answer>".
  Format rate = share with the <think>...</think><answer>...</answer> format intact.
- direct styles (direct, direct_chat; also what an SFT model is evaluated with): the letter is read
  from the plain answer (its first paragraph) with verifier.extract_letter. There is no format to
  keep, so "format rate" here means the share of responses in which a valid option letter was found.
- cot: the letter is read from the first line tail starting "answer is" that names one ("... The
  answer is C."); format rate as for direct.

Per data set: accuracy, format rate, share with no valid letter (for r1 styles format failures count
here too: their answer is not read), mean reward, the standard deviation of accuracy over
BOOTSTRAP_RESAMPLES seeded bootstrap resamples (the study's error bars), n; and accuracy by MedQA
step and by MMLU-Pro source subject (any record meta key in BREAKDOWN_KEYS). Writes OUT/results.json
(config, metrics, breakdowns) and OUT/predictions.jsonl (one line per question), and prints a
markdown table.

Sampled evaluation (--num_samples n > 1, --temperature t > 0): each question is answered n times.
Sample j of question i (its position in the set) draws its noise from its own generator, seeded by
(--seed, i, j), so what it samples does not depend on the batch it lands in (as the trainer's
experience.row_uniforms). predictions.jsonl holds every sample (its "sample" field: j), and each set
reports, besides the metrics above over every sample (with n = questions and "accuracy" = the mean
accuracy over samples):
- pass@k for k = 1, the powers of two up to n, and n: the chance that at least one of k samples
  drawn from the n is correct, by the unbiased estimator of Chen et al. 2021 ("Evaluating Large
  Language Models Trained on Code", eq. 1); pass@1 is the mean accuracy over samples.
- maj@n: the majority vote over the n predicted letters is correct. Samples with no valid letter do
  not vote, a question with no vote counts wrong, and a tie goes to the tied letter sampled first
  (the lowest sample index): deterministic, and no option letter is favoured.
Each with a bootstrap std over questions (resampling questions, the same BOOTSTRAP_RESAMPLES).
"""
import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import common
import data
import distributed
import roles
import rollout
import samplers
import sources
import verifier
from compare import compare_plot, compare_table, pct
from model import load_policy

# Scored by verify(): the study's <think>...</think><answer>...</answer> format.
R1_STYLES = {style for style in data.PROMPT_STYLES if style.startswith("r1")}
STOP_STRING = "</answer>"           # an r1 response is over once its answer is closed
BOOTSTRAP_RESAMPLES = 1000          # as in the study
MAX_NEW_TOKENS = 512                # r1 and cot responses: reasoning, then the answer
DIRECT_MAX_NEW_TOKENS = 32          # direct answers: a letter, perhaps with the option's text
BREAKDOWN_KEYS = ("step", "subject")  # record["meta"] keys to break accuracy down by, where present


# --------------------------------------------------------------------------------------------------
# Scoring one response

def score(response: str, record: dict, style: str) -> dict:
    """The verify()-style dict for one response: reward, format_ok, pred, correct, and the r1
    flags."""
    gold = record["answer"]
    options = record["options"]
    if style in R1_STYLES:
        return verifier.verify(data.PROMPT_PREFILL.get(style, "") + response, gold, options)
    if style.startswith("cot"):
        # The first "answer is ..." line that names a letter: a base model may go on to invent a
        # next question.
        response_lower = response.lower()
        pred = None
        position = -1
        while pred is None and (position := response_lower.find("answer is", position + 1)) >= 0:
            pred = verifier.extract_letter(response[position:].split("\n")[0], options)
    else:
        # Direct: the answer is the first paragraph (" B", "B. Ketotifen eye drops"); whatever
        # follows a blank line (an explanation, an invented next question) is not read. A paragraph
        # that lists the options ("A. ...\nB. ...") names several letters, so no letter.
        first_paragraph = re.split(r"\n\s*\n", response.strip(), maxsplit=1)[0]
        pred = verifier.extract_letter(first_paragraph, options)
    correct = pred is not None and pred == gold
    # No format to keep: format_ok means "a valid letter was found" (see the module docstring).
    return {"reward": float(correct), "format_ok": pred is not None, "pred": pred,
            "correct": correct}


# --------------------------------------------------------------------------------------------------
# Metrics

def bootstrap_std(correct, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """Std of accuracy over `n_resamples` resamples of the questions with replacement (seeded
    numpy).

    Resample b draws n indices uniformly (row b of `indices`); its accuracy is the mean of those.
    For large n this is close to the binomial sqrt(p (1 - p) / n)."""
    outcomes = np.asarray(correct, dtype=np.float64)  # [n]
    if len(outcomes) == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(outcomes), size=(n_resamples, len(outcomes)))  # [R, n]
    return float(outcomes[indices].mean(axis=1).std())


def metrics(preds: list[dict], seed: int = 0) -> dict:
    """accuracy, its bootstrap std, format rate, share with no valid letter, mean reward, n,
    length."""
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else 0.0

    correct = [bool(p["correct"]) for p in preds]
    return {
        "n": len(preds),
        "accuracy": mean(correct),
        "accuracy_std": bootstrap_std(correct, seed=seed),
        "format_rate": mean(bool(p["format_ok"]) for p in preds),
        "no_letter_rate": mean(p["pred"] is None for p in preds),
        "mean_reward": mean(p["reward"] for p in preds),
        "mean_response_chars": mean(len(p["response"]) for p in preds),
        "mean_response_tokens": mean(p["response_tokens"] for p in preds),
        # A uniform random guess over each question's options.
        "chance": mean(1 / p["n_options"] for p in preds if p.get("n_options")),
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n, c of them
    correct, is correct: 1 - C(n-c, k) / C(n, k), the unbiased pass@k estimator of Chen et al. 2021
    ("Evaluating Large Language Models Trained on Code", eq. 1). Computed as their numerically
    stable product, 1 - prod_{i=n-c+1..n} (1 - k / i), which never forms the large binomials."""
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, the powers of two up to n, and n."""
    powers_of_two = {2 ** power for power in range(n.bit_length()) if 2 ** power <= n}
    return sorted({1, n} | powers_of_two)


def majority_vote(letters: list[str | None]) -> str | None:
    """The letter most samples predicted; None (no vote) where none predicted a letter. A tie goes
    to the tied letter that comes first in `letters` (sample order): deterministic, and it favours
    no option letter."""
    votes: dict[str, int] = {}  # insertion order = the order letters were first predicted
    for letter in letters:
        if letter is not None:
            votes[letter] = votes.get(letter, 0) + 1
    if not votes:
        return None
    return max(votes, key=votes.get)  # max keeps the first of equal counts


def sampled_metrics(preds: list[dict], num_samples: int, seed: int = 0) -> dict:
    """metrics() over every sample, with n = the number of questions, "accuracy" = the mean accuracy
    over samples and its bootstrap std over questions; plus pass@k and maj@n (num_samples = n),
    each with its bootstrap std over questions ("pass@k_std", "maj@n_std"). `preds`: predict()'s,
    the num_samples samples of each question consecutive."""
    if num_samples < 1 or len(preds) % num_samples:
        raise ValueError(f"{len(preds)} predictions are not {num_samples} samples per question")
    questions = [preds[start:start + num_samples] for start in range(0, len(preds), num_samples)]
    for samples in questions:
        if len({pred["id"] for pred in samples}) != 1:
            raise ValueError(f"the samples of question {samples[0]['id']} are not consecutive")
    n_correct = [sum(bool(pred["correct"]) for pred in samples) for samples in questions]
    per_question_accuracy = [c / num_samples for c in n_correct]
    out = {**metrics(preds, seed), "n": len(questions), "samples": len(preds),
           "num_samples": num_samples,
           "accuracy": float(np.mean(per_question_accuracy)) if questions else 0.0,
           "accuracy_std": bootstrap_std(per_question_accuracy, seed=seed)}
    # The same seed for every figure: each resample holds the same questions for all of them.
    for k in pass_at_ks(num_samples):
        estimates = [pass_at_k(num_samples, c, k) for c in n_correct]
        out[f"pass@{k}"] = float(np.mean(estimates)) if questions else 0.0
        out[f"pass@{k}_std"] = bootstrap_std(estimates, seed=seed)
    majority_correct = [majority_vote([pred["pred"] for pred in samples]) == samples[0]["gold"]
                        for samples in questions]
    out[f"maj@{num_samples}"] = float(np.mean(majority_correct)) if questions else 0.0
    out[f"maj@{num_samples}_std"] = bootstrap_std(majority_correct, seed=seed)
    return out


def summarize(preds: list[dict], seed: int = 0, num_samples: int = 1) -> dict:
    """A set's (or group's) figures: metrics() for one answer a question, sampled_metrics() for
    several."""
    return metrics(preds, seed) if num_samples == 1 else sampled_metrics(preds, num_samples, seed)


def breakdowns(preds: list[dict], seed: int = 0, num_samples: int = 1) -> dict:
    """{"by_step": {"step1": metrics, ...}, "by_subject": {...}} for each BREAKDOWN_KEYS key that
    some record has (the samples of a question share its meta, so they stay together)."""
    out = {}
    for key in BREAKDOWN_KEYS:
        groups: dict[str, list[dict]] = {}
        for pred in preds:
            if pred["meta"].get(key) is not None:
                groups.setdefault(str(pred["meta"][key]), []).append(pred)
        if groups:
            out[f"by_{key}"] = {group: summarize(groups[group], seed, num_samples)
                                for group in sorted(groups)}
    return out


# --------------------------------------------------------------------------------------------------
# Generation

def default_max_new_tokens(style: str) -> int:
    """A direct answer is a letter; r1 and cot responses reason first."""
    return DIRECT_MAX_NEW_TOKENS if style.startswith("direct") else MAX_NEW_TOKENS


def resolve_model(name_or_path: str) -> str:
    """A training run folder (RUN, RUN/checkpoints or RUN/checkpoints/step_N) means its newest
    policy (a Hugging Face folder, or with LoRA an adapter folder: load_model merges it into its
    base); anything else (a Hugging Face folder or name, smollm2-135m, tiny-qwen2) goes to
    model.load_policy as is."""
    path = Path(name_or_path)
    checkpoints_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = checkpoint.list_checkpoints(checkpoints_dir)
    step_dir = steps[-1] if steps else checkpoints_dir
    policy_dir = step_dir / "policy"
    return str(policy_dir) if policy_dir.is_dir() else name_or_path


def load_model(path: str, dtype: str, device: str):
    """(model, tokenizer) of resolve_model's answer: a LoRA adapter folder (adapter_config.json) is
    applied to its base and merged (roles.load_merged); anything else is model.load_policy's."""
    if (Path(path) / "adapter_config.json").is_file():
        return roles.load_merged(path, dtype, device)
    return load_policy(path, dtype=dtype, device=device)


def sampling_noise(seed: int, rows: list[tuple[int, int]], max_new_tokens: int) -> torch.Tensor:
    """The uniforms [len(rows), max_new_tokens] of generate's `uniforms` argument: row (question i,
    sample j) draws from its own generator seeded by (seed, i, j), so what it samples does not
    depend on the batch it lands in (experience.row_uniforms does the same for training)."""
    noise = torch.empty(len(rows), max_new_tokens)
    for row, (question, sample) in enumerate(rows):
        # A tuple of ints hashes the same in every process (only str hashing is randomised).
        generator = torch.Generator().manual_seed(hash((seed, question, sample)) % (2 ** 63))
        noise[row] = torch.rand(max_new_tokens, generator=generator)
    return noise


@dataclass(frozen=True)
class Decoding:
    """How predict decodes."""
    batch_size: int  # rows per generate call
    max_new_tokens: int
    num_samples: int = 1  # answers per question
    temperature: float = 0.0  # 0: greedy
    seed: int = 0  # with temperature > 0: sampling_noise's seed


@torch.no_grad()
def predict(sampler, tokenizer, records: list[dict], style: str, decoding: Decoding,
            desc: str = "") -> list[dict]:
    """Responses to every record, scored; returned in the records' order. `sampler`: samplers.py's
    (the fast engine or the teaching core: the same tokens). Greedy by default; with temperature >
    0 each record is answered num_samples times, from sampling_noise(seed, ...), its samples
    consecutive and numbered by a "sample" field when there are several."""
    batch_size, max_new_tokens = decoding.batch_size, decoding.max_new_tokens
    num_samples, temperature, device = decoding.num_samples, decoding.temperature, sampler.device
    prompts = [data.build_prompt(record, style, tokenizer) for record in records]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    # One row a response, (question index, sample index), question by question.
    rows = [(question, sample) for question in range(len(prompts)) for sample in range(num_samples)]
    # Similar lengths share a batch (the sort is stable: a question's samples stay together).
    order = sorted(range(len(rows)), key=lambda row: lengths[rows[row][0]])
    stop = [STOP_STRING] if style in R1_STYLES else None
    responses: list[str | None] = [None] * len(rows)
    finish_reasons: list[str | None] = [None] * len(rows)
    n_generated = [0] * len(rows)
    bar = tqdm(total=len(rows), desc=desc, unit="q" if num_samples == 1 else "sample",
               file=sys.stderr)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        batch_prompts = [prompts[rows[i][0]] for i in batch]
        # [B, P], left padded
        input_ids, attention_mask, _, _ = data.tokenize_prompts(tokenizer, batch_prompts, None)
        uniforms = None  # greedy
        if temperature > 0:
            uniforms = sampling_noise(decoding.seed, [rows[i] for i in batch], max_new_tokens)
            uniforms = uniforms.to(device)
        out = sampler.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens,
                               temperature=temperature, eos_token_id=tokenizer.eos_token_id,
                               stop_strings=stop, tokenizer=tokenizer,
                               pad_token_id=tokenizer.pad_token_id, uniforms=uniforms)
        response_ids = out.sequences[:, input_ids.shape[1]:]  # [B, T]
        for row, i in enumerate(batch):
            n_generated[i] = int(out.response_mask[row].sum())
            # As train_ppo.py decodes for the verifier: EOS and padding dropped (left after
            # </answer> they would break the format); the tags are ordinary added tokens, so they
            # stay. The token that completed "</answer>" may carry more text ("></"): cut it, as
            # train_ppo.py does.
            text = tokenizer.decode(response_ids[row, :n_generated[i]].tolist(),
                                    skip_special_tokens=True)
            responses[i] = rollout.cut_after_stop(text, stop)
            finish_reasons[i] = out.finish_reason[row]
        bar.update(len(batch))
    bar.close()
    preds = []
    for i, (question, sample) in enumerate(rows):
        record = records[question]
        scored = score(responses[i], record, style)
        pred = {"id": record["id"], "prompt": prompts[question], "response": responses[i],
                "pred": scored["pred"], "gold": record["answer"], **scored,
                "correct": bool(scored["correct"]), "format_ok": bool(scored["format_ok"]),
                "finish_reason": finish_reasons[i], "response_tokens": n_generated[i],
                "n_options": len(record["options"]), "meta": record.get("meta", {})}
        if num_samples > 1:
            pred["sample"] = sample
        preds.append(pred)
    return preds


def longest_prompt(tokenizer, sets: dict, style: str) -> int:
    """Tokens of the longest prompt of every set ({name: records}): what a sampler is sized for."""
    prompts = [data.build_prompt(r, style, tokenizer) for records in sets.values() for r in records]
    return data.tokenize_prompts(tokenizer, prompts, None)[0].shape[1]  # as predict tokenizes


# --------------------------------------------------------------------------------------------------
# During training

class HeldOutEval:
    """Evaluation during training, as the study did (MedQA test accuracy every 4 steps, its
    Figure 2): at step 0 and every cfg.eval_every steps, greedy responses to each set of
    cfg.eval_data, decoded and scored as this file does (predict and metrics), by the run's own
    sampler; each rank answers its share of the questions and rank 0 writes one line a set to
    eval.jsonl. `longest`: the tokens of the longest prompt plus the response limit, which the
    run's sampler is sized for."""

    def __init__(self, run, cfg, tokenizer):
        self.run, self.cfg, self.tokenizer = run, cfg, tokenizer
        names = [name.strip() for name in cfg.eval_data.split(",") if name.strip()]
        self.sets = {}
        if cfg.eval_every:
            for name in names:
                records = sources.load_dataset(name, cfg.data_dir or None)
                self.sets[name] = records[:cfg.eval_limit] if cfg.eval_limit else records
        self.max_new_tokens = cfg.eval_max_new_tokens or default_max_new_tokens(cfg.prompt_style)
        self.longest = longest_prompt(tokenizer, self.sets, cfg.prompt_style) + self.max_new_tokens

    def due(self, step: int) -> bool:
        return bool(self.sets) and step % self.cfg.eval_every == 0

    def __call__(self, step: int, sampler) -> dict:
        """Evaluate; returns {set name: accuracy} for the progress bar."""
        run, cfg = self.run, self.cfg
        decoding = Decoding(cfg.generate_batch_size, self.max_new_tokens)
        accuracy = {}
        for name, records in self.sets.items():
            started = time.perf_counter()
            mine = list(range(run.rank, len(records), run.world))  # this rank's share
            preds = predict(sampler, self.tokenizer, [records[i] for i in mine], cfg.prompt_style,
                            decoding, desc=f"eval {name}")
            shares = distributed.all_gather_objects(list(zip(mine, preds)))
            every = [pred for _, pred in sorted(p for share in shares for p in share)]
            result = metrics(every, cfg.seed)
            accuracy[name] = result["accuracy"]
            if run.rank == 0:
                line = {"step": step, "data": name, **result,
                        "seconds": round(time.perf_counter() - started, 1)}
                with open(run.out / "eval.jsonl", "a") as f:
                    f.write(common.json_line(line))
                run.tracker.log(line, step, prefix=f"eval/{name}/")
        return accuracy


# --------------------------------------------------------------------------------------------------
# Tables

def metrics_row(label: str, set_metrics: dict) -> str:
    """One markdown row of results_table: a data set, or one group of its breakdown."""
    return (f"| {label} | {set_metrics['n']} | {pct(set_metrics['accuracy'])} | "
            f"{pct(set_metrics['accuracy_std'])} | {pct(set_metrics['format_rate'])} | "
            f"{pct(set_metrics['no_letter_rate'])} | {set_metrics['mean_reward']:+.3f} | "
            f"{set_metrics['mean_response_chars']:.0f} |")


def results_table(results: dict) -> str:
    """One run's markdown table: a row per data set."""
    head = "| data | n | accuracy % | ± std | format % | no letter % | mean reward | chars |"
    lines = [head, "| --- |" + " ---: |" * 7]
    for name, set_metrics in results["sets"].items():
        lines.append(metrics_row(name, set_metrics))
        for key in BREAKDOWN_KEYS:
            for group, group_metrics in set_metrics.get(f"by_{key}", {}).items():
                lines.append(metrics_row(f"&nbsp;&nbsp;{key} {group}", group_metrics))
    sampled = {name: set_metrics for name, set_metrics in results["sets"].items()
               if set_metrics.get("num_samples", 1) > 1}
    if sampled:
        lines.append("")
        lines.append(sampled_table(sampled))
    return "\n".join(lines) + "\n"


def sampled_table(sets: dict) -> str:
    """The sampled figures of a --num_samples run: a row per data set, cells "% ± std"."""
    num_samples = next(iter(sets.values()))["num_samples"]
    figures = ["accuracy", *[f"pass@{k}" for k in pass_at_ks(num_samples)], f"maj@{num_samples}"]
    head = ["data", "questions", "samples each", "mean accuracy %",
            *[f"{figure} %" for figure in figures[1:]]]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, set_metrics in sets.items():
        cells = [name, str(set_metrics["n"]), str(set_metrics["num_samples"])]
        cells += [f"{pct(set_metrics[figure])} ± {pct(set_metrics[figure + '_std'])}"
                  for figure in figures]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    # The first paragraph of the docstring; argparse reflows it onto one line, as it was written.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help="HF folder or name, smollm2-135m, tiny-qwen2, "
                             "or a train_ppo.py run / checkpoint folder")
    parser.add_argument("--data", nargs="+", default=["medqa_test", "mmlu_pro_health"],
                        help="sources.load_dataset names or paths")
    parser.add_argument("--prompt", default="r1_chat", choices=data.PROMPT_STYLES,
                        help="data.build_prompt style: r1 styles are scored by verify(), "
                             "the others by their letter")
    parser.add_argument("--out", help="output folder for results.json and predictions.jsonl")
    parser.add_argument("--data_dir", default=None,
                        help="benchmark folder (default: env MEDRLVR_DATA)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N questions of each set")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help=f"default {MAX_NEW_TOKENS} ({DIRECT_MAX_NEW_TOKENS} for direct "
                             "styles: the answer is a letter)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the bootstrap and, with --temperature > 0, the sampling noise")
    parser.add_argument("--num_samples", type=int, default=1,
                        help="answers per question; above 1 (needs --temperature > 0) adds "
                             "pass@k and maj@n")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy decoding (the default); > 0: sampling at this temperature")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--engine", default="auto", choices=samplers.ENGINES,
                        help="samplers.py: plain (rollout.generate, the teaching core) | dynamic "
                             "| static (engine.Engine: the CPU's / the GPU's paths) | auto: "
                             "static on CUDA, dynamic elsewhere (the same tokens)")
    parser.add_argument("--compare", nargs="+", metavar="DIR",
                        help="print the side-by-side table of these eval folders")
    parser.add_argument("--plot",
                        help="with --compare: also draw a bar chart to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    if not args.compare and not args.out:
        parser.error("--out is required (or use --compare DIR ...)")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}")
    if not args.temperature >= 0:  # also NaN
        parser.error(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.num_samples > 1 and args.temperature == 0:
        parser.error(f"--num_samples {args.num_samples} needs --temperature > 0: greedy decoding "
                     "(--temperature 0, the default) gives the same answer every time")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare:
        print(compare_table(args.compare))
        if args.plot:
            print(f"wrote {args.plot}" if compare_plot(args.compare, args.plot)
                  else "matplotlib is not installed: no plot (pip install matplotlib)")
        return
    torch.manual_seed(args.seed)
    if args.max_new_tokens is None:
        args.max_new_tokens = default_max_new_tokens(args.prompt)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_start = time.perf_counter()
    args.model_path = resolve_model(args.model)
    try:
        policy, tokenizer = load_model(args.model_path, args.dtype, args.device)
    except ValueError as error:  # e.g. a folder whose weights are a pickle: one line, not a trace
        raise SystemExit(f"error: {error}") from None
    policy.eval()
    sets = {}
    for name in args.data:
        try:
            sets[name] = sources.load_dataset(name, args.data_dir)[:args.limit]
        except data.DataError as error:
            sys.exit(f"eval.py: {error}")
    # the weights as loaded, in their own dtype: the engine reads them, no copy; its cache and
    # static step sized once for the longest prompt of every set
    longest = longest_prompt(tokenizer, sets, args.prompt) + args.max_new_tokens
    sampler = samplers.make_sampler(args.engine, policy, policy.dtype, False,
                                    args.batch_size, longest)
    config = {key: value for key, value in vars(args).items() if key not in ("compare", "plot")}
    results = {"config": {**config, "bootstrap_resamples": BOOTSTRAP_RESAMPLES}, "sets": {}}
    with open(out_dir / "predictions.jsonl", "w") as predictions_file:
        for name, records in sets.items():
            set_start = time.perf_counter()
            decoding = Decoding(args.batch_size, args.max_new_tokens, args.num_samples,
                                args.temperature, args.seed)
            preds = predict(sampler, tokenizer, records, args.prompt, decoding, desc=name)
            for pred in preds:
                predictions_file.write(json.dumps({"data": name, **pred}) + "\n")
            results["sets"][name] = {**summarize(preds, args.seed, args.num_samples),
                                     "seconds": round(time.perf_counter() - set_start, 1),
                                     **breakdowns(preds, args.seed, args.num_samples)}
    results["config"]["seconds"] = round(time.perf_counter() - run_start, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(results_table(results))
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'predictions.jsonl'} "
          f"in {results['config']['seconds']} s")


if __name__ == "__main__":
    main()
