"""deep_cache: DeepCache (Ma, Fang, Wang, CVPR 2024) — reuse the deep features of the last full step.

At a full step the whole U-Net runs and the input of the up unit that pops skip ``branch``
is kept; at the other steps only the shallow path runs (conv_in, the down units up to that
skip, and the up path from that unit on) on top of the kept feature. Training-free.

``branch`` is the U-Net's skip index (StepPlan.cache_branch): 0 is conv_in's output, then one
per down unit that pushes a skip. DeepCache's DDPM code's branch b is skip index b + 1; its
CIFAR-10 default (code branch 2, the paper's "skip branch 3") is ``branch=3`` here: the shallow
path is the full-resolution level, its downsample and the matching up units. On a small model
whose full-resolution level is most of the compute (the 16x16 digits model), a cut inside that
level pays instead: ``branch=1`` (after its first ResBlock) with ``interval=3`` and the
paper's non-uniform schedule is the measured choice there (docs/performance.md, "deep_cache: where
to cut" and its session-10 re-measurement).
"""

from __future__ import annotations

import math

import numpy as np

from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Option, Phase, Plugin


def full_steps(num_steps: int, interval: int, schedule: str, center: float, power: float) -> frozenset[int]:
    """Indices of the steps that run the whole network; step 0 always does (the cache is empty)."""
    if schedule == "uniform":
        steps = range(0, num_steps, interval)
    else:  # the paper's Eq. 7: full steps denser around c, spread by the power p
        c = center * num_steps
        ls = np.linspace(-(c ** (1 / power)), (num_steps - c) ** (1 / power), math.ceil(num_steps / interval))
        steps = {int(c + np.sign(v) * abs(v) ** power) for v in ls}
    return frozenset(s for s in steps if 0 <= s < num_steps) | {0}


class DeepCache(Plugin):
    name = "deep_cache"
    description = "DeepCache: run the whole U-Net every `interval` steps, only its shallow path in between."
    phase = Phase.RUNTIME
    options = {
        "interval": Option(int, 3, "a full step every N steps (1: always full)"),
        "branch": Option(int, 3, "skip index where the deep path is cut (0 = conv_in; 3 = DeepCache's default)"),
        "schedule": Option(str, "uniform", "where the full steps fall", choices=("uniform", "nonuniform")),
        "center": Option(float, 0.5, "nonuniform: where full steps are densest, as a fraction of the steps"),
        "power": Option(float, 1.4, "nonuniform: how fast full steps thin out away from the center"),
    }

    def __init__(self, **values):
        super().__init__(**values)
        if self.opts.interval < 1:
            raise UserError(f"plugin deep_cache: interval={self.opts.interval} must be at least 1")
        if not 0 <= self.opts.center <= 1 or self.opts.power <= 0:
            raise UserError("plugin deep_cache: center must be in [0, 1] and power > 0")
        self._cache = None
        self._full: frozenset[int] = frozenset()

    @hookimpl
    def configure(self, ctx):
        if ctx.mode != "sample":
            raise UserError("plugin deep_cache: sampling only (it is training-free)")
        o = self.opts
        self._full = full_steps(len(ctx.sampler.timesteps), o.interval, o.schedule, o.center, o.power)
        ctx.report.append(f"deep_cache: {len(self._full)} full steps of {len(ctx.sampler.timesteps)} "
                          f"(interval {o.interval}, {o.schedule}, branch {o.branch})")

    @hookimpl
    def transform_model(self, model, ctx):
        if not 0 <= self.opts.branch < model.num_branches:
            raise UserError(f"plugin deep_cache: branch={self.opts.branch} must be in 0..{model.num_branches - 1} "
                            "for this model")
        return model

    @hookimpl
    def plan_step(self, step, t, plan, ctx):
        # By step index, not timestep: samplers may repeat a timestep. Step 0 starts a new batch.
        if step == 0:
            self._cache = None
        plan.cache_branch = self.opts.branch
        plan.cached = None if step in self._full else self._cache

    @hookimpl
    def after_step(self, step, state, ctx):
        if state.plan.captured is not None:
            self._cache = state.plan.captured
            state.plan.captured = None
        if step == len(ctx.sampler.timesteps) - 1:
            self._cache = None  # free the feature between batches
