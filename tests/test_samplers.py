"""The samplers against diffusers' schedulers, step by step, to float32 round-off.

No network is needed: eps is a fixed function of (x, t), so both implementations run the
same whole trajectory, each on its own x, and every step's x is compared. Where a step takes
noise, both sides get the same draws (DDPM: diffusers draws from a generator, we redraw from
an identically seeded one in the same order; DDIM: the same tensor as ``variance_noise``).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from ddpm_perf.diffusion.samplers import (  # noqa: E402
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    make_sampler,
)
from ddpm_perf.diffusion.schedule import Diffusion, ScheduleConfig  # noqa: E402
from ddpm_perf.errors import UserError  # noqa: E402

# diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array() on a tensor, which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPE = (2, 3, 4, 4)
# Both implementations do the same float32 operations in the same order, so they agree to
# the last bit in practice; this bound leaves room for round-off only.
TOL = dict(rtol=1e-6, atol=1e-6)
DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def fake_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for the network."""
    return torch.tanh(0.3 * x + t / 1000) + 0.1 * torch.sin(3.0 * x)


def initial_x(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def scheduler_kwargs(schedule: str) -> dict:
    cfg = ScheduleConfig()
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                beta_schedule=DIFFUSERS_BETA_SCHEDULE[schedule])


def check_tables(diffusion: Diffusion, scheduler) -> None:
    assert torch.equal(diffusion.betas, scheduler.betas)
    assert torch.equal(diffusion.alphas_cumprod, scheduler.alphas_cumprod)


def assert_step_close(ours: torch.Tensor, theirs: torch.Tensor, i: int, t: int) -> None:
    assert torch.isfinite(ours).all(), f"step {i} (t={t}): non-finite output"
    torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m: f"step {i} (t={t}): {m}")


# --------------------------------------------------------------------------------------- DDPM


def run_ddpm(schedule: str, variance_type: str, clip_sample: bool, steps: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    diffusion = Diffusion(ScheduleConfig(beta_schedule=schedule))
    ours = DDPMSampler(diffusion, steps, variance_type=variance_type, clip_sample=clip_sample)
    theirs = diffusers.DDPMScheduler(**scheduler_kwargs(schedule), variance_type=variance_type,
                                     clip_sample=clip_sample)
    theirs.set_timesteps(steps)
    check_tables(diffusion, theirs)
    assert ours.timesteps == theirs.timesteps.tolist()
    assert len(ours.timesteps) == steps

    seed = 1234
    g_ours, g_theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x_ours = x_theirs = initial_x()
    trajectory = []
    ours.reset()
    for i, t in enumerate(ours.timesteps):
        # diffusers draws noise exactly when t > 0; we must ask for it at the same steps.
        assert ours.needs_noise(i) == (t > 0)
        noise = randn_tensor(SHAPE, generator=g_ours, dtype=torch.float32) if ours.needs_noise(i) else None
        x_ours = ours.step(i, fake_eps(x_ours, t), x_ours, noise)
        x_theirs = theirs.step(fake_eps(x_theirs, t), t, x_theirs, generator=g_theirs).prev_sample
        trajectory.append((t, x_ours, x_theirs))
    return trajectory


@pytest.mark.parametrize("steps", [1000, 50, 7])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_matches_diffusers(schedule, variance_type, clip_sample, steps):
    for i, (t, x_ours, x_theirs) in enumerate(run_ddpm(schedule, variance_type, clip_sample, steps)):
        assert_step_close(x_ours, x_theirs, i, t)


# --------------------------------------------------------------------------------------- DDIM


def run_ddim(schedule: str, steps: int, eta: float, spacing: str, clip_sample: bool):
    diffusion = Diffusion(ScheduleConfig(beta_schedule=schedule))
    ours = DDIMSampler(diffusion, steps, eta=eta, spacing=spacing, clip_sample=clip_sample)
    theirs = diffusers.DDIMScheduler(**scheduler_kwargs(schedule), clip_sample=clip_sample, set_alpha_to_one=True,
                                     steps_offset=0, timestep_spacing=spacing)
    theirs.set_timesteps(steps)
    check_tables(diffusion, theirs)
    assert ours.timesteps == theirs.timesteps.tolist()

    g = torch.Generator().manual_seed(99)
    x_ours = x_theirs = initial_x()
    trajectory = []
    ours.reset()
    for i, t in enumerate(ours.timesteps):
        assert ours.needs_noise(i) == (eta > 0)
        noise = torch.randn(SHAPE, generator=g) if ours.needs_noise(i) else None
        x_ours = ours.step(i, fake_eps(x_ours, t), x_ours, noise)
        x_theirs = theirs.step(fake_eps(x_theirs, t), t, x_theirs, eta=eta, variance_noise=noise).prev_sample
        trajectory.append((t, x_ours, x_theirs))
    return trajectory


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps", [10, 50, 7])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_matches_diffusers(schedule, steps, eta, spacing, clip_sample):
    trajectory = run_ddim(schedule, steps, eta, spacing, clip_sample)
    for i, (t, x_ours, x_theirs) in enumerate(trajectory):
        assert_step_close(x_ours, x_theirs, i, t)


def test_ddim_timesteps_examples():
    """The documented N=50 lists (diffusers' DDIMScheduler.set_timesteps)."""
    diffusion = Diffusion(ScheduleConfig())
    assert DDIMSampler(diffusion, 50, spacing="leading").timesteps == list(range(980, -1, -20))
    assert DDIMSampler(diffusion, 50, spacing="trailing").timesteps == list(range(999, 18, -20))


# ------------------------------------------------------------------------------- DPM-Solver++


def run_dpmpp(schedule: str, steps: int, spacing: str, sampler: DPMSolverPPSampler | None = None):
    diffusion = Diffusion(ScheduleConfig(beta_schedule=schedule))
    ours = sampler or DPMSolverPPSampler(diffusion, steps, spacing=spacing)
    theirs = diffusers.DPMSolverMultistepScheduler(**scheduler_kwargs(schedule), algorithm_type="dpmsolver++",
                                                   solver_order=2, timestep_spacing=spacing)
    theirs.set_timesteps(steps)
    check_tables(diffusion, theirs)
    assert ours.timesteps == theirs.timesteps.tolist()
    assert len(ours.timesteps) == steps
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=0)

    x_ours = x_theirs = initial_x()
    trajectory = []
    ours.reset()
    for i, t in enumerate(ours.timesteps):
        assert not ours.needs_noise(i)
        x_ours = ours.step(i, fake_eps(x_ours, t), x_ours, None)
        x_theirs = theirs.step(fake_eps(x_theirs, t), t, x_theirs).prev_sample
        trajectory.append((t, x_ours, x_theirs))
    return trajectory


@pytest.mark.parametrize("steps", [5, 10, 20, 25])  # diffusers' lower_order_final differs below 15 steps
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_matches_diffusers(schedule, steps):
    for i, (t, x_ours, x_theirs) in enumerate(run_dpmpp(schedule, steps, "linspace")):
        assert_step_close(x_ours, x_theirs, i, t)


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_dpmpp_other_spacings_match_diffusers(spacing, steps):
    for i, (t, x_ours, x_theirs) in enumerate(run_dpmpp("linear", steps, spacing)):
        assert_step_close(x_ours, x_theirs, i, t)


def test_dpmpp_reset_forgets_previous_batch():
    """The engine reuses one sampler for every batch and calls reset() in between."""
    sampler = DPMSolverPPSampler(Diffusion(ScheduleConfig()), 10)
    first = run_dpmpp("linear", 10, "linspace", sampler)
    second = run_dpmpp("linear", 10, "linspace", sampler)
    for (_, a, _), (_, b, _) in zip(first, second):
        assert torch.equal(a, b)


def test_make_sampler_defaults():
    diffusion = Diffusion(ScheduleConfig())
    assert len(make_sampler("ddpm", diffusion, None).timesteps) == 1000
    assert make_sampler("ddim", diffusion, None).timesteps == list(range(980, -1, -20))
    dpmpp = make_sampler("dpmpp", diffusion, 20)
    assert isinstance(dpmpp, DPMSolverPPSampler) and dpmpp.timesteps[0] == 999


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name, kwargs, match", [
    ("ddpm", dict(num_steps=0), "positive"),
    ("ddim", dict(num_steps=0), "positive"),
    ("dpmpp", dict(num_steps=0), "positive"),
    ("ddim", dict(num_steps=-3), "positive"),
    ("ddpm", dict(num_steps=1001), "exceeds"),
    ("ddim", dict(num_steps=1001), "exceeds"),
    ("dpmpp", dict(num_steps=1001), "exceeds"),
    ("ddim", dict(num_steps=50, eta=-0.1), "eta"),
    ("euler", dict(num_steps=50), "unknown sampler"),
    ("ddim", dict(num_steps=50, spacing="quadratic"), "spacing"),
    ("dpmpp", dict(num_steps=20, spacing="quadratic"), "spacing"),
])
def test_make_sampler_rejects_bad_input(name, kwargs, match):
    with pytest.raises(UserError, match=match):
        make_sampler(name, Diffusion(ScheduleConfig()), **kwargs)
