"""Checkpoints that are either complete or absent, with a manifest that says which.

Layout (one folder per saved step, under OUT/checkpoints/):
    step_000010/
        policy/           Hugging Face folder (AutoModelForCausalLM.from_pretrained loads it)
        critic/           Hugging Face folder (AutoModelForTokenClassification), PPO with a critic
        optim/            optimizer state via torch.distributed.checkpoint: sharded, one file per
                          rank, resharded on load, so a run can resume on another number of ranks
        rng.pt            the torch, numpy and Python random states
        trainer_state.json  step, position in the data, KL coefficient, scheduler, ...
        MANIFEST.json     step, config, every file with its size and sha256; written last

How "complete or absent" is kept: everything is written into `step_000010.tmp-<id>/`; only when
every file is written and fsynced does rank 0 write MANIFEST.json and rename the folder to
`step_000010` (a rename within one folder is atomic). A process killed at any moment leaves at worst
a `.tmp-` folder (or `.old-` / `.del-`: a step being replaced, an old step being deleted), which
resume ignores and the next save removes. Resume trusts a checkpoint only after checking every file
against the manifest; `fallback=True` steps back to the newest one that passes.
"""
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import distributed
from model import save_model

STEP_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    pass


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(folder: Path):
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_json_atomic(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def writing(root, step: int, meta: dict, keep_last: int = 0):
    """Yield a temporary folder to write step `step` into; publish it atomically on success.

    All ranks enter together (rank 0 picks the folder name). On any error the temporary folder is
    removed, the previous checkpoints are untouched, and a CheckpointError says what happened.
    """
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp, problem = None, None
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            # leftovers of a run killed in the middle of a save: .tmp-, .old-, .del-
            for stale in root.glob("step_*.*-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as e:  # a read-only disk, a file in the folder's place: every rank must hear
            problem = _cannot_write(final, e)
    tmp, problem = distributed.broadcast_object((str(tmp) if tmp else None, problem))
    if problem:
        raise CheckpointError(problem)
    tmp = Path(tmp)
    err = None
    try:
        yield tmp
    except (Exception, CheckpointException) as e:  # dcp's is a BaseException, not an Exception
        # reported below, once every rank agreed: OSError, safetensors' SafetensorError, dcp's
        # CheckpointException around torch.save's RuntimeError, ...
        err = e
    # every rank must have written its part before rank 0 publishes the folder
    failed = distributed.all_reduce_sum(torch.tensor([1.0 if err is not None else 0.0])).item() > 0
    if failed:
        if err is not None:
            problem = _cannot_write(final, err)
        else:
            problem = (f"another rank failed while writing checkpoint {final}; the previous "
                       f"checkpoints are intact")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        raise CheckpointError(problem) from err
    try:
        if _rank() == 0:
            _fsync_tree(tmp)
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            _write_json_atomic(tmp / "MANIFEST.json",
                               {"step": step, "time": time.time(), "files": files, **meta})
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                old = final.with_name(final.name + f".old-{uuid.uuid4().hex[:8]}")
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            if keep_last > 0:
                # renamed first: a kill in mid-delete leaves no half checkpoint under its name
                for old in list_checkpoints(root)[:-keep_last]:
                    gone = old.with_name(old.name + f".del-{uuid.uuid4().hex[:8]}")
                    os.rename(old, gone)
                    shutil.rmtree(gone, ignore_errors=True)
    except OSError as e:  # disk full, read-only folder, ...: say so, keep the previous checkpoint
        problem = _cannot_write(final, e)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(problem) from e
    finally:
        distributed.barrier()


def _cannot_write(final: Path, err: BaseException) -> str:
    """One line: the checkpoint, the error underneath, and the free space there, measured before the
    partial folder is removed (a full disk is the usual cause, and torch.save says it as "unexpected
    pos 704 vs 598")."""
    errors = [err]
    if hasattr(err, "failures"):  # torch.distributed.checkpoint's: one error per rank
        errors = [e for e, _ in err.failures.values()]
    said = [str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}" for e in errors]
    what = " ".join("; ".join(said).split())
    try:
        free = f" ({shutil.disk_usage(final.parent).free / 2 ** 20:.1f} MiB free there)"
    except OSError:
        free = ""
    return f"could not write checkpoint {final}: {what}{free}; the previous checkpoints are intact"


def _rank() -> int:
    return torch.distributed.get_rank() if distributed.is_distributed() else 0


def list_checkpoints(root) -> list:
    """Complete checkpoint folders (published by rename), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def verify(folder) -> list:
    """Problems found when checking a checkpoint against its manifest ([] when it is sound)."""
    folder = Path(folder)
    man = folder / "MANIFEST.json"
    if not man.is_file():
        return [f"{man}: missing"]
    try:  # a damaged manifest can be any JSON at all: check its shape, never raise
        files = [(rel, int(info["bytes"]), str(info["sha256"]))
                 for rel, info in json.loads(man.read_text())["files"].items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{man}: unreadable ({type(e).__name__}: {e})"]
    if not files:
        return [f"{man}: lists no files"]
    problems = []
    for rel, size, digest in files:
        p = folder / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != size:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {size}")
        elif sha256(p) != digest:
            problems.append(f"{p}: sha256 differs from the manifest (corrupted)")
    return problems


def find_resumable(root, fallback: bool = False, log=print):
    """The newest checkpoint that passes verify(); without `fallback`, a corrupted newest one is an
    error."""
    ckpts = list_checkpoints(root)
    if not ckpts:
        return None
    for folder in reversed(ckpts):
        problems = verify(folder)
        if not problems:
            return folder
        msg = f"checkpoint {folder} failed verification:\n  " + "\n  ".join(problems)
        if not fallback:
            raise CheckpointError(msg + "\nrerun with --resume_fallback to resume from the "
                                        "previous checkpoint")
        log(msg + "\nfalling back to the previous checkpoint")
    raise CheckpointError(f"no checkpoint under {root} passes verification")


# --------------------------------------------------------------------------------------------------
# A training run's whole state: used by both trainers
# --------------------------------------------------------------------------------------------------
def save_training(root, step, models: dict, opts: dict, scheds: dict, tokenizer, config: dict,
                  extra: dict, keep_last: int = 0):
    """Write checkpoint `step`: each model as a Hugging Face folder (gathered on rank 0), the
    optimizers (sharded, one file per rank), the schedulers, RNG states and `extra` (e.g. the KL
    coefficient). `models` maps a folder name to a model, `opts`/`scheds` the same names to its
    optimizer/scheduler. Collective: every rank calls it. Refuses to write non-finite weights."""
    # under FSDP gathered on rank 0 only
    full = {name: distributed.full_model_state_dict(m) for name, m in models.items()}
    finite = all(torch.isfinite(t).all() for weights in full.values() for t in weights.values()
                 if t.is_floating_point())
    if not distributed.broadcast_object(finite):
        raise CheckpointError(f"step {step}: the weights hold NaN or inf; refusing to write them "
                              f"into a checkpoint")
    optim = {name: distributed.optimizer_state_dict(m, opts[name]) for name, m in models.items()}
    world_size = 1
    if distributed.is_distributed():
        world_size = distributed.all_reduce_sum(torch.ones(1)).item()
    state = {"step": step, **extra, "schedulers": {k: s.state_dict() for k, s in scheds.items()},
             "world_size": world_size}
    with writing(root, step, {"config": config}, keep_last) as tmp:
        if _rank() == 0:
            for name, m in models.items():
                save_model(m, tokenizer, tmp / name, state_dict=full[name])
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                   "python": random.getstate()}
            torch.save(rng, tmp / "rng.pt")
        dcp.save(optim, checkpoint_id=str(tmp / "optim"))  # each rank writes its own shard


def load_training(folder, models: dict, opts: dict, scheds: dict) -> dict:
    """Restore optimizers (resharded to this run's number of ranks), schedulers and RNG states from
    a checkpoint whose model folders the caller already loaded. Returns trainer_state.json."""
    folder = Path(folder)
    optim = {name: distributed.optimizer_state_dict(m, opts[name]) for name, m in models.items()}
    dcp.load(optim, checkpoint_id=str(folder / "optim"))
    for name, m in models.items():
        distributed.load_optimizer_state_dict(m, opts[name], optim[name])
    state = json.loads((folder / "trainer_state.json").read_text())
    for k, s in scheds.items():
        s.load_state_dict(state["schedulers"][k])
    rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return state


def keep_steps_upto(path: Path, step: int):
    """On resume, drop log lines of steps after the checkpoint (a killed run may have logged past
    it), and a line torn by a kill in the middle of a write (bytes, not text: it may end inside a
    UTF-8 character; a torn line always belongs to a step after the checkpoint, whose lines come
    before its save). The file is replaced atomically: a kill during the rewrite must not lose the
    lines kept."""
    def step_of(ln):
        try:
            return json.loads(ln)["step"]
        except (ValueError, KeyError, TypeError):
            return None
    if path.exists():
        lines = [ln for ln in path.read_bytes().split(b"\n")
                 if (s := step_of(ln)) is not None and s <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(ln + b"\n" for ln in lines))
        os.replace(tmp, path)
