"""What every section of bench.py measures with: the table's parts and rows, clocks that do not
disturb what they time, peak memory, and child processes.

A section is a list of `Part`s: a row, or a small group of rows measured together (the ratios of a
group are against a baseline in the same group). bench.py measures each part by its own call, so a
part that fails becomes one "failed: reason" row and every other row stays.
"""
import ctypes
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


@dataclass(frozen=True)
class Part:
    """Rows of the table measured by one call (see the module docstring)."""
    section: str
    what: str  # names the part in its "failed" row
    measure: Callable[[], list[str]]  # -> the part's rows, each made by `row`


def row(section: str, what: str, measured: str = "", vs: str = "") -> str:
    """One markdown row: | section | what | measured | vs |."""
    return f"| {section} | {what} | {measured} | {vs} |"


def reason(error: BaseException) -> str:
    """An exception as one short line for the table: its type and its message's first line."""
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def failed_row(part: Part, error: BaseException) -> str:
    return row(part.section, f"{part.what}: failed: {reason(error)}")


# ==================================================================================================
# Clocks
# ==================================================================================================
def sync(device):
    """Wait for the GPU's queued work, so that a host clock read after it counts that work (no-op
    on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timeline:
    """Points in time of the work queued on a device, read once that work has run. On CUDA they
    are events recorded in the stream: recording one does not wait for the GPU, so the host runs
    ahead between them as it does untimed (a torch.cuda.synchronize per decode step would slow
    exactly the loops that avoid one). On the CPU, where work runs as it is called, the host
    clock."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        """From mark `start` to mark `end`, waiting for the work before `end` to finish."""
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000


def best_time(fn, repeats: int) -> float:
    """Least wall-clock seconds of `repeats` calls (the least disturbed by other processes); `fn`
    waits for its own device work."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ==================================================================================================
# Memory
# ==================================================================================================
def resident_bytes(field: str = "VmHWM") -> int:
    """A /proc/self/status size of this process in bytes: VmHWM (peak resident set since the last
    reset_peak) or VmRSS (resident now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


# glibc serves a large allocation from a mapping of its own only above a threshold that rises as
# large blocks are freed; below it, freed blocks stay on glibc's heap, so a resident peak also
# counts memory freed long before. A fixed threshold gives every block of 128 KiB or more back
# when it is freed: the peak is then the live memory's. It costs time (the pages are faulted in
# afresh), so what is timed runs without it. For a child process, as its environment:
FREED_BLOCKS_RETURNED = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def return_freed_blocks() -> bool:
    """The same in this process, from now on (glibc's mallopt; False elsewhere: nothing done)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_mmap_threshold = -3  # malloc.h
    return bool(ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024))


def reset_peak(device) -> None:
    """Start a new peak: PyTorch's allocator peak on CUDA, the kernel's high-water mark of the
    process's resident memory on the CPU ("5" to clear_refs resets it; Linux >= 4.0)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes(device) -> int:
    """The peak since reset_peak: bytes PyTorch allocated on the GPU (where the models live), else
    the process's peak resident set."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resident_bytes("VmHWM")


def current_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    return resident_bytes("VmRSS")


def device_memory(device) -> int | None:
    """Bytes of the GPU's memory; None on the CPU (its limit is not what the tables compare)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


# ==================================================================================================
# Child processes
# ==================================================================================================
def run_child(cmd: list, tag: str, timeout: float, env: dict | None = None) -> dict:
    """Run `cmd` from the repository root (with `env` added to the environment) and return the
    JSON its stdout prints after `tag`; on a failure, the error holds the command and the ends of
    its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    shared = ROOT.parent / "shared" / "data"
    if "MEDRLVR_DATA" not in env and shared.is_dir():
        env["MEDRLVR_DATA"] = str(shared)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    found = [ln for ln in p.stdout.splitlines() if ln.startswith(tag + " ")]
    if p.returncode or not found:
        # the last line of stderr that says something (not a rule of "=" or "-") comes first:
        # the table's "failed" row shows the first line
        said = [ln for ln in p.stderr.splitlines() if ln.strip(" =-")]
        last = (said or ["no output"])[-1].strip()
        raise RuntimeError(f"{last} (exit {p.returncode} of {' '.join(map(str, cmd))})\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(found[-1][len(tag) + 1:])
