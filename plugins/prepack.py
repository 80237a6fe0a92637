"""prepack: convolution weights reordered once into oneDNN's blocked layout (CPU sampling).

An eager ``F.conv2d`` on the CPU hands oneDNN plain OIHW weights, which it reorders on every call,
and at small inputs (batch 1, the 4x4 and 8x8 levels) torch takes its im2col + GEMM path, which
packs the weights on every call too: both read each weight two or three times per step. Here
every ``nn.Conv2d`` keeps one copy of its weights in the layout oneDNN picked for the input
shape it sees, and runs ``mkldnn._convolution_pointwise`` on it: what inductor's freezing does,
without compiling. Weights are constants once packed, so this is for sampling only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Phase, Plugin


class PrepackedConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters and state-dict keys) whose forward runs on weights packed
    for the input's shape and dtype; a new shape or dtype packs again (the engine's shape is fixed)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled("cpu"):  # the custom op is not on autocast's list: cast as conv2d would
            x = x.to(torch.get_autocast_dtype("cpu"))
        key = (tuple(x.shape), x.dtype)
        if getattr(self, "_packed_key", None) != key:
            weight = self.weight.detach().to(x.dtype)
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            self._packed_bias = None if self.bias is None else self.bias.detach().to(x.dtype)
            self._packed_key = key
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self._packed_bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, "none", [], "")


class Prepack(Plugin):
    name = "prepack"
    description = "Reorder convolution weights once into oneDNN's blocked layout (CPU sampling)."
    phase = Phase.COMPILE  # after channels_last and amp(weights=true): pack the weights as they will run
    # compile traces modules, and the packed weights are opaque oneDNN tensors; step_aware slices
    # the weights per step.
    conflicts = ("compile", "step_aware")

    @classmethod
    def available(cls):
        if not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN (mkldnn)"
        return None

    @hookimpl
    def configure(self, ctx):
        if ctx.mode != "sample":
            raise UserError("plugin prepack: sampling only (packed weights are constants); drop it from train")
        if ctx.device.type != "cpu":
            ctx.report.append(f"prepack: no effect on {ctx.device.type} (oneDNN weight packing is for the CPU)")

    @hookimpl
    def transform_model(self, model: nn.Module, ctx):
        if ctx.device.type != "cpu":
            return model
        # Numeric zero padding is what the packed op takes; the U-Net's convs all have it.
        convs = [m for m in model.modules()
                 if type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)]
        for conv in convs:
            conv.__class__ = PrepackedConv2d  # same module and parameters; packs on first use
        ctx.report.append(f"prepack: {len(convs)} convolutions run on weights packed once for oneDNN")
        return model
