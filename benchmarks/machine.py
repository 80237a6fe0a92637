"""Peak rates of this machine for the kernels a DDPM U-Net step is made of (docs/performance.md,
section "Machine"). A plain script, not a benchmark test (benchmarks/test_roofline.py times the
same ``kernels()`` as benchmarks, for the nightly report's roofline):

    python benchmarks/machine.py [--threads 2] [--json out.json]

Each kernel runs a few warm-up calls, then ``--repeats`` timed calls; the rate of the fastest call
("best") and of the median call are printed. Rates count a multiply-add as 2 operations.
OMP_WAIT_POLICY is set to PASSIVE unless already set (see benchmarks/conftest.py for why).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def rate(fn: Callable[[], object], work: float, repeats: int, warmup: int = 2) -> dict[str, float]:
    """work / seconds of one call of ``fn``: best and median over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {"best": work / min(seconds), "median": work / statistics.median(seconds),
            "seconds_median": statistics.median(seconds)}


@dataclass(frozen=True)
class Kernel:
    """One kernel of the table: ``build()`` allocates its tensors and returns ``(fn, work)``, the
    call to time and the work of one call (GFLOP, GOP or GB: ``unit`` without the "/s"). Also the
    roofline benchmarks' kernels (benchmarks/test_roofline.py), at smaller sizes in smoke runs."""

    key: str  # e.g. "fp32_matmul"
    label: str  # the name printed by this script
    kind: str  # "compute" or "memory"
    dtype: str  # the dtype the kernel computes in: float32, bfloat16, int8
    op: str  # "matmul", "conv3x3", "copy", "add"
    unit: str  # GFLOP/s, GOP/s, GB/s
    build: Callable[[], tuple[Callable[[], object], float]]
    repeats_factor: int = 1  # the short convs get more timed calls


def kernels(n: int = 4096, conv: tuple[int, int, int] = (8, 256, 16), mem_mib: int = 256) -> list[Kernel]:
    """The kernels of the "Machine" table: ``n``^3 matmuls, a 3x3 ``conv`` = (batch, channels,
    size) convolution (a cifar10 U-Net conv of the 16x16 level by default), and copies/adds of
    ``mem_mib`` MiB fp32 tensors (far beyond the caches at the default)."""

    def matmul(dtype: torch.dtype):
        def build():
            if dtype == torch.int8:
                a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
                b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
                return (lambda: torch._int_mm(a, b)), 2 * n**3 / 1e9
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            return (lambda: a @ b), 2 * n**3 / 1e9

        return build

    batch, ch, size = conv

    def conv3x3(dtype: torch.dtype):
        def build():
            x = torch.randn(batch, ch, size, size, dtype=dtype)
            w, bias = (torch.randn(ch, ch, 3, 3) * 0.02).to(dtype), torch.zeros(ch, dtype=dtype)

            def fn():
                with torch.inference_mode():
                    return F.conv2d(x, w, bias, padding=1)

            return fn, 2 * batch * ch * ch * 9 * size * size / 1e9

        return build

    numel = mem_mib * 2**20 // 4
    nbytes = numel * 4

    def copy():
        src, dst = torch.randn(numel), torch.empty(numel)
        return (lambda: dst.copy_(src)), 2 * nbytes / 1e9

    def add():
        src, other, dst = torch.randn(numel), torch.randn(numel), torch.empty(numel)
        return (lambda: torch.add(src, other, out=dst)), 3 * nbytes / 1e9

    shape = f"{batch}x{ch}x{size}x{size}"
    return [
        Kernel("fp32_matmul", f"fp32 matmul {n}^3 (GFLOP/s)", "compute", "float32", "matmul", "GFLOP/s",
               matmul(torch.float32)),
        Kernel("bf16_matmul", f"bf16 matmul {n}^3 (GFLOP/s)", "compute", "bfloat16", "matmul", "GFLOP/s",
               matmul(torch.bfloat16)),
        Kernel("int8_matmul", f"int8 torch._int_mm {n}^3 (GOP/s)", "compute", "int8", "matmul", "GOP/s",
               matmul(torch.int8)),
        Kernel("fp32_conv3x3", f"fp32 conv3x3 {shape} (GFLOP/s)", "compute", "float32", "conv3x3", "GFLOP/s",
               conv3x3(torch.float32), repeats_factor=5),
        Kernel("bf16_conv3x3", f"bf16 conv3x3 {shape} (GFLOP/s)", "compute", "bfloat16", "conv3x3", "GFLOP/s",
               conv3x3(torch.bfloat16), repeats_factor=5),
        Kernel("copy", f"copy {mem_mib} MiB (GB/s, read + write)", "memory", "float32", "copy", "GB/s", copy),
        Kernel("add", f"add {mem_mib} MiB (GB/s, 2 reads + write)", "memory", "float32", "add", "GB/s", add),
    ]


def measure(repeats: int) -> dict[str, dict]:
    results = {}
    for kernel in kernels():
        fn, work = kernel.build()
        results[kernel.label] = rate(fn, work, repeats * kernel.repeats_factor)
        del fn  # frees the kernel's tensors before the next one is allocated
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    results = measure(args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average before {load[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")
    for name, r in results.items():
        print(f"  {name:40s} best {r['best']:8.1f}   median {r['median']:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "load_average": load,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
