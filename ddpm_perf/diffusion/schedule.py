"""Noise schedules, the forward process q(x_t | x_0) and the eps-prediction loss.

Tables are computed the way diffusers computes them (float32 linspace and cumprod for the
linear schedule, float64 for the cosine one) so that samplers match diffusers to round-off.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError, dataclass_from_dict

BETA_SCHEDULES = ("linear", "cosine")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


@dataclass(frozen=True)
class ScheduleConfig:
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    variance_type: str = "fixed_large"  # what DDPM ancestral sampling uses by default
    clip_sample: bool = True

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"schedule: beta_schedule {self.beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
        if self.variance_type not in VARIANCE_TYPES:
            raise UserError(f"schedule: variance_type {self.variance_type!r} is not one of {', '.join(VARIANCE_TYPES)}")
        if self.num_train_timesteps < 2:
            raise UserError("schedule: num_train_timesteps must be at least 2")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleConfig":
        return dataclass_from_dict(cls, d, "schedule config")


def make_betas(cfg: ScheduleConfig) -> Tensor:
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)

    # Nichol & Dhariwal's cosine schedule (diffusers: "squaredcos_cap_v2"), betas capped at 0.999.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


class Diffusion:
    """The discrete forward process: tables of alpha-bar and the training loss."""

    def __init__(self, cfg: ScheduleConfig):
        self.config = cfg
        self.betas = make_betas(cfg)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def alpha_bar(self, t: int | Tensor) -> Tensor:
        """alpha-bar at t; t < 0 means 'before the first step' (alpha-bar = 1)."""
        if isinstance(t, int):
            return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones(()))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        ab = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def loss(self, model, x0: Tensor, t: Tensor, noise: Tensor, teacher=None, distill: float = 1.0) -> Tensor:
        """The simple eps-prediction loss of Ho et al.: mean squared error on the noise. With a
        ``teacher`` (self-distillation) the target is ``lerp(noise, teacher(x_t, t), distill)``."""
        x_t = self.q_sample(x0, t, noise)
        target = noise
        if teacher is not None:
            with torch.no_grad():
                target = torch.lerp(noise, teacher(x_t, t).to(noise.dtype), distill)
        return F.mse_loss(model(x_t, t), target)
