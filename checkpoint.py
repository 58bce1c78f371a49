"""Checkpoints that are either complete or absent, with a manifest that says which.

Layout (one folder per saved step, under OUT/checkpoints/):
    step_000010/
        policy/           Hugging Face folder (AutoModelForCausalLM.from_pretrained loads it)
        critic/           Hugging Face folder (AutoModelForTokenClassification), PPO with a critic only
        optim/            optimizer state via torch.distributed.checkpoint: sharded, one file per rank,
                          and resharded on load, so a run can resume on a different number of processes
        trainer_state.json  step, position in the data, KL coefficient, scheduler, ...
        MANIFEST.json     step, config, every file with its size and sha256; written last

How "complete or absent" is kept: everything is written into `step_000010.tmp-<id>/`; only when every
file is written and fsynced does rank 0 write MANIFEST.json and rename the folder to `step_000010`
(a rename within one folder is atomic). A process killed at any moment leaves at worst a `.tmp-` folder
(or `.old-` / `.del-`: a step being replaced, an old step being deleted), which resume ignores and the
next save removes. Resume trusts a checkpoint only after checking every file against the manifest;
`fallback=True` steps back to the newest one that passes.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import distributed as D

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
    import torch
    from torch.distributed.checkpoint.api import CheckpointException as DcpError  # a BaseException, not an Exception
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp, problem = None, None
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("step_*.*-*"):  # leftovers of a run killed mid-save (.tmp-, .old-, .del-)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as e:  # a read-only disk, a file where the folder should be: every rank must hear of it
            problem = _cannot_write(final, e)
    tmp, problem = D.broadcast_object((str(tmp) if tmp else None, problem))
    if problem:
        raise CheckpointError(problem)
    tmp = Path(tmp)
    err = None
    try:
        yield tmp
    except (Exception, DcpError) as e:  # noqa: BLE001 - reported below, after every rank agreed
        err = e  # OSError, safetensors' SafetensorError, dcp's DcpError around torch.save's RuntimeError, ...
    # every rank must have written its part before rank 0 publishes the folder
    failed = D.all_reduce_sum(torch.tensor([1.0 if err is not None else 0.0])).item() > 0
    if failed:
        problem = _cannot_write(final, err) if err is not None else \
            f"another rank failed while writing checkpoint {final}; the previous checkpoints are intact"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier()
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
                for old in list_checkpoints(root)[:-keep_last]:  # renamed first: a kill mid-delete leaves no
                    gone = old.with_name(old.name + f".del-{uuid.uuid4().hex[:8]}")  # half checkpoint under its name
                    os.rename(old, gone)
                    shutil.rmtree(gone, ignore_errors=True)
    except OSError as e:  # disk full, read-only folder, ...: say so, keep the previous checkpoint
        problem = _cannot_write(final, e)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(problem) from e
    finally:
        D.barrier()


def _cannot_write(final: Path, err: BaseException) -> str:
    """One line: the checkpoint, the error underneath, and the free space there, measured before the partial
    folder is removed (a full disk is the usual cause, and torch.save says it as "unexpected pos 704 vs 598")."""
    errors = [e for e, _ in err.failures.values()] if hasattr(err, "failures") else [err]  # dcp: one per rank
    what = " ".join("; ".join(str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}" for e in errors).split())
    try:
        free = f" ({shutil.disk_usage(final.parent).free / 2 ** 20:.1f} MiB free there)"
    except OSError:
        free = ""
    return f"could not write checkpoint {final}: {what}{free}; the previous checkpoints are intact"


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if D.is_distributed() else 0


def list_checkpoints(root) -> list:
    """Complete checkpoint folders (published by rename), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
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
    """The newest checkpoint that passes verify(); without `fallback`, a corrupted newest one is an error."""
    ckpts = list_checkpoints(root)
    if not ckpts:
        return None
    for folder in reversed(ckpts):
        problems = verify(folder)
        if not problems:
            return folder
        msg = f"checkpoint {folder} failed verification:\n  " + "\n  ".join(problems)
        if not fallback:
            raise CheckpointError(msg + "\nrerun with --resume_fallback to resume from the previous checkpoint")
        log(msg + "\nfalling back to the previous checkpoint")
    raise CheckpointError(f"no checkpoint under {root} passes verification")


def read_manifest(folder) -> dict:
    return json.loads((Path(folder) / "MANIFEST.json").read_text())


# --- a training run's whole state: used by train_ppo.py and train_sft.py ------------------------------
def save_training(root, step, models: dict, opts: dict, scheds: dict, tokenizer, config: dict, extra: dict,
                  keep_last: int = 0, slow: bool = False):
    """Write checkpoint `step`: each model as a Hugging Face folder (gathered on rank 0), the optimizers
    (sharded, one file per rank), the schedulers, RNG states and `extra` (e.g. the KL coefficient).
    `models` maps a folder name to a model, `opts`/`scheds` the same names to its optimizer/scheduler.
    Collective: every rank calls it. Refuses to write non-finite weights."""
    import numpy as np
    import random
    import torch
    import torch.distributed.checkpoint as dcp
    import model as M
    full = {name: D.full_model_state_dict(m) for name, m in models.items()}  # on rank 0 only under FSDP
    finite = all(torch.isfinite(t).all() for sd in full.values() for t in sd.values() if t.is_floating_point())
    if not D.broadcast_object(finite):
        raise CheckpointError(f"step {step}: the weights hold NaN or inf; refusing to write them into a checkpoint")
    optim = {name: D.optimizer_state_dict(m, opts[name]) for name, m in models.items()}
    state = {"step": step, **extra, "schedulers": {k: s.state_dict() for k, s in scheds.items()},
             "world_size": D.all_reduce_sum(torch.ones(1)).item() if D.is_distributed() else 1}
    with writing(root, step, {"config": config}, keep_last) as tmp:
        if _rank() == 0:
            for name, m in models.items():
                M.save_model(m, tokenizer, tmp / name, state_dict=full[name])
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                       tmp / "rng.pt")
        dcp.save(optim, checkpoint_id=str(tmp / "optim"))  # each rank writes its own shard
        if slow:
            time.sleep(60)  # test hook (MEDRLVR_FAULT=slow_save@N): a window to SIGKILL the process mid-write


def load_training(folder, models: dict, opts: dict, scheds: dict) -> dict:
    """Restore optimizers (resharded to this run's number of ranks), schedulers and RNG states from a
    checkpoint whose model folders the caller already loaded. Returns trainer_state.json."""
    import numpy as np
    import random
    import torch
    import torch.distributed.checkpoint as dcp
    folder = Path(folder)
    optim = {name: D.optimizer_state_dict(m, opts[name]) for name, m in models.items()}
    dcp.load(optim, checkpoint_id=str(folder / "optim"))
    for name, m in models.items():
        D.load_optimizer_state_dict(m, opts[name], optim[name])
    state = json.loads((folder / "trainer_state.json").read_text())
    for k, s in scheds.items():
        s.load_state_dict(state["schedulers"][k])
    rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return state


def keep_steps_upto(path: Path, step: int):
    """On resume, drop log lines of steps after the checkpoint (a killed run may have logged past it), and
    a line torn by a kill in the middle of a write (bytes, not text: it may end inside a UTF-8 character;
    a torn line always belongs to a step after the checkpoint, whose lines come before its save).
    The file is replaced atomically: a kill during the rewrite must not lose the lines kept."""
    def step_of(ln):
        try:
            return json.loads(ln)["step"]
        except (ValueError, KeyError, TypeError):
            return None
    if path.exists():
        lines = [ln for ln in path.read_bytes().split(b"\n") if (s := step_of(ln)) is not None and s <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(ln + b"\n" for ln in lines))
        os.replace(tmp, path)
