"""amp: automatic mixed precision (autocast) for sampling and training; bf16 by default."""

from __future__ import annotations

import torch
from torch import nn

from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Option, Phase, Plugin

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# keep_float=first_last: conv_in computes in fp32 (the noisy image rounded to bf16 loses more than
# any other layer's rounding) and hands bf16 on; norm_out and conv_out compute and return fp32
# (the predicted noise is not rounded). Together they halve autocast's deviation from fp32 at no
# measurable cost (docs/performance.md, "amp: the image in and the noise out in fp32").
FLOAT32_IN = ("conv_in",)
FLOAT32_OUT = ("norm_out", "conv_out")


def _float32_forward(self, *args, **kwargs):
    device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    with torch.autocast(device, enabled=False):
        args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        out = super(type(self), self).forward(*args, **kwargs)
    return out if self.float32_hands_on is None else out.to(self.float32_hands_on)


def run_in_float32(module: nn.Module, hands_on: torch.dtype | None = None) -> None:
    """Make ``module`` compute in fp32 under autocast (floating inputs upcast) and return its output
    in ``hands_on`` (None: fp32). Its class becomes a subclass with that forward, so parameters and
    state-dict keys stay as they are."""
    cls = type(module)
    if not getattr(cls, "runs_in_float32", False):
        module.__class__ = type(f"Float32{cls.__name__}", (cls,), {"forward": _float32_forward, "runs_in_float32": True})
    module.float32_hands_on = hands_on


class Amp(Plugin):
    name = "amp"
    description = ("Autocast convolutions and matmuls to bf16/fp16; the image in, the noise out and the sampler "
                   "stay fp32.")
    phase = Phase.PRECISION
    options = {
        "dtype": Option(str, "bfloat16", "autocast dtype (float16: CUDA only)", choices=tuple(DTYPES)),
        "weights": Option(bool, False, "sampling: store conv/linear weights in the autocast dtype, "
                                       "saving the per-step weight casts"),
        "keep_float": Option(str, "first_last", "layers computed in fp32: first_last (conv_in, norm_out, "
                                                "conv_out) or none", choices=("first_last", "none")),
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
        kept = []
        if self.opts.keep_float == "first_last":
            for names, hands_on in ((FLOAT32_IN, DTYPES[self.opts.dtype]), (FLOAT32_OUT, None)):
                for module in (getattr(model, name) for name in names if hasattr(model, name)):
                    run_in_float32(module, hands_on)
                    kept.append(module)
        if ctx.mode == "sample" and self.opts.weights:
            dtype = DTYPES[self.opts.dtype]
            float_params = {id(p) for module in kept for p in module.parameters()}
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)) and not any(id(p) in float_params
                                                                           for p in module.parameters()):
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
