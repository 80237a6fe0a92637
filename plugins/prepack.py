"""prepack: convolution and linear weights reordered once into oneDNN's layouts (CPU sampling).

An eager ``F.conv2d`` on the CPU hands oneDNN plain OIHW weights, which it reorders on every call,
and at small inputs (batch 1, the 4x4 and 8x8 levels) torch takes its im2col + GEMM path, which
packs the weights on every call too: both read each weight two or three times per step. Here
every ``nn.Conv2d`` keeps one copy of its weights in the layout oneDNN picked for the input
shape it sees, and runs ``mkldnn._convolution_pointwise`` on it: what inductor's freezing does,
without compiling. Every ``nn.Linear`` likewise runs ``mkldnn._linear_pointwise`` on packed
weights: torch sends fp32 matmuls to MKL, whose code for AMD CPUs is AVX2 (212 GFLOP/s for the
attention projections here, against 490 through oneDNN). Weights are constants once packed, so
this is for sampling only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Phase, Plugin


def autocast_input(x: Tensor) -> Tensor:
    """The oneDNN ops are not on autocast's list: cast the input as conv2d and linear would."""
    return x.to(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else x


class PackedWeights:
    """Mixin of a layer with ``weight`` and ``bias``: its weights packed for one key (ending with
    the input's dtype), packed again when the key changes (the engine's shapes are fixed)."""

    def packed_for(self, key: tuple, pack) -> tuple[Tensor, Tensor | None]:
        if getattr(self, "_packed_key", None) != key:
            dtype = key[-1]
            self._packed = pack(self.weight.detach().to(dtype))
            self._packed_bias = None if self.bias is None else self.bias.detach().to(dtype)
            self._packed_key = key
        return self._packed, self._packed_bias


class PrepackedConv2d(PackedWeights, nn.Conv2d):
    """An nn.Conv2d (same parameters and state-dict keys) whose forward runs on weights packed
    for the input's shape and dtype."""

    def forward(self, x: Tensor) -> Tensor:
        x = autocast_input(x)
        padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)

        def pack(w: Tensor) -> Tensor:
            return torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation, self.groups, list(x.shape))

        weight, bias = self.packed_for((tuple(x.shape), x.dtype), pack)
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, self.groups,
                                                       "none", [], "")


class PrepackedLinear(PackedWeights, nn.Linear):
    """An nn.Linear (same parameters and state-dict keys) whose forward runs oneDNN's linear on
    weights packed for the input's row count and dtype."""

    def forward(self, x: Tensor) -> Tensor:
        x = autocast_input(x)
        rows = x.numel() // x.shape[-1]
        weight, bias = self.packed_for((rows, x.dtype), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows))
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Prepack(Plugin):
    name = "prepack"
    description = "Reorder convolution and linear weights once into oneDNN's layouts (CPU sampling)."
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
        linears = [m for m in model.modules() if type(m) is nn.Linear]
        for conv in convs:
            conv.__class__ = PrepackedConv2d  # same module and parameters; packs on first use
        for linear in linears:
            linear.__class__ = PrepackedLinear
        ctx.report.append(f"prepack: {len(convs)} convolutions and {len(linears)} linear layers run on weights "
                          "packed once for oneDNN")
        return model
