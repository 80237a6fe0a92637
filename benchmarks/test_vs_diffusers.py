"""Target: side by side with diffusers' DDIMPipeline on the same cifar10-config weights, batch 8,
DDIM steps, CPU fp32 eager, no plugins: ddpm-perf is no slower per step.

A random diffusers UNet2DModel with the google/ddpm-cifar10-32 config (and that model's DDPM
scheduler) is saved as a DDPMPipeline folder and imported with ``load_diffusers``: both sides
hold the same weights. Both draw the same initial noise (``torch.randn((8, 3, 32, 32),
generator=torch.Generator().manual_seed(seed))``); with eta = 0 there is no other noise, so the
images must agree to round-off. The runs alternate round by round; the per-step ratio
ddpm-perf / diffusers is reported in ``extra_info["ratio_vs_diffusers"]``, only a loose sanity
bound is asserted.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from ddpm_perf.diffusion.samplers import DDIMSampler
from ddpm_perf.diffusion.schedule import Diffusion
from ddpm_perf.engine import SamplingEngine
from ddpm_perf.model.diffusers_import import load_diffusers, unet_config_to_diffusers

diffusers = pytest.importorskip("diffusers")

SANITY_BOUND = 1.15  # asserted (full size only); the target, <= 1.0, is reported
IMAGE_TOLERANCE = 1e-3  # max abs deviation of the final images, in [0, 1] units (1/255 = 3.9e-3)

# google/ddpm-cifar10-32's scheduler.
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                 variance_type="fixed_large", clip_sample=True)


@pytest.fixture(scope="module")
def side_by_side(bench, tmp_path_factory):
    torch.manual_seed(bench.seed)
    unet = diffusers.UNet2DModel(**unet_config_to_diffusers(bench.model_config)).eval()
    with torch.no_grad():  # default GroupNorm init is weight 1, bias 0: make mix-ups visible
        for module in unet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    scheduler = diffusers.DDPMScheduler(**SCHEDULER)
    folder = tmp_path_factory.mktemp("ddpm_pipeline")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)

    checkpoint = load_diffusers(folder)
    assert checkpoint.model_config.image_size == unet.config.sample_size
    engine = SamplingEngine(checkpoint, DDIMSampler(Diffusion(checkpoint.schedule_config), bench.steps, eta=0.0),
                            batch_size=bench.batch)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return unet, engine, pipe


def model_forward_ratio(ours, theirs, bench, pairs: int) -> float:
    """Median over alternating pairs of (our U-Net forward) / (diffusers' UNet2DModel forward), same
    input: separates the networks' speed from the sampling loops'."""
    x = torch.randn((bench.batch, *bench.image_shape), generator=torch.Generator().manual_seed(1))
    t = torch.full((bench.batch,), 500, dtype=torch.long)
    fns = [lambda: ours(x, t), lambda: theirs(x, t).sample]
    seconds: list[list[float]] = [[], []]
    with torch.inference_mode():
        for i in range(pairs):
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                fns[j]()
                seconds[j].append(time.perf_counter() - start)
    return statistics.median(a / b for a, b in zip(*seconds))


def test_ddim_vs_diffusers_pipeline(benchmark, bench, timing, side_by_side):
    unet, engine, pipe = side_by_side

    def ours():
        return engine.sample(bench.batch, seed=bench.seed)

    def theirs():
        generator = torch.Generator().manual_seed(bench.seed)
        return pipe(batch_size=bench.batch, generator=generator, eta=0.0, num_inference_steps=bench.steps,
                    output_type="pt").images

    r = timing.interleaved(benchmark, ours, theirs)
    model_ratio = model_forward_ratio(engine.model, unet, bench, pairs=2 if bench.smoke else 12)

    # Same images: ours are in [-1, 1], the pipeline's (x / 2 + 0.5).clamp(0, 1).
    ours_01 = (r.target_result / 2 + 0.5).clamp(0, 1)
    theirs_01 = r.baseline_result
    assert ours_01.shape == theirs_01.shape
    deviation = (ours_01 - theirs_01).abs()
    interior = (theirs_01 > 0) & (theirs_01 < 1)  # pixels the final clamp did not flatten

    ratio = timing.ratios(r.target, r.baseline)
    info = benchmark.extra_info
    info.update(
        seconds_per_step=statistics.median(r.target) / bench.steps,
        diffusers_seconds_per_step=statistics.median(r.baseline) / bench.steps,
        ratio_vs_diffusers=ratio["median"],
        ratio_vs_diffusers_min=ratio["min"],
        ratio_vs_diffusers_paired=ratio["paired"],
        ratio_vs_diffusers_paired_iqr=[ratio["paired_q1"], ratio["paired_q3"]],
        pairs=len(r.target),
        model_ratio_vs_diffusers_paired=model_ratio,
        ddpm_perf_seconds=r.target, diffusers_seconds=r.baseline,
        image_max_abs_dev=deviation.max().item(),
        image_mean_abs_dev=deviation.mean().item(),
        image_max_abs_dev_interior=deviation[interior].max().item() if interior.any() else 0.0,
        image_interior_fraction=interior.float().mean().item(),
        flops_per_image=timing.flops_per_image(engine.model, bench.image_shape, key=("ddpm_perf", id(engine.model))),
        flops_per_image_diffusers=timing.flops_per_image(unet, bench.image_shape, key=("diffusers", id(unet))),
        diffusers_version=diffusers.__version__,
    )
    info["diffusers_gflop_per_s"] = info["flops_per_image"] * bench.batch / info["diffusers_seconds_per_step"] / 1e9
    timing.headline(
        f"ddpm-perf / diffusers DDIMPipeline ({bench.config_name}, batch {bench.batch}, DDIM {bench.steps}): "
        f"{info['ratio_vs_diffusers']:.3f} (medians), {info['ratio_vs_diffusers_min']:.3f} (mins), "
        f"{info['ratio_vs_diffusers_paired']:.3f} (paired; quartiles {ratio['paired_q1']:.3f} .. {ratio['paired_q3']:.3f}) "
        f"over {len(r.target)} pairs "
        f"(bare U-Net forwards alone: {model_ratio:.3f} paired); "
        f"{info['seconds_per_step']:.3f} vs {info['diffusers_seconds_per_step']:.3f} s/step; images: max abs dev "
        f"{info['image_max_abs_dev']:.2e} ({info['image_interior_fraction']:.0%} of pixels unclamped)")
    assert info["image_max_abs_dev"] <= IMAGE_TOLERANCE
    # FlopCounterMode (torch 2.13) counts our attention (3-D SDPA, decomposed to bmm) but not
    # diffusers' (4-D SDPA, the CPU flash kernel, which has no FLOP formula): the counts differ
    # by the attention matmuls alone (2.7% of the cifar10 step); the networks are the same.
    assert 0 <= info["flops_per_image"] - info["flops_per_image_diffusers"] < 0.05 * info["flops_per_image"]
    if not bench.smoke:
        assert info["ratio_vs_diffusers_paired"] < SANITY_BOUND
