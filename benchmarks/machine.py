"""Peak rates of this machine for the kernels a DDPM U-Net step is made of (docs/performance.md,
section "Machine"). A plain script, not a benchmark test:

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


def measure(repeats: int) -> dict[str, dict]:
    results = {}
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    results["fp32 matmul 4096^3 (GFLOP/s)"] = rate(lambda: a @ b, 2 * n**3 / 1e9, repeats)
    a16, b16 = a.bfloat16(), b.bfloat16()
    results["bf16 matmul 4096^3 (GFLOP/s)"] = rate(lambda: a16 @ b16, 2 * n**3 / 1e9, repeats)
    a8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    b8 = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    results["int8 torch._int_mm 4096^3 (GOP/s)"] = rate(lambda: torch._int_mm(a8, b8), 2 * n**3 / 1e9, repeats)
    del a, b, a16, b16, a8, b8

    # A cifar10 U-Net conv: the 3x3 convs of the 16x16 level (256 channels), batch 8.
    x = torch.randn(8, 256, 16, 16)
    w, bias = torch.randn(256, 256, 3, 3) * 0.02, torch.zeros(256)
    flops = 2 * 8 * 256 * 256 * 9 * 16 * 16
    with torch.inference_mode():
        results["fp32 conv3x3 8x256x16x16 (GFLOP/s)"] = rate(lambda: F.conv2d(x, w, bias, padding=1),
                                                               flops / 1e9, repeats * 5)
        xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
        results["bf16 conv3x3 8x256x16x16 (GFLOP/s)"] = rate(lambda: F.conv2d(xb, wb, bb, padding=1),
                                                               flops / 1e9, repeats * 5)

    # Memory: 256 MiB fp32 tensors, far beyond the caches. copy moves 2 x 256 MiB, add 3 x 256 MiB.
    size = 64 * 2**20
    src, other, dst = torch.randn(size), torch.randn(size), torch.empty(size)
    nbytes = size * 4
    results["copy 256 MiB (GB/s, read + write)"] = rate(lambda: dst.copy_(src), 2 * nbytes / 1e9, repeats)
    results["add 256 MiB (GB/s, 2 reads + write)"] = rate(lambda: torch.add(src, other, out=dst), 3 * nbytes / 1e9,
                                                          repeats)
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
