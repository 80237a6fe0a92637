"""deep_cache against a hand-written DeepCache loop over the U-Net's documented partial forward."""

import pytest
import torch

from ddpm_perf.diffusion.samplers import make_sampler
from ddpm_perf.diffusion.schedule import Diffusion
from ddpm_perf.engine import SamplingEngine, initial_noise
from ddpm_perf.errors import UserError
from ddpm_perf.model.checkpoint import load_checkpoint
from ddpm_perf.model.unet import StepPlan
from ddpm_perf.plugins import PluginHost

from ddpm_perf_plugins.deep_cache import full_steps


def engine(path, spec="", sampler="ddim", steps=7):
    ckpt = load_checkpoint(path)
    return SamplingEngine(ckpt, make_sampler(sampler, Diffusion(ckpt.schedule_config), steps),
                          PluginHost.from_spec(spec), "cpu", batch_size=4)


def test_interval_one_is_the_full_network(tiny_checkpoint):
    torch.testing.assert_close(engine(tiny_checkpoint, "deep_cache(interval=1)").sample(4),
                               engine(tiny_checkpoint).sample(4))


@pytest.mark.parametrize("branch", [1, 3, 6])
def test_matches_a_hand_written_deepcache_loop(tiny_checkpoint, branch):
    out = engine(tiny_checkpoint, f"deep_cache(interval=3,branch={branch})").sample(4, seed=2)
    model, diffusion = load_checkpoint(tiny_checkpoint).build()
    sampler = make_sampler("ddim", diffusion, 7)
    x, cache = initial_noise(4, (1, 16, 16), 2), None
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            plan = StepPlan(cache_branch=branch, cached=None if i % 3 == 0 else cache)
            eps = model(x, torch.full((4,), t), plan)
            cache = plan.captured if plan.captured is not None else cache
            x = sampler.step(i, eps, x)
    torch.testing.assert_close(out, x.clamp(-1, 1))
    assert not torch.allclose(out, engine(tiny_checkpoint).sample(4, seed=2))  # it does change the result


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp"])
def test_state_is_reset_between_calls_and_batches(tiny_checkpoint, sampler):
    eng = engine(tiny_checkpoint, "deep_cache(interval=2)", sampler=sampler, steps=6)
    first = eng.sample(6, seed=1)  # two batches (4 + 2)
    again = eng.sample(6, seed=1)
    torch.testing.assert_close(first, again)
    # the second batch did not start from the first batch's cache
    torch.testing.assert_close(first[4:], eng.sample(6, seed=1, indices=[4, 5]), rtol=1e-4, atol=1e-4)


def test_schedules():
    assert full_steps(10, 3, "uniform", 0.5, 1.4) == {0, 3, 6, 9}
    nonuniform = full_steps(50, 5, "nonuniform", 0.5, 1.4)
    assert 0 in nonuniform and len(nonuniform) <= 11 and max(nonuniform) < 50
    gaps = sorted(nonuniform)
    middle = [b - a for a, b in zip(gaps, gaps[1:]) if 15 <= a <= 35]
    edges = [b - a for a, b in zip(gaps, gaps[1:]) if a < 8 or a > 42]
    assert min(middle) <= min(edges)  # denser around the center


def test_bad_options(tiny_checkpoint):
    with pytest.raises(UserError, match="branch=40 must be in 0..8"):
        engine(tiny_checkpoint, "deep_cache(branch=40)")
    with pytest.raises(UserError, match="interval=0"):
        engine(tiny_checkpoint, "deep_cache(interval=0)")
