"""bench.py's machine section: the limits every other number is compared with, measured in the same
run (so under the same background load): the peak matmul FLOP/s (fp32 on the CPU, bf16 on a GPU)
and the copy bandwidth. The parts write what they measured into `limits` ("peak_flops",
"bandwidth"), which the generation, update and paper sections read through `limit`."""
import os
import platform

import torch

from benchmarks.measure import GB, Part, best_time, row, sync


def describe(device) -> str:
    """The machine in one line, for the table's header."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"GPU {props.name} ({props.total_memory / 2 ** 30:.0f} GiB, "
                f"{props.multi_processor_count} SMs), {os.cpu_count()} CPU cores, "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def limit(limits: dict, name: str) -> float:
    """A measured limit, or an error saying the machine section did not measure it."""
    if name not in limits:
        raise RuntimeError(f"no measured {name}: the machine section's row failed or did not run")
    return limits[name]


def parts(args, limits: dict) -> list[Part]:
    """One part a matmul size, one for the copy."""
    device = torch.device(args.device)
    out = [Part("machine", f"matmul {n}x{n}", lambda n=n: matmul_row(device, n, args.repeats,
                                                                      limits))
           for n in args.matmul_sizes]
    out.append(Part("machine", f"memory copy {args.copy_mb} MB",
                    lambda: copy_row(device, args.copy_mb, args.repeats, limits)))
    return out


def matmul_row(device, n: int, repeats: int, limits: dict) -> list[str]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    product = torch.empty(n, n, device=device, dtype=dtype)

    def matmul():
        torch.mm(a, b, out=product)
        sync(device)

    matmul()  # warm-up
    flops = 2 * n ** 3 / best_time(matmul, repeats + 1)  # n x n times n x n: n^3 multiply-adds
    limits["peak_flops"] = max(limits.get("peak_flops", 0.0), flops)
    shown = f"{flops / 1e12:.0f} TFLOP/s" if device.type == "cuda" else f"{flops / GB:.0f} GFLOP/s"
    return [row("machine", f"matmul {n}x{n} {str(dtype).replace('torch.', '')}", shown)]


def copy_row(device, megabytes: int, repeats: int, limits: dict) -> list[str]:
    numbers = megabytes * 2 ** 20 // 4
    src = torch.randn(numbers, device=device)
    dst = torch.empty(numbers, device=device)

    def copy():
        dst.copy_(src)
        sync(device)

    copy()  # warm-up
    bandwidth = 2 * src.numel() * 4 / best_time(copy, repeats + 2)  # each byte read and written
    limits["bandwidth"] = bandwidth
    return [row("machine", f"memory copy {megabytes} MB (read + write)",
                f"{bandwidth / GB:.1f} GB/s")]
