"""The study's SFT baseline: teach the base model to answer a MedQA question with its option letter.

    python train_sft.py                                     # the CPU demo (SmolLM2-135M)
    python train_sft.py --preset paper --out_dir runs/sft   # the study's setting (Qwen2.5-3B)
    torchrun --nproc_per_node=8 train_sft.py --preset paper # the same, FSDP2 over 8 GPUs
    python eval.py --model runs/sft/checkpoints/step_000795/policy --prompt direct --data medqa_test

One training example is the direct prompt (data.build_prompt(record, "direct"): the question, the
instruction, the lettered options, "Answer:") followed by the target " " + letter + EOS. The loss is
the cross-entropy of the target tokens only, averaged over every target token of the global batch;
the EOS is part of the target so that the model stops after the letter, as eval.py's greedy decoding
expects. The study: "SFT (answers directly; lr searched over 1e-5, 5e-6, 1e-6; 10 epochs)": 50.0 on
MedQA, 31.7 on MMLU-Pro health.

The plumbing is shared with train_ppo.py, imported, not copied: model.load_policy, FSDP2 through
distributed.shard, checkpoint.py, and common.py's flags, run setup and step loop. The batches are a
function of (seed, step) only, so a resumed run, or one on another number of processes, trains on
exactly the batches an uninterrupted single-process run would have.
"""
import math
from dataclasses import dataclass

import torch

import checkpoint
import common
import data
import distributed
import experience
import roles
from common import arg
from model import count_parameters, position_ids_from_mask

# What follows the prompt before the letter: "Answer:" wants a space, a chat assistant turn none.
TARGET_PREFIX = {"direct": " ", "direct_chat": ""}


@dataclass
class Config(common.RunFlags):
    """Every field is a flag. The defaults are the study's setting; --preset overlays a named set.
    The study gives only the learning rates it searched and the 10 epochs; the rest (batch, warm-up,
    schedule, clipping, AdamW betas) are the defaults of OpenRLHF's train_sft.py of early 2025, an
    assumption: the study ran PPO on OpenRLHF and does not say what ran its SFT."""
    preset: str = arg("demo", "named overlay of these defaults: paper | demo | smoke (PRESETS)")
    # --- model and data
    model: str = arg("Qwen/Qwen2.5-3B", "model to fine-tune: HF name, folder or model_zoo name")
    train_data: str = arg("medqa_train", "dataset name or file (study: MedQA-USMLE train)")
    data_dir: str = arg("", "folder of the data files (default: $MEDRLVR_DATA)")
    prompt_style: str = arg("direct", "direct ('... Answer:' then ' B', the study) | direct_chat")
    shuffle_options: bool = arg(False, "shuffle each question's options, seeded (study: no)")
    max_prompt_tokens: int = arg(2048, "longer prompts are left out, and counted (OpenRLHF 2048)")
    num_epochs: int = arg(10, "passes over the training questions (study: 10)")
    # --- optimisation
    train_batch_size: int = arg(128, "examples per optimizer step, all ranks (OpenRLHF SFT 128)")
    micro_batch_size: int = arg(8, "examples per forward and backward on each rank (OpenRLHF 8)")
    lr: float = arg(1e-5, "peak learning rate (the study searched 1e-5, 5e-6, 1e-6)")
    warmup_ratio: float = arg(0.03, "linear warm-up share of the steps (OpenRLHF 0.03)")
    min_lr_ratio: float = arg(0.1, "cosine decay to this share of the peak (OpenRLHF 0.1)")
    weight_decay: float = arg(0.0, "AdamW weight decay (OpenRLHF l2 0)")
    max_grad_norm: float = arg(1.0, "gradient clipping (OpenRLHF max_norm 1.0); 0: off")
    compile: bool = arg(False, "torch.compile each decoder layer (flex.compile_decoder_layers)")
    # --- the run (common.RunFlags holds the rest)
    out_dir: str = arg("runs/sft", "metrics.jsonl, config.json and checkpoints/ go here")
    save_every: int = arg(100, "checkpoint every N steps (and at the end)")


PRESETS = {
    "paper": {},  # the defaults above: 10 x 10,178 / 128 = 795 steps
    # SmolLM2-135M on CPU, a few minutes: the shorter questions (<= 160 prompt tokens) and 6 steps
    # of 8, in which the loss falls as the model learns to answer " X" + EOS; learning the medicine
    # takes the paper preset's 795 steps of 128.
    "demo": dict(model="smollm2-135m", train_data="medqa_dev", max_prompt_tokens=160,
                 train_batch_size=8, micro_batch_size=8, lr=2e-5, warmup_ratio=0.0, max_steps=6,
                 save_every=6, device="cpu", dtype="float32", gradient_checkpointing=False,
                 out_dir="runs/sft_demo"),
    # a tiny random model, a few steps, a checkpoint after each: the test suite's end-to-end run
    "smoke": dict(model="tiny-qwen2", train_data="medqa_dev", max_prompt_tokens=4096,
                  train_batch_size=8, micro_batch_size=4, lr=3e-3, warmup_ratio=0.0, max_steps=8,
                  save_every=1, keep_last=0, device="cpu", dtype="float32",
                  gradient_checkpointing=False, out_dir="runs/sft_smoke"),
}


def parse_config(argv=None) -> Config:
    """Flags override the preset, which overrides the dataclass defaults (common.parse_flags)."""
    return common.parse_flags(Config, PRESETS, check_config, argv, __doc__.split("\n")[0])


def check_config(cfg: Config, world: int = 1) -> list:
    """Settings that cannot work, each with the flag to change and why."""
    bad = common.value_problems(cfg, common.own_fields(cfg), positive=(
        "max_prompt_tokens", "num_epochs", "train_batch_size", "micro_batch_size", "lr"),
        non_negative=("weight_decay", "max_grad_norm"), fractions=("warmup_ratio", "min_lr_ratio"),
        named=("model", "train_data"))
    if bad:  # the check below divides by these sizes
        return bad
    if cfg.prompt_style not in TARGET_PREFIX:
        bad.append(f"--prompt_style {cfg.prompt_style!r}: SFT answers directly; choose "
                   f"{' or '.join(TARGET_PREFIX)}")
    if cfg.train_batch_size % world:
        bad.append(f"--train_batch_size {cfg.train_batch_size} must be a multiple of the number of "
                   f"processes ({world})")
    return bad


# ==================================================================================================
# Data: token ids of every example, the rows of each step, and the padded batch
# ==================================================================================================
def load_examples(cfg: Config, tokenizer, log) -> list:
    """Every training question as {"prompt": ids, "target": ids}. The prompt is tokenized by
    data.tokenize_prompts, as eval.py tokenizes it, and the target separately, so training sees
    exactly the token sequence that greedy decoding after that prompt has to produce."""
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"{cfg.model}: the tokenizer has no EOS token to end the answer with")
    records, _, ids, attn = experience.training_prompts(cfg, tokenizer, log)  # [n, P] padded
    prefix = TARGET_PREFIX[cfg.prompt_style]
    examples = []
    for row, record in enumerate(records):
        target = tokenizer(prefix + record["answer"], add_special_tokens=False)["input_ids"]
        examples.append({"prompt": ids[row][attn[row].bool()].tolist(),
                         "target": target + [tokenizer.eos_token_id]})
    return examples


def step_rows(cfg: Config, n: int, step: int, rank: int, world: int) -> list:
    """Indices of this rank's examples at `step` (1-based). The global batch of step s is the next
    train_batch_size examples of a seeded pass over the data (a new permutation each epoch, and a
    batch may straddle two epochs); rank r takes the r-th slice of it, so the global batch is the
    same for any world."""
    batch_size = cfg.train_batch_size
    start = (step - 1) * batch_size
    epoch, offset = divmod(start, n)
    stream = []
    while len(stream) < offset + batch_size:
        stream += data.epoch_order(n, cfg.seed, epoch)
        epoch += 1
    batch = stream[offset:offset + batch_size]  # this step's examples, the same on every rank
    per_rank = batch_size // world
    return batch[rank * per_rank:(rank + 1) * per_rank]


def make_batch(examples, pad_id):
    """Left-padded prompts, then right-padded targets: the layout train_ppo.py trains on,
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
        ids[b, P - p:P] = torch.tensor(e["prompt"])
        ids[b, P:P + t] = torch.tensor(e["target"])
        attn[b, P - p:P + t] = 1
        loss_mask[b, :t] = 1
    return ids, attn, loss_mask


# ==================================================================================================
# One step: forward/backward over micro-batches, one optimizer step
# ==================================================================================================
def target_logprobs(model, ids, attn, T):
    """log pi(token) [B, T] of the last T tokens of ids [B, L], and whether each is the model's
    argmax [B, T]. Positions come from the attention mask, as in generation. Logits only for the T
    positions that predict them (logits_to_keep): with T = 2 or 3 the [B, T, vocab] fp32 tensor is
    small, so model.response_logprobs' chunking buys nothing, and the argmax gives the accuracy."""
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :-1].float()  # [B, T, V]: the position before each target predicts it
    targets = ids[:, -T:]  # [B, T]
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
    return logp, logits.argmax(-1) == targets  # [B, T], [B, T]


@dataclass
class Trainee:
    """What an SFT step updates: the model its forwards run, the parameters trained (every weight,
    or LoRA adapters), their AdamW and its schedule, and the pad id of the batches."""
    policy: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    pad_id: int


def train_step(cfg: Config, batch, trainee: Trainee, run) -> dict:
    """Loss = -sum of log pi(target token) / (target tokens of the GLOBAL batch), backpropagated x
    world because FSDP averages gradients over ranks: the gradient is the global batch's token-mean
    loss whatever the number of ranks and micro-batches (as train_ppo's minibatches)."""
    n_tokens = distributed.all_reduce_dict({"n": sum(len(e["target"]) for e in batch)})["n"]
    sums = {"nll": 0.0, "token_hits": 0.0, "letter_hits": 0.0, "rows": len(batch), "tokens": 0.0}
    batch = sorted(batch, key=lambda e: len(e["prompt"]))  # similar lengths together: less padding
    for s in range(0, len(batch), cfg.micro_batch_size):
        micro = batch[s:s + cfg.micro_batch_size]
        ids, attn, mask = (x.to(run.device) for x in make_batch(micro, trainee.pad_id))
        with distributed.autocast(cfg.dtype, run.device):
            logp, hit = target_logprobs(trainee.policy, ids, attn, mask.shape[1])  # [b, T] x2
        nll = -(logp * mask).sum()  # cross-entropy summed over this micro-batch's target tokens
        (nll / n_tokens * run.world).backward()
        letter = mask * (mask.cumsum(1) < mask.sum(1, keepdim=True))  # [b, T] the target, no EOS
        sums["nll"] += nll.item()
        sums["token_hits"] += (hit * mask).sum().item()
        # greedy decoding writes " X" exactly
        sums["letter_hits"] += (hit | (letter == 0)).all(1).sum().item()
        sums["tokens"] += attn.sum().item()
    norm = distributed.grad_norm_and_clip(trainee.params, cfg.max_grad_norm)
    if math.isfinite(norm):  # never step on a non-finite gradient
        trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.scheduler.step()
    total = distributed.all_reduce_dict(sums)
    metrics = {"loss": total["nll"] / n_tokens, "letter_acc": total["letter_hits"] / total["rows"],
               "token_acc": total["token_hits"] / n_tokens, "grad_norm": norm,
               "tokens": int(total["tokens"])}
    if not math.isfinite(norm):
        metrics["skipped"] = "non-finite gradient"
    return metrics


# ==================================================================================================
# The loop
# ==================================================================================================
def main(argv=None):
    cfg = parse_config(argv)
    run = common.start_run(cfg, check_config)
    # fp32 master weights (bf16 compute by autocast or FSDP's mixed precision), or LoRA adapters on
    # a frozen base in the compute dtype; sharded under torchrun
    policy, tokenizer, trained = roles.load_sft(cfg, run)
    examples = load_examples(cfg, tokenizer, run.log)
    total_steps = cfg.max_steps or max(1, cfg.num_epochs * len(examples) // cfg.train_batch_size)
    optimizer, scheduler = common.adamw(trained["policy"].params, cfg.lr, cfg, total_steps)
    trainee = Trainee(policy, trained["policy"].params, optimizer, scheduler,
                      tokenizer.pad_token_id)
    optimizers, schedulers = {"policy": optimizer}, {"policy": scheduler}  # checkpoint.py's names
    start = 1
    if run.resume_from:
        state = checkpoint.load_training(run.resume_from, trained, optimizers, schedulers)
        start = state["step"] + 1
    common.prepare_out_dir(run, start, ["metrics.jsonl"])
    first = examples[0]
    run.log(f"{cfg.preset}: {count_parameters(policy) / 1e6:.1f}M-parameter model "
            f"({sum(p.numel() for p in trainee.params) / 1e6:.2f}M trained) on {run.world} x "
            f"{run.device.type}, {len(examples)} questions, {total_steps} steps of "
            f"{cfg.train_batch_size}; first target {tokenizer.decode(first['target'])!r} = "
            f"{len(first['target'])} tokens {first['target']}")
    loop = common.StepLoop(run, start, total_steps, trained, optimizers, schedulers, tokenizer,
                           "losses or gradients", "lower --lr, then --resume.")
    for step in loop:
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        batch = [examples[i] for i in step_rows(cfg, len(examples), step, run.rank, run.world)]
        step_metrics = train_step(cfg, batch, trainee, run)
        epoch = round(step * cfg.train_batch_size / len(examples), 4)
        metrics = {"step": step, "epoch": epoch, **step_metrics, "lr": lr}
        postfix = {"loss": f"{metrics['loss']:.3f}", "acc": f"{metrics['letter_acc']:.2f}",
                   "lr": f"{lr:.2e}"}
        # tokens: prompt + target, all ranks
        if loop.end_step(step, metrics, {"data_position": step * cfg.train_batch_size},
                         tokens=metrics["tokens"], postfix=postfix):
            break
    loop.close()
    if loop.saved == total_steps:
        final = f"{run.out}/checkpoints/step_{loop.saved:06d}/policy"
        run.log(f"done: the fine-tuned model is {final} (python eval.py --model {final} --prompt "
                f"{cfg.prompt_style})")


def cli(argv=None):
    """The command line: an error the user can fix ends with its message (common.cli)."""
    common.cli(main, argv)


if __name__ == "__main__":
    cli()
