"""Patch parallelism (issue 6): 2 ranks x 1 thread against 1 process x 1 thread, celeba64 config
(random weights: speed only), DDIM 20 steps, batch 1 (the latency case patch parallelism is
for) and, for displaced, batch 4 and displaced steps alone (with and without prepack on both
sides); runs alternated in one test; the bytes per step at 4 ranks;
the quality of displaced and pcpp on the digits model (smoke: tiny sizes).

Every run is the user's command (``ddpm-perf sample``, under torchrun for the bands); the step
time is the one it prints: ms/step over the whole run, warm-up steps included (start-up and
checkpoint loading excluded), or for the "steady" cases the median step it prints beside it.

The machine's ceiling is measured in the same run (``test_parallel_ceiling``): the throughput of
two single-thread processes computing at once, over one alone. Two ranks cannot beat it: ~2.0
on a quiet machine, ~1.0 when other jobs hold the cores (docs/performance.md, "Patch
parallelism"), so a reader can tell which kind of run a figure comes from.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import SMOKE, quality_checkpoint_path

from ddpm_perf.model.checkpoint import save_checkpoint
from ddpm_perf.model.config import CONFIGS
from ddpm_perf.model.unet import UNet, count_parameters
from ddpm_perf.diffusion.schedule import ScheduleConfig

CONFIG = "digits" if SMOKE else "celeba64"
STEPS = 3 if SMOKE else 20
PAIRS = 1 if SMOKE else 3  # odd: the median pair is a real pair, robust to one run slowed by a neighbour
MODES = ("sync", "displaced", "pcpp")
QUALITY_IMAGES, QUALITY_STEPS = (16, 5) if SMOKE else (256, 50)
# the digits model's 4x4 level on the whole image: exact there
QUALITY_MODES = {"displaced": "mode=displaced", "pcpp": "mode=pcpp", "displaced-whole4": "mode=displaced,whole_at=4"}


def run(cmd: list[str], cwd, ranks: int = 1) -> str:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([*launcher, "-m", "ddpm_perf", *cmd], capture_output=True, text=True, cwd=cwd, env=env,
                            timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def ms_per_step(stdout: str, median: bool = False) -> float:
    """The mean step time the summary line prints, or the median step (``median``)."""
    found = re.search(r"([\d.]+) ms/step(?: \(median ([\d.]+)\))?", stdout)
    assert found and (found.group(2) or not median), f"no step time in: {stdout[-500:]}"
    return float(found.group(2 if median else 1))


def sent_per_step(stdout: str) -> dict[str, int]:
    line = next(s for s in stdout.splitlines() if s.startswith("patch_parallel:"))
    return {kind: round(float(kib) * 1024) for kind, kib in re.findall(r"(\w+) ([\d.]+) KiB", line)}


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = CONFIGS[CONFIG]
    model = UNet(config).eval()
    path = tmp_path_factory.mktemp("patch") / f"{CONFIG}.safetensors"
    save_checkpoint(path, config, ScheduleConfig(), model.state_dict())
    return path, config, count_parameters(model)


def test_parallel_ceiling(benchmark, tmp_path, timing):
    """Throughput of 2 single-thread processes at once over 1 alone, on a 3x3 conv of the
    celeba64 U-Net's band size: what 2 ranks can gain at most on this machine."""
    script = tmp_path / "conv.py"
    script.write_text(textwrap.dedent("""
        import time, torch, torch.nn.functional as F
        torch.set_num_threads(1)
        x, w = torch.randn(1, 128, 32, 64), torch.randn(128, 128, 3, 3)
        for _ in range(5): F.conv2d(x, w, padding=1)
        start, n = time.perf_counter(), 100
        for _ in range(n): F.conv2d(x, w, padding=1)
        print(2 * 128 * 128 * 9 * 32 * 64 * n / (time.perf_counter() - start) / 1e9)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    rates: dict[int, list[float]] = {1: [], 2: []}

    def both() -> None:
        for procs in (1, 2):
            ps = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
                  for _ in range(procs)]
            rates[procs].append(sum(float(p.communicate()[0]) for p in ps))

    benchmark.pedantic(both, rounds=1 if SMOKE else 3, iterations=1)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    flop = 2 * 128 * 128 * 9 * 32 * 64
    benchmark.extra_info.update(plugins="none (2 processes)", mode="conv 3x3 128ch 32x64 fp32, 1 thread per process",
                                gflop_per_s_1proc=one, gflop_per_s_2proc=two, parallel_ceiling=two / one,
                                seconds_per_step=flop / (one * 1e9), flops_per_image=flop, batch=1, steps=1)
    timing.headline(f"parallel ceiling: 2 single-thread processes {two / one:.2f}x one ({two:.0f} vs {one:.0f} GFLOP/s)")


# At batch 1 without prepack the 3x3 convs of the 8x8 and 4x4 levels are bound by reading their
# weights, which every rank reads in full whatever its rows; at batch 4 they are compute-bound
# and split. "steady": displaced steps alone (warm-up 0; the median step, so the exact first step
# and the first calls' set-up drop out), also with prepack on both sides (like for like), and
# with the levels of 8 rows and fewer on the whole image (whole_at=8; the "mode" entry carries it),
# and the 4-row level on the whole image with its convs shared out by output channels (share4).
# The ranks run on one machine, so their data goes through shared memory; "-gloo" sends it through
# the process group instead, as across machines.
STEP_CASES = {
    **{m: (m, 1, "", False) for m in MODES},
    "sync-gloo": ("sync,transport=process_group", 1, "", False),
    "displaced-batch4": ("displaced", 4, "", False),
    "displaced-steady": ("displaced", 1, "", True),
    "displaced-steady-prepack": ("displaced", 1, "prepack", True),
    "displaced-steady-prepack-whole8": ("displaced,whole_at=8", 1, "prepack", True),
    "displaced-steady-prepack-share4": ("displaced,whole_at=4,share_whole=true", 1, "prepack", True),
    "displaced-steady-prepack-gloo": ("displaced,transport=process_group", 1, "prepack", True),
    "displaced-steady-prepack-batch4": ("displaced", 4, "prepack", True),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_patch_parallel_step(benchmark, tmp_path, random_checkpoint, timing, case):
    mode, batch, plugins, steady = STEP_CASES[case]
    path, config, params = random_checkpoint
    args = ["sample", "--checkpoint", str(path), "--num-images", str(batch), "--batch-size", str(batch),
            "--no-progress", "--out", "out.npy"]
    bands = f"patch_parallel(mode={mode}{',warmup=0' if steady else ''})" + (f",{plugins}" if plugins else "")
    one, two, sent = [], [], {}

    def step_ms(ranks: int) -> float:
        cmd = [*args, *(["--plugins", bands] if ranks == 2 else ["--plugins", plugins] if plugins else [])]
        stdout = run([*cmd, "--steps", str(STEPS)], tmp_path, ranks)
        if ranks == 2 and not steady:
            sent.update(sent_per_step(stdout))
        return ms_per_step(stdout, median=steady)

    def pair() -> None:
        order = (1, 2) if len(one) % 2 == 0 else (2, 1)
        for ranks in order:
            (one if ranks == 1 else two).append(step_ms(ranks))

    benchmark.pedantic(pair, rounds=PAIRS, iterations=1)
    speedups = [a / b for a, b in zip(one, two)]
    benchmark.extra_info.update(
        plugins=f"{bands}, 2 ranks", baseline_plugins=plugins or "none", config=CONFIG, parameters=params,
        batch=batch, shape=[batch, config.in_channels, config.image_size, config.image_size], mode="sample",
        threads=1, sampler=f"DDIM {STEPS}" + (" (median step)" if steady else ""),
        steps=1, warmup_steps=0 if mode.startswith("sync") or steady else 5,
        seconds_per_step=statistics.median(two) / 1e3, one_process_seconds_per_step=statistics.median(one) / 1e3,
        speedup_vs_one_process=statistics.median(speedups), speedups=speedups,
        **({"bytes_sent_per_step_per_rank": sent, "bytes_total_per_step_per_rank": sum(sent.values())} if sent else {}),
    )
    timing.headline(f"patch_parallel {case:24s}: {statistics.median(speedups):.2f}x one process "
                    f"({statistics.median(two):.1f} vs {statistics.median(one):.1f} ms/step; pairs "
                    + ", ".join(f"{r:.2f}" for r in speedups) + ")")


def test_patch_parallel_bytes_4_ranks(benchmark, tmp_path, random_checkpoint):
    """Bytes each rank sends per displaced step at 4 ranks (warm-up 0: every step after the
    first is displaced; the count is per step over the run), pcpp against displaced."""
    path, config, params = random_checkpoint
    args = ["sample", "--checkpoint", str(path), "--num-images", "1", "--batch-size", "1", "--steps", "2",
            "--no-progress", "--out", "out.npy"]
    sent: dict[str, dict[str, int]] = {}
    step_ms: dict[str, float] = {}

    def both() -> None:
        for mode in ("sync", "displaced", "pcpp"):
            stdout = run([*args, "--plugins", f"patch_parallel(mode={mode},warmup=0)"], tmp_path, ranks=4)
            sent[mode], step_ms[mode] = sent_per_step(stdout), ms_per_step(stdout)

    benchmark.pedantic(both, rounds=1, iterations=1)
    # Step 0 is exact: the displaced step's own bytes are 2 x (mean over the 2 steps) - the exact step's.
    exact = {"displaced": sent["displaced"], "pcpp": sent["sync"]}  # exact steps of pcpp send as sync does
    per_step = {m: {k: 2 * sent[m][k] - exact[m][k] for k in sent[m]} for m in ("displaced", "pcpp")}
    totals = {m: sum(v.values()) for m, v in per_step.items()}
    benchmark.extra_info.update(
        plugins="patch_parallel, 4 ranks", config=CONFIG, parameters=params, batch=1,
        shape=[1, config.in_channels, config.image_size, config.image_size], mode="sample (bytes)", steps=1,
        seconds_per_step=step_ms["displaced"] / 1e3,  # 4 ranks on this machine's 2 cores: not a speed figure
        bytes_sent_per_displaced_step={m: per_step[m] for m in per_step}, bytes_sync_per_step=sent["sync"],
        pcpp_over_displaced_bytes=totals["pcpp"] / totals["displaced"],
    )


def test_patch_parallel_quality(benchmark, tmp_path, timing):
    """Displaced and pcpp on 2 ranks against one process, digits model, DDIM 50: deviation of the
    images and FD-digits."""
    from ddpm_perf.metrics.digits_classifier import fd_digits

    path = quality_checkpoint_path()
    if not path.is_file():
        pytest.skip(f"the digits model {path} does not exist")
    args = ["sample", "--checkpoint", str(path), "--num-images", str(QUALITY_IMAGES), "--batch-size",
            str(QUALITY_IMAGES), "--steps", str(QUALITY_STEPS), "--no-progress"]
    out: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}

    def all_modes() -> None:
        stdout = run([*args, "--out", "one.npy"], tmp_path)
        out["one"], seconds["one"] = np.load(tmp_path / "one.npy"), ms_per_step(stdout) / 1e3
        for mode, spec in QUALITY_MODES.items():
            stdout = run([*args, "--plugins", f"patch_parallel({spec})", "--out", f"{mode}.npy"], tmp_path, 2)
            out[mode], seconds[mode] = np.load(tmp_path / f"{mode}.npy"), ms_per_step(stdout) / 1e3

    benchmark.pedantic(all_modes, rounds=1, iterations=1)
    ref = torch.from_numpy(out["one"])
    fd = {k: float(fd_digits(torch.from_numpy(v))) for k, v in out.items()}
    info = benchmark.extra_info
    info.update(plugins="patch_parallel(displaced|pcpp), 2 ranks", config="digits (trained)", batch=QUALITY_IMAGES,
                shape=[QUALITY_IMAGES, 1, 16, 16], mode="sample", sampler=f"DDIM {QUALITY_STEPS}", steps=1,
                seconds_per_step=seconds["displaced"], one_process_seconds_per_step=seconds["one"],
                pcpp_seconds_per_step=seconds["pcpp"], fd_digits_one_process=fd["one"],
                fd_digits_displaced=fd["displaced"], fd_digits_pcpp=fd["pcpp"],
                fd_digits_displaced_whole_at_4=fd["displaced-whole4"], outputs_change=True)
    for mode in QUALITY_MODES:
        info.update({f"{mode}_{k}": v for k, v in timing.deviation(torch.from_numpy(out[mode]), ref, mode).items()})
    info.update(timing.deviation(torch.from_numpy(out["displaced"]), ref, "images (displaced, 2 ranks)"))
