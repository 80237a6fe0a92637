"""Sampling end to end with the quality figure: the embedded digits model, 256 images, DDIM 50
steps (eta 0), one engine batch, for the plugin combinations that change the numbers (smoke:
64 images, 5 steps).

Each combination's run is paired with an eager fp32 run of the same seed, after one warm-up
model call of each (one pair: a run is ~10-40 s at full size; ``speedup_vs_eager`` from one
pair is indicative, the forward benchmarks of test_plugins.py measure the speed). Recorded in ``extra_info``: ``fd_digits`` (FD-digits of
the images against the digits data set, ``ddpm_perf.metrics.digits_classifier.fd_digits``),
``fd_digits_fp32`` (the same for the fp32 images) and the deviation of the images from the
fp32 images (``rel_dev``, ``max_abs_dev``, ``mean_abs_dev`` in [-1, 1] units;
``changed_level_fraction``: the share of pixels whose 8-bit value differs).

Skipped, with the reason, where the embedded model (``default_checkpoint()``) or the FD-digits
metric is missing. DDPM_PERF_BENCH_QUALITY_CHECKPOINT=PATH uses another digits checkpoint
(e.g. ``runs/digits/checkpoint.safetensors`` of ``ddpm-perf train``);
DDPM_PERF_BENCH_QUALITY_IMAGES=N changes the number of images.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from ddpm_perf.diffusion.samplers import DDIMSampler
from ddpm_perf.diffusion.schedule import Diffusion
from ddpm_perf.engine import SamplingEngine
from ddpm_perf.model.checkpoint import load_checkpoint
from ddpm_perf.model.unet import StepPlan, count_parameters
from ddpm_perf.plugins import PluginHost

from conftest import quality_checkpoint_path

SPECS = ("", "amp", "amp(keep_float=none)", "channels_last,amp", "channels_last,amp(weights=true)", "fused_norm", "int8",
         "fused_norm,int8", "fused_norm,fused_attention,int8", "fused_norm,int8,amp(weights=true)")
IMAGES, STEPS = 256, 50
SMOKE_IMAGES, SMOKE_STEPS = 64, 5
SEED = 0


def spec_id(spec: str) -> str:
    return (spec.replace("(weights=true)", "_weights").replace("(keep_float=none)", "_no_keep")
            .replace(",", "-") or "eager")


@pytest.fixture(scope="module")
def quality(bench):
    """The digits checkpoint, the FD-digits function, and the run's size (or a skip saying why not)."""
    path = quality_checkpoint_path()
    if not path.is_file():
        pytest.skip(f"the digits model {path} does not exist (the embedded model is not built yet); "
                    "set DDPM_PERF_BENCH_QUALITY_CHECKPOINT to a digits checkpoint to run this")
    try:
        from ddpm_perf.metrics.digits_classifier import fd_digits
    except ImportError as e:
        pytest.skip(f"FD-digits is not available (ddpm_perf.metrics.digits_classifier.fd_digits): {e}")
    checkpoint = load_checkpoint(path)
    num = int(os.environ.get("DDPM_PERF_BENCH_QUALITY_IMAGES", SMOKE_IMAGES if bench.smoke else IMAGES))
    steps = SMOKE_STEPS if bench.smoke else STEPS
    return checkpoint, fd_digits, num, steps, {}


def make_engine(checkpoint, spec: str, num: int, steps: int) -> SamplingEngine:
    sampler = DDIMSampler(Diffusion(checkpoint.schedule_config), steps, eta=0.0)
    return SamplingEngine(checkpoint, sampler, PluginHost.from_spec(spec), batch_size=num)


@pytest.mark.parametrize("spec", [pytest.param(s, id=spec_id(s)) for s in SPECS])
def test_sampling_quality(benchmark, timing, quality, spec):
    checkpoint, fd_digits, num, steps, cache = quality
    if "eager" not in cache:
        cache["eager"] = make_engine(checkpoint, "", num, steps)
    eager = cache["eager"]
    engine = make_engine(checkpoint, spec, num, steps)
    for e in (engine, eager):  # first-call costs (oneDNN primitives, allocations) outside the timed pair
        with torch.inference_mode():
            x = torch.zeros((num, *e.image_shape))
            e.denoise(x, torch.full((num,), 500, dtype=torch.long), StepPlan())
    r = timing.interleaved(benchmark, lambda: engine.sample(num, seed=SEED), lambda: eager.sample(num, seed=SEED),
                           rounds=1, warmup_rounds=0)
    images, ref = r.target_result, r.baseline_result
    if "fd_fp32" not in cache:
        cache["fd_fp32"] = float(fd_digits(ref))
    fd = float(fd_digits(images)) if spec else cache["fd_fp32"]
    levels = lambda x: ((x + 1) * 127.5).round()  # noqa: E731  (the 8-bit values an image file gets)

    c = checkpoint.model_config
    shape = (c.in_channels, c.image_size, c.image_size)
    amp = next((p for p in engine.plugins.plugins if p.name == "amp"), None)
    info = benchmark.extra_info
    info.update(
        plugins=spec or "none", config="digits (trained)", checkpoint=str(checkpoint.path),
        parameters=count_parameters(eager.model), batch=num, shape=[num, *shape],
        dtype=amp.opts.dtype if amp else "float32", mode="sample", sampler=f"DDIM {steps} (eta 0)", steps=steps,
        seconds_per_step=statistics.median(r.target) / steps,
        eager_seconds_per_step=statistics.median(r.baseline) / steps,
        **timing.speedup(r.target, r.baseline), target_seconds=r.target, eager_seconds=r.baseline,
        flops_per_image=timing.flops_per_image(eager.model, shape, key=("quality", str(checkpoint.path))),
        outputs_change=bool(spec), **timing.deviation(images, ref, "images"),
        changed_level_fraction=(levels(images) != levels(ref)).float().mean().item(),
        fd_digits=fd, fd_digits_fp32=cache["fd_fp32"], fd_digits_images=num,
    )
    timing.headline(
        f"sampling {spec or 'eager fp32'!s:18} (digits model, {num} images, DDIM {steps}): FD-digits {fd:.3f} "
        f"(fp32 {cache['fd_fp32']:.3f}), images rel dev {info['rel_dev']:.1e}, max abs {info['max_abs_dev']:.2f}, "
        f"{info['changed_level_fraction']:.1%} of 8-bit pixels changed; speedup {info['speedup_vs_eager']:.2f}x "
        f"(one pair)")
    if not spec:
        torch.testing.assert_close(images, ref, rtol=0, atol=0)
