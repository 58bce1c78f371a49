"""Evaluate a model on medical multiple-choice sets, and compare runs side by side (the study's Figure 3).

    python eval.py --model smollm2-135m --data medqa_test mmlu_pro_health --prompt r1_chat --out runs/eval_base
    python eval.py --compare runs/eval_base runs/eval_ppo runs/eval_sft [--plot compare.png]

Decoding is greedy (temperature 0) through rollout.generate, batched, with prompts sorted by length so that
a batch wastes little padding (the output keeps the data set's order). Scoring depends on the prompt style:

- r1 styles (r1, r1_think, r1_chat, r1_chat_1shot): verifier.verify(PROMPT_PREFILL[style] + response, gold, options), the
  reward the policy was trained on; generation stops at "</answer>". Format rate = share with the
  <think>...</think><answer>...</answer> format intact.
- direct styles (direct, direct_chat; also what an SFT model is evaluated with): the letter is read from the
  plain answer (its first paragraph) with verifier.extract_letter. There is no format to keep, so
  "format rate" here means the share of responses in which a valid option letter was found.
- cot: the letter is read from the first line tail starting "answer is" that names one ("... The answer is
  C."); format rate as for direct.

Per data set: accuracy, format rate, share with no valid letter (for r1 styles format failures count here
too: their answer is not read), mean reward, the standard deviation of accuracy over
BOOTSTRAP_RESAMPLES seeded bootstrap resamples (the study's error bars), n; and accuracy by MedQA step and
by MMLU-Pro source subject (any record meta key in BREAKDOWN_KEYS). Writes OUT/results.json (config,
metrics, breakdowns) and OUT/predictions.jsonl (one line per question), and prints a markdown table.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import data
import model as model_lib
import rollout
import verifier

R1_STYLES = {s for s in data.PROMPT_STYLES if s.startswith("r1")}  # scored by verify(): the study's format
STOP_STRING = "</answer>"           # an r1 response is over once its answer is closed
BOOTSTRAP_RESAMPLES = 1000          # as in the study
MAX_NEW_TOKENS = 512                # r1 and cot responses: reasoning, then the answer
DIRECT_MAX_NEW_TOKENS = 32          # direct answers: a letter, perhaps with the option's text
BREAKDOWN_KEYS = ("step", "subject")  # record["meta"] keys to break accuracy down by, where present


# ---------------------------------------------------------------------------------------------------
# Scoring one response

def score(response: str, record: dict, style: str) -> dict:
    """The verify()-style dict for one response: reward, format_ok, pred, correct, and the r1 flags."""
    gold, options = record["answer"], record["options"]
    if style in R1_STYLES:
        return verifier.verify(data.PROMPT_PREFILL.get(style, "") + response, gold, options)
    if style.startswith("cot"):
        # The first "answer is ..." line that names a letter: a base model may go on to invent a next question.
        lower, pred, i = response.lower(), None, -1
        while pred is None and (i := lower.find("answer is", i + 1)) >= 0:
            pred = verifier.extract_letter(response[i:].split("\n")[0], options)
    else:
        # Direct: the answer is the first paragraph (" B", "B. Ketotifen eye drops"); whatever follows a
        # blank line (an explanation, an invented next question) is not read. A paragraph that lists the
        # options ("A. ...\nB. ...") names several letters, so no letter.
        pred = verifier.extract_letter(re.split(r"\n\s*\n", response.strip(), maxsplit=1)[0], options)
    correct = pred is not None and pred == gold
    # No format to keep: format_ok means "a valid letter was found" (see the module docstring).
    return {"reward": float(correct), "format_ok": pred is not None, "pred": pred, "correct": correct}


# ---------------------------------------------------------------------------------------------------
# Metrics

def bootstrap_std(correct, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """Std of accuracy over `n_resamples` resamples of the questions with replacement (seeded numpy).

    Resample b draws n indices uniformly (row b of `idx`); its accuracy is the mean of those. For large n
    this is close to the binomial sqrt(p (1 - p) / n)."""
    x = np.asarray(correct, dtype=np.float64)  # [n]
    if len(x) == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_resamples, len(x)))  # [R, n]
    return float(x[idx].mean(axis=1).std())


def metrics(preds: list[dict], seed: int = 0) -> dict:
    """accuracy, its bootstrap std, format rate, share with no valid letter, mean reward, n, length."""
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
        "chance": mean(1 / p["n_options"] for p in preds if p.get("n_options")),  # a uniform random guess
    }


def breakdowns(preds: list[dict], seed: int = 0) -> dict:
    """{"by_step": {"step1": metrics, ...}, "by_subject": {...}} for each BREAKDOWN_KEYS key some record has."""
    out = {}
    for key in BREAKDOWN_KEYS:
        groups: dict[str, list[dict]] = {}
        for p in preds:
            if p["meta"].get(key) is not None:
                groups.setdefault(str(p["meta"][key]), []).append(p)
        if groups:
            out[f"by_{key}"] = {g: metrics(groups[g], seed) for g in sorted(groups)}
    return out


# ---------------------------------------------------------------------------------------------------
# Generation

def resolve_model(name_or_path: str) -> str:
    """A training run folder (RUN, RUN/checkpoints or RUN/checkpoints/step_N) means its newest policy;
    anything else (a Hugging Face folder or name, smollm2-135m, tiny-qwen2) goes to model.load_policy as is."""
    path = Path(name_or_path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = checkpoint.list_checkpoints(path)
    if steps:
        path = steps[-1]
    return str(path / "policy") if (path / "policy").is_dir() else name_or_path


@torch.no_grad()
def predict(policy, tokenizer, records: list[dict], style: str, batch_size: int, max_new_tokens: int,
            device: str, desc: str = "") -> list[dict]:
    """Greedy responses to every record, scored; returned in the records' order."""
    prompts = [data.build_prompt(r, style, tokenizer) for r in records]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])  # similar lengths share a batch
    stop = [STOP_STRING] if style in R1_STYLES else None
    responses: list[str | None] = [None] * len(prompts)
    finish: list[str | None] = [None] * len(prompts)
    n_generated = [0] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="q", file=sys.stderr)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention_mask, _, _ = data.tokenize_prompts(tokenizer, [prompts[i] for i in batch], None)  # [B, P]
        out = rollout.generate(policy, input_ids.to(device), attention_mask.to(device), max_new_tokens,
                               temperature=0.0, eos_token_id=tokenizer.eos_token_id, stop_strings=stop,
                               tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        response_ids = out.sequences[:, input_ids.shape[1]:]  # [B, T]
        for row, i in enumerate(batch):
            n_generated[i] = int(out.response_mask[row].sum())
            # As train_ppo.py decodes for the verifier: EOS and padding dropped (left after </answer> they
            # would break the format); the tags are ordinary added tokens, so they stay.
            # The token that completed "</answer>" may carry more text ("></"): cut it, as train_ppo.py does.
            responses[i] = rollout.cut_after_stop(
                tokenizer.decode(response_ids[row, :n_generated[i]].tolist(), skip_special_tokens=True), stop)
            finish[i] = out.finish_reason[row]
        bar.update(len(batch))
    bar.close()
    preds = []
    for r, prompt, response, fin, n_tok in zip(records, prompts, responses, finish, n_generated):
        v = score(response, r, style)
        preds.append({"id": r["id"], "prompt": prompt, "response": response, "pred": v["pred"], "gold": r["answer"],
                      **v, "correct": bool(v["correct"]), "format_ok": bool(v["format_ok"]),
                      "finish_reason": fin, "response_tokens": n_tok, "n_options": len(r["options"]),
                      "meta": r.get("meta", {})})
    return preds


# ---------------------------------------------------------------------------------------------------
# Tables

def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_table(results: dict) -> str:
    """One run's markdown table: a row per data set."""
    head = "| data | n | accuracy % | ± std | format % | no letter % | mean reward | chars |"
    lines = [head, "| --- |" + " ---: |" * 7]
    for name, m in results["sets"].items():
        lines.append(f"| {name} | {m['n']} | {pct(m['accuracy'])} | {pct(m['accuracy_std'])} | "
                     f"{pct(m['format_rate'])} | {pct(m['no_letter_rate'])} | {m['mean_reward']:+.3f} | "
                     f"{m['mean_response_chars']:.0f} |")
        for key in BREAKDOWN_KEYS:
            for group, g in m.get(f"by_{key}", {}).items():
                lines.append(f"| &nbsp;&nbsp;{key} {group} | {g['n']} | {pct(g['accuracy'])} | "
                             f"{pct(g['accuracy_std'])} | {pct(g['format_rate'])} | {pct(g['no_letter_rate'])} | "
                             f"{g['mean_reward']:+.3f} | {g['mean_response_chars']:.0f} |")
    return "\n".join(lines) + "\n"


def load_results(run_dir: str) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        sys.exit(f"{path} not found: is {run_dir} an eval.py --out folder?")
    return json.loads(path.read_text())


def run_label(run_dir: str, results: dict) -> str:
    cfg = results.get("config", {})
    return f"{Path(run_dir).name} ({cfg.get('prompt', '?')})"


def load_runs(run_dirs: list[str]) -> tuple[list, list[str], dict]:
    """[(dir, results)], the data sets in first-seen order, and each set's chance accuracy (a uniform guess
    over its options, from the first run that has it)."""
    runs = [(d, load_results(d)) for d in run_dirs]
    sets = list(dict.fromkeys(name for _, r in runs for name in r["sets"]))
    chance = {s: next((r["sets"][s]["chance"] for _, r in runs if r["sets"].get(s, {}).get("chance")), None)
              for s in sets}
    return runs, sets, chance


def compare_table(run_dirs: list[str]) -> str:
    """Rows = runs (then a uniform random guess), columns = data sets, cells "acc ± std" in %."""
    runs, sets, chance = load_runs(run_dirs)
    lines = ["| run | " + " | ".join(sets) + " |", "| --- |" + " ---: |" * len(sets)]
    for d, r in runs:
        cells = [f"{pct(r['sets'][s]['accuracy'])} ± {pct(r['sets'][s]['accuracy_std'])}" if s in r["sets"] else "-"
                 for s in sets]
        lines.append(f"| {run_label(d, r)} | " + " | ".join(cells) + " |")
    if any(chance.values()):
        lines.append("| random guess | " + " | ".join(pct(chance[s]) if chance[s] else "-" for s in sets) + " |")
    return "\n".join(lines) + "\n"


def compare_plot(run_dirs: list[str], path: str) -> bool:
    """Grouped bar chart (groups = data sets, one bar per run, bootstrap std as error bars, a dashed line at
    chance); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs, sets, chance = load_runs(run_dirs)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sets) * max(1, len(runs) / 2)), 4))
    for k, (d, r) in enumerate(runs):
        acc = [100 * r["sets"][s]["accuracy"] if s in r["sets"] else 0 for s in sets]
        err = [100 * r["sets"][s]["accuracy_std"] if s in r["sets"] else 0 for s in sets]
        x = [i - 0.4 + width * (k + 0.5) for i in range(len(sets))]
        bars = ax.bar(x, acc, width, yerr=err, capsize=3, label=run_label(d, r))
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    for i, s in enumerate(sets):
        if chance[s]:
            ax.hlines(100 * chance[s], i - 0.45, i + 0.45, colors="gray", linestyles="dashed",
                      label="random guess" if i == 0 else None)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="HF folder or name, smollm2-135m, tiny-qwen2, or a train_ppo.py run / checkpoint folder")
    p.add_argument("--data", nargs="+", default=["medqa_test", "mmlu_pro_health"], help="data.load_dataset names or paths")
    p.add_argument("--prompt", default="r1_chat", choices=data.PROMPT_STYLES,
                   help="data.build_prompt style: r1 styles are scored by verify(), the others by their letter")
    p.add_argument("--out", help="output folder for results.json and predictions.jsonl")
    p.add_argument("--data_dir", default=None, help="benchmark folder (default: env MEDRLVR_DATA)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each set")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"default {MAX_NEW_TOKENS} ({DIRECT_MAX_NEW_TOKENS} for direct styles: the answer is a letter)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap (decoding is greedy)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="print the side-by-side table of these eval folders")
    p.add_argument("--plot", help="with --compare: also draw a bar chart to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    if not args.compare and not args.out:
        p.error("--out is required (or use --compare DIR ...)")
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
        args.max_new_tokens = DIRECT_MAX_NEW_TOKENS if args.prompt.startswith("direct") else MAX_NEW_TOKENS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    args.model_path = resolve_model(args.model)
    policy, tokenizer = model_lib.load_policy(args.model_path, dtype=args.dtype, device=args.device)
    policy.eval()
    results = {"config": {**{k: v for k, v in vars(args).items() if k not in ("compare", "plot")},
                          "bootstrap_resamples": BOOTSTRAP_RESAMPLES}, "sets": {}}
    with open(out / "predictions.jsonl", "w") as f:
        for name in args.data:
            try:
                records = data.load_dataset(name, args.data_dir)[:args.limit]
            except data.DataError as e:
                sys.exit(f"eval.py: {e}")
            t_set = time.time()
            preds = predict(policy, tokenizer, records, args.prompt, args.batch_size, args.max_new_tokens,
                            args.device, desc=name)
            for p in preds:
                f.write(json.dumps({"data": name, **p}) + "\n")
            results["sets"][name] = {**metrics(preds, args.seed), "seconds": round(time.time() - t_set, 1),
                                     **breakdowns(preds, args.seed)}
    results["config"]["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(results_table(results))
    print(f"wrote {out / 'results.json'} and {out / 'predictions.jsonl'} in {results['config']['seconds']} s")


if __name__ == "__main__":
    main()
