"""The roofline of this machine, measured in the same run as the other suites: fp32 and bf16
matmul (and the 3x3 convolution of the cifar10 U-Net, in both), int8 ``torch._int_mm`` and
memory bandwidth (copy, add). The kernels are those of benchmarks/machine.py (the "Machine"
table of docs/performance.md); smoke runs use small sizes. ``test_instruction_peak`` adds the
CPU's own ceiling per dtype (benchmarks/instruction_peak.cpp), recorded apart from the limits.

Each benchmark records ``roofline_rate`` (the work of one call over its median time; a
multiply-add counts 2) and ``roofline_rate_best`` (fastest call) in ``roofline_unit`` (GFLOP/s,
GOP/s or GB/s). The nightly report (benchmarks/nightly.py) takes the FLOP limit of a dtype as
the highest compute rate measured for it in the run, and shows every end-to-end GFLOP/s as a
fraction of the limit of its compute dtype.

Why the limit is the best of matmul *and* conv: on these machines MKL's fp32 matmul runs at
~100 GFLOP/s while oneDNN's fp32 conv reaches ~230, and the fp32 U-Net forward itself runs at
~150-165 GFLOP/s: a matmul-only limit would put the U-Net above 100% of "the limit".
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import build_cpp
from machine import kernels  # benchmarks/machine.py (pytest puts the test's folder on sys.path)

FULL = kernels()
SMOKE_SIZES = dict(n=256, conv=(2, 32, 8), mem_mib=4)


@pytest.mark.parametrize("key", [k.key for k in FULL])
def test_roofline(benchmark, bench, timing, key):
    kernel = next(k for k in (kernels(**SMOKE_SIZES) if bench.smoke else FULL) if k.key == key)
    fn, work = kernel.build()
    r = timing.rounds_of(benchmark, fn, rounds=timing.rounds * kernel.repeats_factor, warmup_rounds=2)
    seconds = statistics.median(r.target)
    info = benchmark.extra_info
    info.update(
        plugins="none", config=None, parameters=None, mode="kernel", steps=1, batch=1,
        shape=[kernel.label], dtype=kernel.dtype, roofline_kernel=kernel.key, roofline_label=kernel.label,
        roofline_kind=kernel.kind, roofline_op=kernel.op, roofline_unit=kernel.unit,
        roofline_rate=work / seconds, roofline_rate_best=work / min(r.target), roofline_work=work,
        seconds_per_step=seconds, images_per_s=None, image_steps_per_s=None,
        # compute kernels: gflop_per_s is their rate (GOP/s for int8); memory kernels do no FLOPs
        flops_per_image=work * 1e9 if kernel.kind == "compute" else 0,
        gb_per_s=work / seconds if kernel.kind == "memory" else None,
    )
    timing.headline(f"roofline {kernel.label:40s} {info['roofline_rate']:8.1f} (best {info['roofline_rate_best']:.1f}) "
                    f"{kernel.unit}")
    assert torch.isfinite(torch.as_tensor(info["roofline_rate"]))


# (instruction, operations per instruction, compiler flag, /proc/cpuinfo flag): fp32 FMA (16 lanes x
# 2), bf16 pairs into fp32 (16 lanes x 2 pairs x 2), uint8 x int8 quads into int32 (16 x 4 x 2).
PEAK_INSTRUCTIONS = {
    "float32": ("vfmadd231ps", 32, "-mavx512f", "avx512f"),
    "bfloat16": ("vdpbf16ps", 64, "-mavx512bf16", "avx512_bf16"),
    "int8": ("vpdpbusd", 128, "-mavx512vnni", "avx512_vnni"),
}


@pytest.mark.parametrize("dtype", list(PEAK_INSTRUCTIONS))
def test_instruction_peak(benchmark, bench, tmp_path, dtype):
    """The CPU's own ceiling for a dtype: its AVX-512 multiply-add instruction issued back to back
    on every thread, no memory traffic (benchmarks/instruction_peak.cpp). Recorded as kind "peak":
    the nightly report's FLOP limits stay the best measured matmul or conv of the run."""
    insn, ops, flag, cpu_flag = PEAK_INSTRUCTIONS[dtype]
    exe = build_cpp(Path(__file__).with_name("instruction_peak.cpp"), tmp_path / "peak", cpu_flag,
                    "-pthread", flag, f"-DPEAK_INSN={insn}", f"-DPEAK_OPS={ops}")
    threads, iterations = torch.get_num_threads(), 200_000 if bench.smoke else 20_000_000
    rates: list[float] = []
    benchmark.pedantic(lambda: rates.append(float(subprocess.run([str(exe), str(threads), str(iterations)],
                                                                 capture_output=True, text=True, check=True).stdout)),
                       rounds=1 if bench.smoke else 3, iterations=1)
    rate, work = statistics.median(rates) / 1e9, iterations * 24 * ops * threads / 1e9  # work of one run
    unit = "GOP/s" if dtype == "int8" else "GFLOP/s"
    benchmark.extra_info.update(
        plugins="none", config=None, parameters=None, mode="kernel", steps=1, batch=1, shape=[insn], dtype=dtype,
        roofline_kernel=f"{dtype}_peak", roofline_label=f"{insn} peak, {threads} threads (registers only)",
        roofline_kind="peak", roofline_op=insn, roofline_unit=unit, roofline_rate=rate,
        roofline_rate_best=max(rates) / 1e9, roofline_work=work, threads=threads, seconds_per_step=work / rate,
        images_per_s=None, image_steps_per_s=None, flops_per_image=work * 1e9)
    assert rate > 0
