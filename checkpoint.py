"""Checkpoints that are either complete or absent, with a manifest that says which.

Layout (one folder per saved step, under OUT/checkpoints/):
    step_000010/
        policy/           Hugging Face folder (AutoModelForCausalLM.from_pretrained loads it); with
                          LoRA the policy adapter in PEFT's layout (adapter_config.json,
                          adapter_model.safetensors: PeftModel.from_pretrained loads it)
        critic/           Hugging Face folder (AutoModelForTokenClassification), PPO with a critic;
                          with LoRA its adapter as above, and value_head.safetensors
        optim/            per optimizer NAME: NAME.safetensors (its whole state, gathered on rank 0)
                          and NAME.json (the param groups' hyperparameters, which tensor is which);
                          every rank takes its shard on load, so a run can resume on another number
                          of ranks
        rng.safetensors   the torch (and CUDA) and numpy random states, as tensors
        rng.json          the rest of numpy's state and Python's random state (ints and floats)
        trainer_state.json  step, position in the data, KL coefficient, scheduler, ...
        MANIFEST.json     step, config, every file with its size and sha256; written last

How "complete or absent" is kept: everything is written into `step_000010.tmp-<id>/`; only when
every file is written and fsynced does rank 0 write MANIFEST.json and rename the folder to
`step_000010` (a rename within one folder is atomic). A process killed at any moment leaves at worst
a `.tmp-` folder (or `.old-` / `.del-`: a step being replaced, an old step being deleted), which
resume ignores and the next save removes. Resume trusts a checkpoint only after checking every file
against the manifest; `fallback=True` steps back to the newest one that passes.

Nothing in a checkpoint runs code when it is loaded: every file is safetensors or JSON, never a
pickle (torch.load, torch.distributed.checkpoint's metadata), and model folders load with
use_safetensors. A run folder from someone else can then be resumed or evaluated; the manifest's
checksums do not help there, since whoever sends the folder writes the manifest too.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import distributed

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
    except Exception as e:
        # reported below, once every rank agreed: OSError, safetensors' SafetensorError, ...
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
    partial folder is removed (a full disk is the usual cause)."""
    said = str(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
    what = " ".join(said.split())
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
            refuse_pickles(folder)
            return folder
        msg = f"checkpoint {folder} failed verification:\n  " + "\n  ".join(problems)
        if not fallback:
            raise CheckpointError(msg + "\nrerun with --resume_fallback to resume from the "
                                        "previous checkpoint")
        log(msg + "\nfalling back to the previous checkpoint")
    raise CheckpointError(f"no checkpoint under {root} passes verification")


# what torch.save, pytorch_model.bin and torch.distributed.checkpoint's files are: pickles
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".distcp")


def refuse_pickles(folder):
    """Refuse a checkpoint holding a pickle, before anything of it is loaded: unpickling runs
    whatever code the file holds, and a manifest that agrees proves nothing about who wrote it.
    A refusal, not damage: no falling back to an older step."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix in PICKLE_SUFFIXES or path.name == ".metadata"):
            raise CheckpointError(f"{path}: a pickle, which would run any code it holds when "
                                  f"loaded; a checkpoint holds only safetensors and JSON (this one "
                                  f"was altered, or written by a version that used pickles)")


# --------------------------------------------------------------------------------------------------
# A training run's whole state: used by both trainers
# --------------------------------------------------------------------------------------------------
def save_training(root, step, trained: dict, opts: dict, scheds: dict, tokenizer, config: dict,
                  extra: dict, keep_last: int = 0):
    """Write checkpoint `step`: what each optimizer trains (`trained`: a folder name ->
    roles.Trained: a Hugging Face folder, or a LoRA adapter in PEFT's layout) and each optimizer's
    state (both
    gathered on rank 0), the schedulers, RNG states and `extra` (e.g. the KL coefficient). `opts`
    and `scheds` map the same names to an optimizer and its scheduler. Collective: every rank calls
    it. Refuses to write non-finite weights."""
    full = {name: item.gather() for name, item in trained.items()}  # under FSDP on rank 0 only
    finite = all(torch.isfinite(t).all() for weights in full.values() for t in weights.values()
                 if t.is_floating_point())
    if not distributed.broadcast_object(finite):
        raise CheckpointError(f"step {step}: the weights hold NaN or inf; refusing to write them "
                              f"into a checkpoint")
    optim = {name: _full_optimizer_state(item.module, opts[name]) for name, item in trained.items()}
    world_size = 1
    if distributed.is_distributed():
        world_size = distributed.all_reduce_sum(torch.ones(1)).item()
    state = {"step": step, **extra, "schedulers": {k: s.state_dict() for k, s in scheds.items()},
             "world_size": world_size}
    with writing(root, step, {"config": config}, keep_last) as tmp:
        if _rank() == 0:
            for name, item in trained.items():
                item.write(tmp / name, full[name], tokenizer)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            _save_rng(tmp)
            (tmp / "optim").mkdir()
            for name, osd in optim.items():
                _save_optimizer(osd, tmp / "optim", name)


def load_training(folder, trained: dict, opts: dict, scheds: dict) -> dict:
    """Restore optimizers (resharded to this run's number of ranks), schedulers and RNG states from
    a checkpoint whose weights the caller already loaded (`trained`: as save_training's). Returns
    trainer_state.json. Reads only safetensors and JSON: a file that is anything else is refused,
    naming it."""
    folder = Path(folder)
    # whole tensors: under FSDP each rank keeps its shard of them (full_state_dict, whichever the
    # number of ranks); a single process loads them as they are
    whole = StateDictOptions(full_state_dict=distributed.is_distributed())
    for name, item in trained.items():
        osd = _load_optimizer(folder / "optim", name)
        set_optimizer_state_dict(item.module, opts[name], osd, options=whole)
    state = _read_json(folder / "trainer_state.json")
    try:
        for k, s in scheds.items():
            s.load_state_dict(state["schedulers"][k])
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{folder / 'trainer_state.json'}: no scheduler state for {e}") from e
    _load_rng(folder)
    return state


# --- the files: safetensors for tensors, JSON for the rest; never a pickle -----------------------
def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # a pickle in its place is not UTF-8, or not JSON
        raise CheckpointError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from e


def _read_tensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:  # a pickle in its place has no safetensors header
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({type(e).__name__}: {e})") from e


def _save_rng(folder: Path):
    """The random states every rank restores on resume (rank 0's: all ranks draw alike)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = cuda_state
    save_file(tensors, folder / "rng.safetensors")
    version, python_state, gauss_next = random.getstate()
    rest = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next}}
    (folder / "rng.json").write_text(json.dumps(rest))


def _load_rng(folder: Path):
    tensors = _read_tensors(folder / "rng.safetensors")
    rest = _read_json(folder / "rng.json")
    try:
        torch.set_rng_state(tensors["torch"])
        numpy = rest["numpy"]
        np.random.set_state((numpy["kind"], tensors["numpy"].numpy().astype(np.uint32),
                             numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
        python = rest["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder / 'rng.safetensors'} or {folder / 'rng.json'}: not a "
                              f"random state ({type(e).__name__}: {e})") from e
    cuda_states = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    # on another number of GPUs than at save time there is no state to give each of them
    if torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name, on CPU; under FSDP gathered onto rank 0
    (other ranks get {}). Whole tensors, not shards: then loading on any number of ranks is
    set_optimizer_state_dict's full_state_dict path, and the files hold no sharding layout."""
    if not distributed.is_distributed():
        return get_optimizer_state_dict(model, optimizer)
    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_optimizer(osd: dict, folder: Path, name: str):
    """NAME.safetensors: each tensor of the state as "PARAM/KEY"; NAME.json: the param groups and,
    per parameter, its non-tensor values and the keys of its tensors."""
    tensors, index = {}, {}
    for param, values in osd["state"].items():
        index[param] = {"tensors": [], "values": {}}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{key}"] = value.detach().cpu().contiguous()
                index[param]["tensors"].append(key)
            else:
                index[param]["values"][key] = value
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(
        json.dumps({"state": index, "param_groups": osd["param_groups"]}, indent=1))


def _load_optimizer(folder: Path, name: str) -> dict:
    tensors = _read_tensors(folder / f"{name}.safetensors")
    index_path = folder / f"{name}.json"
    index = _read_json(index_path)
    try:
        state = {param: {**entry["values"], **{key: tensors[f"{param}/{key}"]
                                                for key in entry["tensors"]}}
                 for param, entry in index["state"].items()}
        param_groups = [dict(group) for group in index["param_groups"]]
        for group in param_groups:
            if "betas" in group:  # a tuple before JSON made it a list; keep the optimizer's type
                group["betas"] = tuple(group["betas"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not an optimizer index for "
                              f"{folder / f'{name}.safetensors'} ({type(e).__name__}: {e})") from e
    return {"state": state, "param_groups": param_groups}


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
