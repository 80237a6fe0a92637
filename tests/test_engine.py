import pytest
import torch

from ddpm_perf.diffusion.samplers import make_sampler
from ddpm_perf.diffusion.schedule import Diffusion
from ddpm_perf.engine import SamplingEngine, initial_noise
from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.model.checkpoint import load_checkpoint
from ddpm_perf.plugins import Phase, Plugin, PluginHost


def engine_for(path, sampler="ddim", steps=4, batch_size=3, plugins=(), eta=0.0):
    ckpt = load_checkpoint(path)
    return SamplingEngine(ckpt, make_sampler(sampler, Diffusion(ckpt.schedule_config), steps, eta),
                          PluginHost(plugins), "cpu", batch_size)


def test_initial_noise_follows_the_diffusers_convention():
    expected = torch.randn((5, 1, 16, 16), generator=torch.Generator().manual_seed(7))
    assert torch.equal(initial_noise(5, (1, 16, 16), 7), expected)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp", 0.0)])
def test_same_images_whatever_the_batch_size(tiny_checkpoint, sampler, eta):
    steps = 4
    a = engine_for(tiny_checkpoint, sampler, steps, batch_size=5, eta=eta).sample(5, seed=3)
    b = engine_for(tiny_checkpoint, sampler, steps, batch_size=2, eta=eta).sample(5, seed=3)
    # Batched kernels may round differently: far below one uint8 level (2/255).
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and a subset of indices (data-parallel sampling) gives the same images
    c = engine_for(tiny_checkpoint, sampler, steps, batch_size=2, eta=eta).sample(5, seed=3, indices=[1, 4])
    torch.testing.assert_close(c, a[[1, 4]], rtol=1e-4, atol=1e-4)
    d = engine_for(tiny_checkpoint, sampler, steps, batch_size=5, eta=eta).sample(5, seed=4)
    assert not torch.allclose(a, d)


def test_engine_equals_a_hand_written_loop(tiny_checkpoint):
    engine = engine_for(tiny_checkpoint, "ddim", 5, batch_size=4)
    images = engine.sample(4, seed=1)
    model, diffusion = load_checkpoint(tiny_checkpoint).build()
    sampler = make_sampler("ddim", diffusion, 5)
    x = initial_noise(4, (1, 16, 16), 1)
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            x = sampler.step(i, model(x, torch.full((4,), t)), x)
    torch.testing.assert_close(images, x.clamp(-1, 1))
    assert engine.stats.images == 4 and engine.stats.steps == 5


def test_stats_time_every_step(tiny_checkpoint):
    engine = engine_for(tiny_checkpoint, "ddim", 3, batch_size=2)
    engine.sample(4, seed=0)
    stats = engine.stats
    assert len(stats.step_seconds) == stats.steps == 6  # 2 batches x 3 steps
    assert 0 < min(stats.step_seconds) <= stats.median_step_seconds <= max(stats.step_seconds)
    assert sum(stats.step_seconds) <= stats.seconds


class PoisonAtStep(Plugin):
    name, description, phase = "poison", "returns NaN from step 2", Phase.RUNTIME

    @hookimpl
    def wrap_denoiser(self, fn, ctx):
        calls = {"n": 0}

        def denoise(x, t, plan):
            calls["n"] += 1
            eps = fn(x, t, plan)
            return eps * float("nan") if calls["n"] == 2 else eps

        return denoise


def test_nan_stops_sampling_and_names_the_step(tiny_checkpoint):
    engine = engine_for(tiny_checkpoint, "ddim", 4, plugins=[PoisonAtStep()])
    with pytest.raises(UserError, match=r"NaN or Inf at step 2/4"):
        engine.sample(2)


def test_bad_counts_are_user_errors(tiny_checkpoint):
    with pytest.raises(UserError, match="--batch-size"):
        engine_for(tiny_checkpoint, batch_size=0)
    with pytest.raises(UserError, match="--num"):
        engine_for(tiny_checkpoint).sample(0)
