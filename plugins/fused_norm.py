"""fused_norm: GroupNorm (+ time-embedding shift, + SiLU) as one fused kernel, ``ddpm_perf::group_norm_silu``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpm_perf import ops
from ddpm_perf.hooks import hookimpl
from ddpm_perf.model.unet import NormAct
from ddpm_perf.plugins import Phase, Plugin


class FusedNormAct(NormAct):
    """NormAct computed by the fused op; same parameters, same state-dict keys. With
    ``quantize_output`` set (by the int8 plugin) it returns uint8 codes for its int8 consumers when
    its input is fp32. For bf16 input (amp) it keeps its bf16 output, which the consumers quantise
    themselves: there the codes measured no faster (docs/performance.md, "Norms that hand their
    convolutions uint8 codes")."""

    writes_uint8 = True

    def forward(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
        if self.quantize_output is not None and x.dtype == torch.float32:
            return ops.group_norm_silu_quantized(x, self.weight, self.bias, self.num_groups, self.eps, self.silu,
                                                 shift, *self.quantize_output)
        return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.silu, shift)


def fuse(module: nn.GroupNorm) -> FusedNormAct:
    fused = FusedNormAct.__new__(FusedNormAct)  # adopt the module's parameters without copying them
    fused.__dict__.update(module.__dict__)
    fused.silu = getattr(module, "silu", False)
    return fused


class FusedNorm(Plugin):
    name = "fused_norm"
    description = "Fuse each GroupNorm with its time-embedding add and SiLU into one kernel (C++/CUDA/Triton)."
    phase = Phase.REWRITE
    ops = ("group_norm_silu", "group_norm_silu_quantized")

    @hookimpl
    def transform_model(self, model: nn.Module, ctx):
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.GroupNorm) and not isinstance(child, FusedNormAct):
                    setattr(parent, name, fuse(child))
        ctx.report.append(f"fused_norm: group_norm_silu backend {ops.backends(ctx.device.type)['group_norm_silu']}")
        return model
