"""channels_last: NHWC memory format for weights and activations (oneDNN and cuDNN prefer it)."""

from __future__ import annotations

import torch

from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Phase, Plugin


class ChannelsLast(Plugin):
    name = "channels_last"
    description = "Store weights and activations in NHWC (channels_last) memory format."
    phase = Phase.LAYOUT

    @hookimpl
    def transform_model(self, model: torch.nn.Module, ctx):
        return model.to(memory_format=torch.channels_last)

    @hookimpl
    def wrap_denoiser(self, fn, ctx):
        def denoise(x, t, plan):
            return fn(x.contiguous(memory_format=torch.channels_last), t, plan)

        return denoise

    @hookimpl
    def wrap_train_step(self, fn, ctx):
        def step(x0, t, noise):
            fmt = torch.channels_last
            return fn(x0.contiguous(memory_format=fmt), t, noise.contiguous(memory_format=fmt))

        return step
