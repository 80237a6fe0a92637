"""amp: automatic mixed precision (autocast) for sampling and training; bf16 by default."""

from __future__ import annotations

import torch
from torch import nn

from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Option, Phase, Plugin

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class Amp(Plugin):
    name = "amp"
    description = "Autocast convolutions and matmuls to bf16/fp16 (norms, softmax and the sampler stay fp32)."
    phase = Phase.PRECISION
    options = {
        "dtype": Option(str, "bfloat16", "autocast dtype (float16: CUDA only)", choices=tuple(DTYPES)),
        "weights": Option(bool, False, "sampling: store conv/linear weights in the autocast dtype, "
                                       "saving the per-step weight casts"),
    }

    @hookimpl
    def configure(self, ctx):
        if self.opts.dtype == "float16" and ctx.device.type == "cpu":
            raise UserError("plugin amp: dtype=float16 needs a CUDA device (CPU autocast is fast in bfloat16 "
                            "only); use amp(dtype=bfloat16)")
        if ctx.mode == "train" and self.opts.weights:
            raise UserError("plugin amp: weights=true is for sampling; training keeps fp32 master weights")
        if ctx.mode == "train" and self.opts.dtype == "float16":
            ctx.grad_scaler = torch.amp.GradScaler(ctx.device.type)

    @hookimpl
    def transform_model(self, model: nn.Module, ctx):
        if ctx.mode == "sample" and self.opts.weights:
            dtype = DTYPES[self.opts.dtype]
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.to(dtype)
        return model

    def _autocast(self, ctx):
        return torch.autocast(ctx.device.type, dtype=DTYPES[self.opts.dtype])

    @hookimpl
    def wrap_denoiser(self, fn, ctx):
        def denoise(x, t, plan):
            with self._autocast(ctx):
                return fn(x, t, plan).float()

        return denoise

    @hookimpl
    def wrap_train_step(self, fn, ctx):
        def loss(x0, t, noise):
            with self._autocast(ctx):
                return fn(x0, t, noise).float()

        return loss
