"""The hook specification: the one contract every plugin implements.

Hooks are called through pluggy in *phase order* (rewrite -> layout -> precision -> compile ->
runtime; within a phase, the order given on the command line). ``transform_model``,
``wrap_denoiser`` and ``wrap_train_step`` are chained: each plugin receives what the previous
one returned (returning None keeps it unchanged). The others are plain calls whose return
value is ignored; ``plan_step`` edits the plan in place.

A plugin implements any subset, as methods marked with ``@hookimpl``::

    from ddpm_perf.hooks import hookimpl
    from ddpm_perf.plugins import Plugin, Phase

    class Mine(Plugin):
        name, description, phase = "mine", "does one thing", Phase.RUNTIME

        @hookimpl
        def wrap_denoiser(self, fn, ctx):
            return lambda x, t, plan: fn(x, t, plan)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import pluggy
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .diffusion.samplers import Sampler
    from .diffusion.schedule import Diffusion
    from .model.config import UNetConfig
    from .model.unet import StepPlan

PROJECT = "ddpm_perf"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# eps = denoiser(x, t, plan): x (B, C, H, W), t (B,) int64 timesteps, plan a StepPlan.
Denoiser = Callable[[Tensor, Tensor, "StepPlan"], Tensor]


@dataclass
class RunContext:
    """What a run is: passed to every hook. Plugins may add lines to ``report``."""

    mode: str  # "sample" or "train"
    device: torch.device
    model_config: "UNetConfig"
    diffusion: "Diffusion"
    batch_size: int
    sampler: "Sampler | None" = None  # sampling only
    checkpoint: str | None = None  # path of the checkpoint the model came from, if any
    trained_with: str = ""  # sampling: the plugins the checkpoint's weights were trained with (PluginHost.spec)
    grad_scaler: "torch.amp.GradScaler | None" = None  # training: set by a plugin (fp16 autocast)
    report: list[str] = field(default_factory=list)
    # Under torchrun, whether the ranks split the samples between them (data parallel). A plugin
    # that splits each image over the ranks instead (patch_parallel) sets it False in configure.
    data_parallel: bool = True
    # training: JSON-able facts a plugin records in the run's checkpoints, by plugin name (for
    # example the widths a slimmable model was trained for); saved as train metadata "plugins"
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model_config
        return (c.in_channels, c.image_size, c.image_size)


@dataclass
class StepState:
    """What ``after_step`` sees: the sample after the step and what produced it."""

    x: Tensor
    eps: Tensor
    t: int
    plan: "StepPlan"


class HookSpec:
    @hookspec
    def configure(self, ctx: RunContext) -> None:
        """Once, before the model exists: global settings, validation of combinations."""

    @hookspec
    def transform_model(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module | None:
        """Once per engine: return the rewritten model (or None to keep it)."""

    @hookspec
    def calibrate(self, engine: Any, ctx: RunContext) -> None:
        """After all transforms, before sampling: gather statistics by running ``engine``."""

    @hookspec
    def wrap_denoiser(self, fn: Denoiser, ctx: RunContext) -> Denoiser | None:
        """Once: return a denoiser that wraps ``fn`` (autocast, graph replay, ...)."""

    @hookspec
    def plan_step(self, step: int, t: int, plan: "StepPlan", ctx: RunContext) -> None:
        """Every sampling step, before the model runs: edit ``plan`` (width, skipped blocks, cache)."""

    @hookspec
    def after_step(self, step: int, state: StepState, ctx: RunContext) -> None:
        """Every sampling step, after the sampler's update: bookkeeping."""

    @hookspec
    def wrap_train_step(self, fn: Callable[..., Tensor], ctx: RunContext) -> Callable[..., Tensor] | None:
        """Training: wrap ``loss = fn(x0, t, noise)`` (autocast, sandwich rule, ...)."""
