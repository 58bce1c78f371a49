"""The study's SFT baseline: teach the base model to answer a MedQA question with its option letter.

    python train_sft.py                                     # the CPU demo (SmolLM2-135M, MedQA dev)
    python train_sft.py --preset paper --out_dir runs/sft   # the study's setting (Qwen2.5-3B, MedQA train)
    torchrun --nproc_per_node=8 train_sft.py --preset paper # the same, FSDP2 over 8 GPUs
    python eval.py --model runs/sft/checkpoints/step_000795/policy --prompt direct --data medqa_test

One training example is the direct prompt (data.build_prompt(record, "direct"): the question, the instruction,
the lettered options, "Answer:") followed by the target " " + letter + EOS. The loss is the cross-entropy of the
target tokens only, averaged over every target token of the global batch; the EOS is part of the target so that
the model stops after the letter, as eval.py's greedy decoding expects. The study: "SFT (answers directly; lr
searched over 1e-5, 5e-6, 1e-6; 10 epochs)": 50.0 on MedQA, 31.7 on MMLU-Pro health.

The plumbing is the trainers' shared modules, imported, not copied: model.load_policy, FSDP2 via
distributed.shard, checkpoint.save_training / load_training / find_resumable, ppo.lr_schedule, and common.py's
flags and run setup. The batches are a function of (seed, step) only, so a resumed run, or one on another number
of processes, trains on exactly the batches an uninterrupted single-process run would have.
"""
import json
import math
import signal
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import checkpoint as C
import data
import distributed as D
import model as M
from ppo import lr_schedule
from common import arg, autocast, fault, parse_flags, start_run  # flags, run setup, bf16 autocast, test hook

# What follows the prompt before the letter: "Answer:" wants a space; a chat template's assistant turn does not.
TARGET_PREFIX = {"direct": " ", "direct_chat": ""}


@dataclass
class Config:
    """Every field is a command-line flag. Defaults are the study's setting; `--preset` overlays a named set.
    The study gives only the learning rates it searched and the 10 epochs; the rest (batch, warm-up, schedule,
    clipping, AdamW betas) are the defaults of OpenRLHF's train_sft.py of early 2025, an assumption: the study
    ran PPO on OpenRLHF and does not say what ran its SFT."""
    preset: str = arg("demo", "named overlay of these defaults: paper | demo | smoke (see PRESETS)")
    # --- model and data
    model: str = arg("Qwen/Qwen2.5-3B", "model to fine-tune: HF name or folder, smollm2-135m, tiny-qwen2 (study: Qwen2.5-3B base)")
    train_data: str = arg("medqa_train", "dataset name or file (study: MedQA-USMLE train, 10,178 questions)")
    data_dir: str = arg("", "folder of the data files (default: $MEDRLVR_DATA)")
    prompt_style: str = arg("direct", "direct (the study's baseline: '... Answer:' then ' B') | direct_chat (chat template, then 'B')")
    shuffle_options: bool = arg(False, "shuffle the options of every question, seeded (the study did not)")
    max_prompt_tokens: int = arg(2048, "longer prompts are left out and counted (OpenRLHF SFT max_len 2048)")
    num_epochs: int = arg(10, "passes over the training questions (study: 10 epochs)")
    # --- optimisation
    train_batch_size: int = arg(128, "examples per optimizer step, over all ranks (OpenRLHF SFT 128; study silent)")
    micro_batch_size: int = arg(8, "examples per forward/backward on each rank (OpenRLHF micro_train_batch_size 8)")
    lr: float = arg(1e-5, "peak learning rate (study searched 1e-5, 5e-6, 1e-6 and does not say which won)")
    warmup_ratio: float = arg(0.03, "linear warm-up share of the steps (OpenRLHF 0.03), then cosine to min_lr_ratio")
    min_lr_ratio: float = arg(0.1, "final learning rate as a share of the peak (OpenRLHF cosine_with_min_lr 0.1)")
    weight_decay: float = arg(0.0, "AdamW weight decay (OpenRLHF l2 0)")
    max_grad_norm: float = arg(1.0, "gradient clipping (OpenRLHF max_norm 1.0)")
    # --- system
    out_dir: str = arg("runs/sft", "metrics.jsonl, config.json and checkpoints/ go here")
    max_steps: int = arg(0, "stop after this many steps (0: num_epochs over the data)")
    save_every: int = arg(100, "checkpoint every N steps (and at the end)")
    keep_last: int = arg(3, "checkpoints kept (0: all)")
    resume: bool = arg(False, "continue from the newest sound checkpoint in out_dir")
    resume_fallback: bool = arg(False, "if the newest checkpoint fails its manifest check, use the one before")
    seed: int = arg(42, "seeds the data order and option shuffling")
    device: str = arg("auto", "auto | cpu | cuda")
    dtype: str = arg("bfloat16", "compute dtype: bfloat16 (GPU) | float32; master weights and optimizer are fp32")
    cudnn_attention: bool = arg(False, "on a GPU, let the training forwards use cuDNN's SDPA kernel (it builds a graph per new shape: 62% of an H200 decode step, BENCHMARKS.md); off: flash / memory-efficient / math. Generation never uses it")
    gradient_checkpointing: bool = arg(True, "recompute activations in backward (less memory, about a third more compute)")
    collective_timeout_s: float = arg(600.0, "a collective waiting longer than this fails the job instead of hanging")
    max_nonfinite_steps: int = arg(3, "stop after this many steps in a row skipped for a non-finite loss or gradient")


PRESETS = {
    "paper": {},  # the defaults above: 10 x 10,178 / 128 = 795 steps
    # SmolLM2-135M on CPU, a few minutes. 2 shared CPU cores train ~15-30 tokens/s (forward + backward), so the
    # demo keeps the shorter questions (<= 160 prompt tokens: 260 of 1,272) and takes 6 steps of 8: the loss falls
    # as the model learns to answer " X" + EOS; learning the medicine takes the paper preset's 795 steps of 128.
    "demo": dict(model="smollm2-135m", train_data="medqa_dev", max_prompt_tokens=160, train_batch_size=8,
                 micro_batch_size=8, lr=2e-5, warmup_ratio=0.0, max_steps=6, save_every=6, device="cpu",
                 dtype="float32", gradient_checkpointing=False, out_dir="runs/sft_demo"),
    # a tiny random model, a few steps, a checkpoint after each: the test suite's end-to-end run.
    "smoke": dict(model="tiny-qwen2", train_data="medqa_dev", max_prompt_tokens=4096, train_batch_size=8,
                  micro_batch_size=4, lr=3e-3, warmup_ratio=0.0, max_steps=8, save_every=1, keep_last=0,
                  device="cpu", dtype="float32", gradient_checkpointing=False, out_dir="runs/sft_smoke"),
}


def parse_config(argv=None) -> Config:
    """Flags override the preset, which overrides the dataclass defaults (common.parse_flags)."""
    return parse_flags(Config, PRESETS, check_config, argv, __doc__.split("\n")[0])


def check_config(cfg: Config, world: int = 1) -> list:
    bad = []
    if cfg.prompt_style not in TARGET_PREFIX:
        bad.append(f"--prompt_style {cfg.prompt_style!r}: SFT answers directly; choose {' or '.join(TARGET_PREFIX)}")
    if cfg.train_batch_size % world:
        bad.append(f"--train_batch_size {cfg.train_batch_size} must be a multiple of the number of processes ({world})")
    return bad


# ======================================================================================================
# Data: token ids of every example, the rows of each step, and the padded batch
# ======================================================================================================
def load_examples(cfg, tok, log) -> list:
    """Every training question as {"prompt": ids, "target": ids}. The prompt is tokenized by
    data.tokenize_prompts, as eval.py tokenizes it, and the target separately, so training sees exactly the
    token sequence that greedy decoding after that prompt has to produce."""
    if tok.eos_token_id is None:
        raise SystemExit(f"{cfg.model}: the tokenizer has no EOS token to end the answer with")
    records = data.load_dataset(cfg.train_data, cfg.data_dir or None)
    if cfg.shuffle_options:
        records = [data.shuffle_options(r, cfg.seed + i) for i, r in enumerate(records)]
    ids, attn, kept, skipped = data.tokenize_prompts(tok, [data.build_prompt(r, cfg.prompt_style, tok) for r in records],
                                                     cfg.max_prompt_tokens)  # [N, P] left padded
    if skipped:
        log(f"left out {len(skipped)} of {len(records)} prompts longer than --max_prompt_tokens {cfg.max_prompt_tokens}")
    if not kept:
        raise SystemExit(f"no prompt of {cfg.train_data} fits in --max_prompt_tokens {cfg.max_prompt_tokens}")
    prefix = TARGET_PREFIX[cfg.prompt_style]
    return [{"prompt": ids[b][attn[b].bool()].tolist(),
             "target": tok(prefix + records[i]["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]}
            for b, i in enumerate(kept)]


def step_rows(cfg, n, step, rank, world) -> list:
    """Indices of this rank's examples at `step` (1-based). The global batch of step s is the next
    train_batch_size examples of a seeded pass over the data (a new permutation each epoch, and a batch may
    straddle two epochs); rank r takes the r-th slice of it, so the global batch is the same for any world."""
    B = cfg.train_batch_size
    start = (step - 1) * B
    epoch, offset = divmod(start, n)
    stream = []
    while len(stream) < offset + B:
        stream += data.epoch_order(n, cfg.seed, epoch)
        epoch += 1
    batch = stream[offset:offset + B]  # [B] this step's examples, the same on every rank
    per_rank = B // world
    return batch[rank * per_rank:(rank + 1) * per_rank]


def make_batch(examples, pad_id):
    """Left-padded prompts, then right-padded targets: the layout train_ppo.py trains on (prompt | response),
        [pad p p p p | t t t]       input_ids [B, P+T], attention_mask 0 on every pad
        [pad pad p p p | t t pad]   loss_mask [B, T]: 1 on target tokens, 0 on the right padding
    so the targets are the last T columns, whatever their lengths."""
    P = max(len(e["prompt"]) for e in examples)
    T = max(len(e["target"]) for e in examples)
    ids = torch.full((len(examples), P + T), pad_id, dtype=torch.long)  # [B, P+T]
    attn = torch.zeros_like(ids)  # [B, P+T]
    loss_mask = torch.zeros(len(examples), T)  # [B, T]
    for b, e in enumerate(examples):
        p, t = len(e["prompt"]), len(e["target"])
        ids[b, P - p:P], ids[b, P:P + t] = torch.tensor(e["prompt"]), torch.tensor(e["target"])
        attn[b, P - p:P + t] = 1
        loss_mask[b, :t] = 1
    return ids, attn, loss_mask


# ======================================================================================================
# One step: forward/backward over micro-batches, one optimizer step
# ======================================================================================================
def target_logprobs(model, ids, attn, T):
    """log pi(token) [B, T] of the last T tokens of ids [B, L], and whether each is the model's argmax [B, T].
    Positions come from the attention mask, as in generation (model.position_ids_from_mask). Logits only for the
    T positions that predict them (logits_to_keep): with T = 2 or 3 the [B, T, vocab] fp32 tensor is small, so
    the chunking of model.token_logprobs buys nothing, and the argmax it does not return gives the accuracy."""
    out = model(input_ids=ids, attention_mask=attn, position_ids=M.position_ids_from_mask(attn), use_cache=False,
                logits_to_keep=T + 1)
    logits = out.logits[:, :-1].float()  # [B, T, V]: the position before each target token predicts it
    targets = ids[:, -T:]  # [B, T]
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)  # [B, T]  log pi(t)
    return logp, logits.argmax(-1) == targets  # [B, T], [B, T]


def train_step(cfg, step, batch, policy, opt, sched, pad_id, world, device):
    """Loss = -sum of log pi(target token) / (target tokens of the GLOBAL batch), backpropagated x world because
    FSDP averages gradients over ranks: the gradient is the global batch's token-mean loss whatever the number
    of ranks and micro-batches (as train_ppo.ppo_update)."""
    n_tok = D.all_reduce_dict({"n": sum(len(e["target"]) for e in batch)})["n"]
    sums = {"nll": 0.0, "token_hits": 0.0, "letter_hits": 0.0, "rows": len(batch), "tokens": 0.0}
    batch = sorted(batch, key=lambda e: len(e["prompt"]))  # similar lengths share a micro-batch: less padding
    for s in range(0, len(batch), cfg.micro_batch_size):
        ids, attn, mask = (x.to(device) for x in make_batch(batch[s:s + cfg.micro_batch_size], pad_id))
        with autocast(cfg, device):
            logp, hit = target_logprobs(policy, ids, attn, mask.shape[1])  # [b, T], [b, T]
        nll = -(logp * mask).sum()  # cross-entropy summed over this micro-batch's target tokens
        if fault("nan_loss", step):
            nll = nll * float("nan")
        (nll / n_tok * world).backward()
        letter = mask * (mask.cumsum(1) < mask.sum(1, keepdim=True))  # [b, T] the target minus its final EOS
        sums["nll"] += nll.item()
        sums["token_hits"] += (hit * mask).sum().item()
        sums["letter_hits"] += (hit | (letter == 0)).all(1).sum().item()  # greedy decoding writes " X" exactly
        sums["tokens"] += attn.sum().item()
    norm = D.grad_norm_and_clip(policy, cfg.max_grad_norm)
    if math.isfinite(norm):  # never step on a non-finite gradient
        opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    s = D.all_reduce_dict(sums)
    return {"loss": s["nll"] / n_tok, "letter_acc": s["letter_hits"] / s["rows"], "token_acc": s["token_hits"] / n_tok,
            "grad_norm": norm, "tokens": int(s["tokens"]), **({} if math.isfinite(norm) else {"skipped": "non-finite gradient"})}


# ======================================================================================================
# The loop
# ======================================================================================================
def main(argv=None):
    cfg = parse_config(argv)
    rank, world, device, log, out, resume_from = start_run(cfg, check_config)

    # --- the model: fp32 master weights (bf16 compute by autocast or FSDP's mixed precision), sharded under torchrun
    amp = cfg.dtype == "bfloat16" and device.type == "cuda"
    policy, tok = M.load_policy(str(resume_from / "policy") if resume_from else cfg.model, dtype="float32",
                                device=device, gradient_checkpointing=cfg.gradient_checkpointing)
    D.shard(policy, M.layer_modules(policy), mixed_precision=amp)
    policy.train()

    examples = load_examples(cfg, tok, log)
    total_steps = cfg.max_steps or max(1, cfg.num_epochs * len(examples) // cfg.train_batch_size)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
    models, opts, scheds = {"policy": policy}, {"policy": opt}, {"policy": sched}  # checkpoint.py's naming
    start = 1
    if resume_from:
        start = C.load_training(resume_from, models, opts, scheds)["step"] + 1
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        C.keep_steps_upto(out / "metrics.jsonl", start - 1) if resume_from else (out / "metrics.jsonl").unlink(missing_ok=True)
    e = examples[0]
    log(f"{cfg.preset}: {M.count_parameters(policy) / 1e6:.1f}M-parameter model on {world} x {device.type}, "
        f"{len(examples)} questions, {total_steps} steps of {cfg.train_batch_size}; first target "
        f"{tok.decode(e['target'])!r} = {len(e['target'])} tokens {e['target']}")

    stop = {}  # SIGTERM / Ctrl-C: finish the current step, save, exit; a second signal stops at once
    def on_signal(signum, _frame):
        if stop:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
    signal.signal(signal.SIGTERM, on_signal), signal.signal(signal.SIGINT, on_signal)

    bar = tqdm(range(start, total_steps + 1), initial=start - 1, total=total_steps, disable=rank != 0, dynamic_ncols=True)
    bad_in_a_row, saved = 0, 0
    for step in bar:
        t0 = time.time()
        if fault("raise", step, rank):
            raise RuntimeError(f"injected fault at step {step} on rank {rank}")
        lr = sched.get_last_lr()[0]  # the rate this step's update uses
        batch = [examples[i] for i in step_rows(cfg, len(examples), step, rank, world)]
        m = train_step(cfg, step, batch, policy, opt, sched, tok.pad_token_id, world, device)
        dt = time.time() - t0
        metrics = {"step": step, "epoch": round(step * cfg.train_batch_size / len(examples), 4), **m, "lr": lr,
                   "tokens_per_s": m["tokens"] / dt, "time_step": dt}  # tokens: prompt + target, all ranks
        bad_in_a_row = bad_in_a_row + 1 if "skipped" in m else 0
        if bad_in_a_row:
            log(f"step {step}: update skipped ({m['skipped']})")
        if bad_in_a_row >= cfg.max_nonfinite_steps:
            raise SystemExit(f"step {step}: {bad_in_a_row} steps in a row with a non-finite gradient "
                             f"(--max_nonfinite_steps {cfg.max_nonfinite_steps}); stopping. The last checkpoint "
                             f"holds finite weights: lower --lr, then --resume.")
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['letter_acc']:.2f}", lr=f"{lr:.2e}")
        stopping = D.all_reduce_dict({"s": float(bool(stop))})["s"] > 0
        if step % cfg.save_every == 0 or step == total_steps or stopping:
            C.save_training(out / "checkpoints", step, models, opts, scheds, tok, asdict(cfg),
                            {"data_position": step * cfg.train_batch_size}, keep_last=cfg.keep_last,
                            slow=fault("slow_save", step))
            saved = step
        if stopping:
            log(f"stopped by {stop.get('signal', 'a signal on another rank')} after step {step}; checkpoint "
                f"{out}/checkpoints/step_{saved:06d} written; continue with --resume")
            break
    bar.close()
    if saved == total_steps:
        log(f"done: the fine-tuned model is {out}/checkpoints/step_{saved:06d}/policy "
            f"(python eval.py --model {out}/checkpoints/step_{saved:06d}/policy --prompt {cfg.prompt_style})")
    D.cleanup()


if __name__ == "__main__":
    main()
