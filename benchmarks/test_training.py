"""One training step (forward + backward + AdamW, as ``Trainer.train_step`` runs it: batch
draw, loss, backward, gradient clipping, AdamW, EMA) per plugin combination: cifar10 config,
batch 16 (smoke: the digits config, batch 8).

Each combination is a real ``Trainer`` with ``PluginHost.from_spec(spec)`` on a folder of
random images; its steps are interleaved round by round with the steps of a trainer without
plugins (eager fp32), 5 pairs after one warm-up pair (DDPM_PERF_BENCH_TRAIN_ROUNDS=N for
more). Recorded in ``extra_info``:

* ``speedup_vs_eager`` (median of the pair ratios, with quartiles);
* GFLOP/s of the useful work: the FLOPs of an eager forward + backward counted by
  FlopCounterMode (``flops_per_image``; checkpointing's recomputed forward is not counted);
* the deviation from fp32 of the loss and of the whole gradient on one fixed batch, from the
  same initial weights, dropout off (``rel_dev`` etc. of the gradient, ``loss_rel_dev``);
* peak memory of a steady-state step (after a warm-up step has allocated the AdamW state),
  measured two ways, each against the eager trainer measured the same way:

  - ``peak_tensor_bytes``: the peak of live tensor bytes during the step, from torch's
    ``MemTracker`` (``torch.distributed._tools.mem_tracker``; it follows every tensor a
    dispatched op creates and every storage freed), split into parameters, gradients,
    activations, optimizer state and temporaries; all specs;
  - ``rss_peak_bytes``: what the OS saw, for "" and "checkpoint": the step runs in a fresh
    process (``python benchmarks/test_training.py peak-rss ...``) that takes 2 warm-up steps,
    returns the heap's free memory to the OS (glibc ``malloc_trim(0)``: else the RSS before
    the step still holds the last step's freed activations), resets the kernel's high-water
    mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and reads ``VmHWM`` after one
    more step; ``rss_step_bytes`` is that peak minus the RSS just before the step (what the
    step adds to weights, optimizer state, EMA and the runtime). ``ru_maxrss`` alone cannot
    do this (it counts the process from its start), nor ``tracemalloc`` (it does not see
    torch's allocations).

  ``peak_memory_reduction`` = 1 - peak(spec) / peak(eager), tensor level (the
  ``rss_``-prefixed ones: OS level).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_perf.diffusion.schedule import ScheduleConfig
from ddpm_perf.plugins import PluginHost
from ddpm_perf.train import DataSpec, TrainConfig, Trainer

SPECS = ("", "amp", "channels_last,amp", "checkpoint", "fused_norm", "fused_norm,amp", "fused_norm,fused_attention,amp",
         "amp,compile", "fused_norm,fused_attention,amp,compile",
         "channels_last,fused_norm,fused_attention,amp", "channels_last,fused_norm,fused_attention,fused_dropout,amp",
         "channels_last,fused_norm,fused_dropout,amp,compile")
RSS_SPECS = ("", "checkpoint")  # the OS-level peak, in a fresh process: the specs that are about memory
BATCH, SMOKE_BATCH = 16, 8
# Timed pairs of steps: a cifar10 step at batch 16 takes ~4 s on the 2-core machines, so 5 pairs by
# default (smoke: timing.rounds); DDPM_PERF_BENCH_TRAIN_ROUNDS=N overrides both.
TRAIN_ROUNDS = int(os.environ.get("DDPM_PERF_BENCH_TRAIN_ROUNDS", "0")) or None
FULL_TRAIN_ROUNDS = 5


def spec_id(spec: str) -> str:
    return spec.replace(",", "-") or "eager"


def compute_dtype(host: PluginHost) -> str:
    amp = next((p for p in host.plugins if p.name == "amp"), None)
    return amp.opts.dtype if amp is not None else "float32"


def write_images(folder: Path, size: int, channels: int, count: int = 64) -> Path:
    """``count`` random PNG images: the trainer's data (speed does not depend on the pixels)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(folder / f"{i:03d}.png")
    return folder


def make_trainer(config_name: str, batch: int, data: Path, out: Path, spec: str) -> Trainer:
    from ddpm_perf.model.config import CONFIGS

    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(steps=10**9, batch_size=batch, warmup=0, checkpoint_every=10**9, seed=0)
    return Trainer(CONFIGS[config_name], ScheduleConfig(), DataSpec("folder", str(data)), cfg, out / "run",
                   plugins=PluginHost.from_spec(spec))


def fixed_batch(trainer: Trainer, batch: int):
    g = torch.Generator().manual_seed(1)
    x0 = torch.stack([trainer.dataset[i] for i in range(batch)])
    t = torch.randint(trainer.diffusion.num_timesteps, (batch,), generator=g)
    return x0, t, torch.randn(x0.shape, generator=g)


def loss_and_grad(trainer: Trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and flattened gradient of a fresh trainer (initial weights) on ``batch``, dropout off,
    through the trainer's own (plugin-wrapped) loss."""
    trainer.net.eval()
    try:
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss_fn(*batch)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in trainer.net.parameters()])
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad
    finally:
        trainer.net.train()


def train_flops_per_image(trainer: Trainer) -> int:
    """FLOPs of one eager forward + backward per image (FlopCounterMode, batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    x0, t, noise = fixed_batch(trainer, 1)
    with FlopCounterMode(display=False) as counter:
        trainer.diffusion.loss(trainer.net, x0, t, noise).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tensor_memory(trainer: Trainer) -> dict:
    """Peak live tensor bytes of one training step, by category (MemTracker), or why not."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except Exception as e:  # a private module: may be absent in a torch build
        return {"peak_tensor_bytes": None, "peak_tensor_error": f"{type(e).__name__}: {e}"}
    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    with tracker:
        trainer.train_step()
    peaks = tracker.get_tracker_snapshot("peak")
    cpu = peaks.get(torch.device("cpu"), {})
    return {"peak_tensor_bytes": cpu.get("Total"),
            "peak_tensor_bytes_by_kind": {str(getattr(k, "value", k)): v for k, v in cpu.items() if k != "Total"}}


def peak_rss(config_name: str, batch: int, data: Path, spec: str, threads: int) -> dict:
    """The OS-level peak of a steady-state step, in a fresh process (see the module docstring)."""
    cmd = [sys.executable, __file__, "peak-rss", "--config", config_name, "--batch", str(batch), "--data",
           str(data), "--spec", spec, "--threads", str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    if result.returncode:
        raise RuntimeError(f"peak-rss subprocess failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the benchmark ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_setup(bench, tmp_path_factory):
    c = bench.model_config
    data = write_images(tmp_path_factory.mktemp("train_images"), c.image_size, c.in_channels)
    return bench.config_name, SMOKE_BATCH if bench.smoke else BATCH, data, tmp_path_factory.mktemp("train_runs")


@pytest.fixture(scope="module")
def eager_trainer(train_setup):
    """The baseline trainer (no plugins), with what its specs are measured against: the fp32
    loss and gradient of the fixed batch (before any step), the FLOP count, the memory peaks."""
    config_name, batch, data, out = train_setup
    trainer = make_trainer(config_name, batch, data, out / "eager", "")
    ref_batch = fixed_batch(trainer, batch)
    ref = loss_and_grad(trainer, ref_batch)
    flops = train_flops_per_image(trainer)
    trainer.train_step()  # allocates the AdamW state: the memory peaks below are of a steady-state step
    memory = peak_tensor_memory(trainer)
    return trainer, ref_batch, ref, flops, memory, {}


@pytest.mark.parametrize("spec", [pytest.param(s, id=spec_id(s), marks=[pytest.mark.compile] if "compile" in s else [])
                                  for s in SPECS])
def test_train_step(benchmark, bench, timing, train_setup, eager_trainer, spec):
    config_name, batch, data, out = train_setup
    eager, ref_batch, (ref_loss, ref_grad), flops, eager_memory, rss_cache = eager_trainer
    trainer = make_trainer(config_name, batch, data, out / spec_id(spec), spec)
    loss, grad = loss_and_grad(trainer, ref_batch)
    grad_dev = timing.deviation(grad, ref_grad, "gradient (fixed batch, dropout off)")

    rounds = TRAIN_ROUNDS or (timing.rounds if bench.smoke else FULL_TRAIN_ROUNDS)
    r = timing.interleaved(benchmark, trainer.train_step, eager.train_step, rounds=rounds)
    memory = peak_tensor_memory(trainer)

    info = benchmark.extra_info
    info.update(
        plugins=spec or "none", config=config_name, batch=batch, shape=[batch, *bench.image_shape],
        dtype=compute_dtype(trainer.plugins), mode="train", steps=1, parameters=sum(
            p.numel() for p in trainer.net.parameters()),
        seconds_per_step=statistics.median(r.target), eager_seconds_per_step=statistics.median(r.baseline),
        **timing.speedup(r.target, r.baseline), target_seconds=r.target, eager_seconds=r.baseline,
        flops_per_image=flops, flops_counted="eager forward + backward (FlopCounterMode); no recomputation",
        outputs_change=bool(spec), **grad_dev,
        loss=loss.item(), loss_fp32=ref_loss.item(),
        loss_rel_dev=abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
        **memory, eager_peak_tensor_bytes=eager_memory["peak_tensor_bytes"],
        plugin_report=list(trainer.ctx.report),
    )
    if memory["peak_tensor_bytes"] and eager_memory["peak_tensor_bytes"]:
        info["peak_memory_reduction"] = 1 - memory["peak_tensor_bytes"] / eager_memory["peak_tensor_bytes"]
    if spec in RSS_SPECS:
        threads = torch.get_num_threads()
        if "" not in rss_cache:
            rss_cache[""] = peak_rss(config_name, batch, data, "", threads)
        rss = rss_cache[""] if spec == "" else peak_rss(config_name, batch, data, spec, threads)
        info.update({f"rss_{k}": v for k, v in rss.items()}, eager_rss_peak_bytes=rss_cache[""]["peak_bytes"],
                    eager_rss_step_bytes=rss_cache[""]["step_bytes"])
        info["rss_peak_memory_reduction"] = 1 - rss["peak_bytes"] / rss_cache[""]["peak_bytes"]
        info["rss_step_memory_reduction"] = 1 - rss["step_bytes"] / max(rss_cache[""]["step_bytes"], 1)

    mib = 2**20
    memory_text = ""
    if info.get("peak_tensor_bytes"):
        memory_text = (f", peak tensor memory {info['peak_tensor_bytes'] / mib:.0f} MiB "
                       f"(eager {info['eager_peak_tensor_bytes'] / mib:.0f}, "
                       f"-{info['peak_memory_reduction']:.0%})")
    if "rss_peak_bytes" in info:
        memory_text += (f", peak RSS {info['rss_peak_bytes'] / mib:.0f} MiB (eager "
                        f"{info['eager_rss_peak_bytes'] / mib:.0f}), step RSS {info['rss_step_bytes'] / mib:.0f} MiB "
                        f"(eager {info['eager_rss_step_bytes'] / mib:.0f})")
    timing.headline(
        f"train step {spec or 'eager fp32'!s:20} ({config_name}, batch {batch}): speedup "
        f"{info['speedup_vs_eager']:.3f}x (quartiles {info['speedup_vs_eager_iqr'][0]:.3f} .. "
        f"{info['speedup_vs_eager_iqr'][1]:.3f}, {info['pairs']} pairs), {info['seconds_per_step']:.2f} s/step, "
        f"grad rel dev {info['rel_dev']:.1e}, loss rel dev {info['loss_rel_dev']:.1e}{memory_text}")
    if not spec:
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


# -- the fresh process of the OS-level peak ---------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_rss_main(argv: list[str]) -> None:
    import argparse
    import ctypes
    import resource

    parser = argparse.ArgumentParser(prog="test_training.py peak-rss")
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--spec", default="")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(args.config, args.batch, Path(args.data), Path(out), args.spec)
        for _ in range(2):  # the first allocates the AdamW state; the second runs as all later ones
            trainer.train_step()
        try:  # return the heap's free memory to the OS: "before" is then what is live, not what was
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # held since the last step's peak (glibc keeps it)
            trimmed = True
        except (OSError, AttributeError):  # not glibc
            trimmed = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (and ru_maxrss) to the current RSS
            method = "VmHWM of one step after resetting the high-water mark (/proc/self/clear_refs 5)"
        except OSError as e:
            method = f"ru_maxrss of the whole process (could not reset the high-water mark: {e})"
        before = _status_kib("VmRSS") * 1024
        trainer.train_step()
        peak = _status_kib("VmHWM") * 1024 if method.startswith("VmHWM") else (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"peak_bytes": peak, "before_bytes": before, "step_bytes": peak - before, "method": method,
                      "malloc_trim": trimmed}))


if __name__ == "__main__":
    if sys.argv[1:2] != ["peak-rss"]:
        sys.exit("usage: python benchmarks/test_training.py peak-rss --config NAME --batch N --data DIR [--spec S]")
    _peak_rss_main(sys.argv[2:])
