"""fused_dropout: the ResBlocks' dropout as ``ddpm_perf::dropout``, one pass with a Philox mask
drawn in registers and never stored (training; dropout does nothing at sampling)."""

from __future__ import annotations

from torch import Tensor, nn

from ddpm_perf import ops
from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Phase, Plugin


class PhiloxDropout(nn.Dropout):
    """nn.Dropout with a counter-based mask: the same distribution, a different random stream
    (drawn from torch's generator, one seed per call, so runs stay reproducible)."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.dropout(x, self.p, self.training)


class FusedDropout(Plugin):
    name = "fused_dropout"
    description = ("Training: dropout in one pass, its Philox mask drawn in registers and never stored; "
                   "the backward redraws it (C++ AVX-512 on CPU, Triton on GPU).")
    phase = Phase.REWRITE
    ops = ("dropout",)

    @hookimpl
    def configure(self, ctx):
        if ctx.mode != "train":
            ctx.report.append("fused_dropout: no effect when sampling (dropout is off)")

    @hookimpl
    def transform_model(self, model: nn.Module, ctx):
        if ctx.mode != "train":
            return model
        swapped = 0
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.Dropout and child.p > 0:
                    setattr(parent, name, PhiloxDropout(child.p))
                    swapped += 1
        ctx.report.append(f"fused_dropout: {swapped} dropout layers, backend {ops.backends(ctx.device.type)['dropout']}")
        return model
