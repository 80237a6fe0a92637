"""Data-parallel training on this machine: 1 process x 2 threads against 2 processes x 1 thread
(torchrun, gloo), the same global batch and steps, runs alternated in one test.

The two configurations share the same 2 cores, so the honest expectation is ~1x: DDP can only
win here if two single-threaded processes use the cores better than one two-threaded one, and
it pays for the gradient all-reduce and the duplicated per-step Python work. Recorded:
``samples_per_s_1proc``, ``samples_per_s_2proc`` (global batch x steps/s, from the trainer's own
timing, start-up excluded) and ``scaling`` = their ratio (median of pairs).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys

from conftest import SMOKE

STEPS = 3 if SMOKE else 12
CONFIG, BATCH = ("digits", 8) if SMOKE else ("cifar10", 16)
PAIRS = 1 if SMOKE else 2


def _random_images(folder) -> list[str]:
    """A folder of random RGB images for the cifar10 config (speed only: the content is irrelevant)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return ["--data", "folder", "--data-dir", str(folder)]


def _train(procs: int, out: str, data: list[str]) -> float:
    """Steps per second of one run, as the trainer reports it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                if procs > 1 else [sys.executable])
    cmd = [*launcher, "-m", "ddpm_perf", "train", "--config", CONFIG, "--batch-size", str(BATCH),
           "--steps", str(STEPS), "--warmup", "1", "--checkpoint-every", str(STEPS), "--out", out, "--no-progress",
           *data]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(re.search(r"([\d.]+) steps/s", result.stdout).group(1))


def test_ddp_scaling(benchmark, tmp_path, bench, unet_flops):
    rates: dict[int, list[float]] = {1: [], 2: []}
    data = ["--data", "digits"] if CONFIG == "digits" else _random_images(tmp_path / "images")

    def pair() -> None:
        order = (1, 2) if len(rates[1]) % 2 == 0 else (2, 1)
        for procs in order:
            rates[procs].append(_train(procs, str(tmp_path / f"p{procs}_{len(rates[procs])}"), data))

    benchmark.pedantic(pair, rounds=PAIRS, iterations=1)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    info = benchmark.extra_info
    info.update(plugins="none (DDP)", config=CONFIG, batch=BATCH, shape=[BATCH, *bench.image_shape], steps=1, mode="train",
                samples_per_s_1proc=one * BATCH, samples_per_s_2proc=two * BATCH,
                scaling=statistics.median(b / a for a, b in zip(rates[1], rates[2])),
                seconds_per_step=1 / two, flops_per_image=3 * unet_flops)  # forward + backward ~ 3 forwards
