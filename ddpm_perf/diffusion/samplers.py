"""Samplers: DDPM ancestral, DDIM and DPM-Solver++(2M).

Each sampler is a small state machine the engine drives: ``timesteps`` lists the model
evaluations, ``step(i, eps, x, noise)`` turns the model's eps at step i into the next x, and
``needs_noise(i)`` says whether step i takes fresh Gaussian noise. The formulas and the
float32 arithmetic follow diffusers' DDPMScheduler, DDIMScheduler and
DPMSolverMultistepScheduler so that the two agree to round-off (tests/test_samplers.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .schedule import VARIANCE_TYPES, Diffusion

SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(num_train: int, num_steps: int, spacing: str) -> list[int]:
    """Descending timesteps, as diffusers' DDPM/DDIM schedulers space them."""
    if spacing == "leading":
        ratio = num_train // num_steps
        steps = (np.arange(num_steps) * ratio).round()[::-1]
    elif spacing == "trailing":
        steps = np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1
    elif spacing == "linspace":
        steps = np.linspace(0, num_train - 1, num_steps).round()[::-1]
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return [int(s) for s in steps]


class Sampler(ABC):
    name: str

    def __init__(self, diffusion: Diffusion, num_steps: int):
        if num_steps <= 0:
            raise UserError(f"--steps must be positive, got {num_steps}")
        if num_steps > diffusion.num_timesteps:
            raise UserError(f"--steps {num_steps} exceeds the model's {diffusion.num_timesteps} training timesteps")
        self.diffusion = diffusion
        self.num_steps = num_steps
        self.timesteps: list[int] = []

    def reset(self) -> None:
        """Forget state carried between steps (multistep solvers); called before each batch."""

    def needs_noise(self, i: int) -> bool:
        return False

    @abstractmethod
    def step(self, i: int, eps: Tensor, x: Tensor, noise: Tensor | None = None) -> Tensor:
        ...

    def _predict_x0(self, eps: Tensor, x: Tensor, ab: Tensor, clip: bool) -> Tensor:
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5
        return x0.clamp(-1.0, 1.0) if clip else x0


class DDPMSampler(Sampler):
    """Ancestral sampling of Ho et al. (diffusers' DDPMScheduler, 'leading' spacing)."""

    name = "ddpm"

    def __init__(self, diffusion: Diffusion, num_steps: int | None = None, variance_type: str | None = None,
                 clip_sample: bool | None = None):
        cfg = diffusion.config
        super().__init__(diffusion, diffusion.num_timesteps if num_steps is None else num_steps)
        self.variance_type = variance_type or cfg.variance_type
        if self.variance_type not in VARIANCE_TYPES:
            raise UserError(f"variance_type {self.variance_type!r} is not one of {', '.join(VARIANCE_TYPES)}")
        self.clip_sample = cfg.clip_sample if clip_sample is None else clip_sample
        self.timesteps = spaced_timesteps(diffusion.num_timesteps, self.num_steps, "leading")
        self.stride = diffusion.num_timesteps // self.num_steps

    def needs_noise(self, i: int) -> bool:
        return self.timesteps[i] > 0

    def step(self, i: int, eps: Tensor, x: Tensor, noise: Tensor | None = None) -> Tensor:
        t = self.timesteps[i]
        ab_t, ab_prev = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t - self.stride)
        alpha_t = ab_t / ab_prev
        beta_t = 1 - alpha_t
        x0 = self._predict_x0(eps, x, ab_t, self.clip_sample)
        mean = (ab_prev ** 0.5 * beta_t) / (1 - ab_t) * x0 + alpha_t ** 0.5 * (1 - ab_prev) / (1 - ab_t) * x
        if t == 0:
            return mean
        if self.variance_type == "fixed_small":
            variance = torch.clamp((1 - ab_prev) / (1 - ab_t) * beta_t, min=1e-20)
        else:
            variance = beta_t
        return mean + variance ** 0.5 * noise


class DDIMSampler(Sampler):
    """Song et al.'s DDIM (diffusers' DDIMScheduler with set_alpha_to_one=True, steps_offset=0)."""

    name = "ddim"

    def __init__(self, diffusion: Diffusion, num_steps: int, eta: float = 0.0, spacing: str = "leading",
                 clip_sample: bool | None = None):
        super().__init__(diffusion, num_steps)
        if eta < 0:
            raise UserError(f"--eta must be >= 0, got {eta}")
        self.eta = eta
        self.clip_sample = diffusion.config.clip_sample if clip_sample is None else clip_sample
        self.timesteps = spaced_timesteps(diffusion.num_timesteps, num_steps, spacing)
        self.stride = diffusion.num_timesteps // num_steps

    def needs_noise(self, i: int) -> bool:
        return self.eta > 0

    def step(self, i: int, eps: Tensor, x: Tensor, noise: Tensor | None = None) -> Tensor:
        t = self.timesteps[i]
        ab_t, ab_prev = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t - self.stride)
        x0 = self._predict_x0(eps, x, ab_t, self.clip_sample)
        variance = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        std = self.eta * variance ** 0.5
        x_prev = ab_prev ** 0.5 * x0 + (1 - ab_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * noise
        return x_prev


class DPMSolverPPSampler(Sampler):
    """DPM-Solver++(2M), midpoint form (diffusers' DPMSolverMultistepScheduler defaults:
    linspace spacing, final sigma 0, first-order final step)."""

    name = "dpmpp"

    def __init__(self, diffusion: Diffusion, num_steps: int, spacing: str = "linspace"):
        super().__init__(diffusion, num_steps)
        T = diffusion.num_timesteps
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            # Like linspace, diffusers spaces num_steps + 1 points and drops the last (t = 0).
            timesteps = (np.arange(num_steps + 1) * (T // (num_steps + 1))).round()[::-1][:-1].astype(np.int64)
        else:
            timesteps = np.array(spaced_timesteps(T, num_steps, spacing), dtype=np.int64)
        self.timesteps = [int(t) for t in timesteps]
        if len(set(self.timesteps)) < num_steps:
            raise UserError(f"dpmpp with {num_steps} steps and {spacing} spacing repeats timesteps; "
                            f"use at most {T // 2} steps")
        ab = diffusion.alphas_cumprod
        sigmas = (((1 - ab) / ab) ** 0.5).numpy()
        sigmas = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._prev_x0: Tensor | None = None

    def reset(self) -> None:
        self._prev_x0 = None

    def _alpha_sigma_lambda(self, j: int) -> tuple[Tensor, Tensor, Tensor]:
        s = self.sigmas[j]
        alpha = 1 / ((s ** 2 + 1) ** 0.5)
        sigma = s * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def step(self, i: int, eps: Tensor, x: Tensor, noise: Tensor | None = None) -> Tensor:
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(i)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        x0 = (x - sigma_s * eps) / alpha_s
        h = lambda_t - lambda_s
        first_order = self._prev_x0 is None or i == len(self.timesteps) - 1
        base = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        if not first_order:
            _, _, lambda_prev = self._alpha_sigma_lambda(i - 1)
            r = (lambda_s - lambda_prev) / h
            d1 = (1.0 / r) * (x0 - self._prev_x0)
            base = base - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        self._prev_x0 = x0
        return base


SAMPLERS = {cls.name: cls for cls in (DDPMSampler, DDIMSampler, DPMSolverPPSampler)}


def make_sampler(name: str, diffusion: Diffusion, num_steps: int | None, eta: float = 0.0,
                 spacing: str | None = None, clip_sample: bool | None = None,
                 variance_type: str | None = None) -> Sampler:
    """A sampler by CLI name; None means the default (clipping and variance: the checkpoint's)."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if eta and name != "ddim":
        raise UserError(f"--eta applies to the ddim sampler only, not {name}")
    if variance_type is not None and name != "ddpm":
        raise UserError(f"--variance applies to the ddpm sampler only, not {name}")
    if clip_sample is not None and name == "dpmpp":
        raise UserError("--clip-sample applies to the ddpm and ddim samplers only")
    if name == "ddpm":
        if spacing not in (None, "leading"):
            raise UserError("the ddpm sampler uses leading spacing only; drop --spacing")
        return DDPMSampler(diffusion, num_steps, variance_type=variance_type, clip_sample=clip_sample)
    if num_steps is None:
        num_steps = 50
    if name == "ddim":
        return DDIMSampler(diffusion, num_steps, eta=eta, spacing=spacing or "leading", clip_sample=clip_sample)
    return DPMSolverPPSampler(diffusion, num_steps, spacing=spacing or "linspace")
