"""fused_attention: the U-Net's self-attention blocks as one qkv projection plus a fused attention
kernel (``ddpm_perf.ops.attention``: Triton flash attention on CUDA; elsewhere the core's attention,
so on the CPU this plugin adds only the concatenated qkv matmul)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_perf import ops
from ddpm_perf.hooks import hookimpl
from ddpm_perf.model.unet import AttnBlock
from ddpm_perf.plugins import Phase, Plugin


class FusedAttnBlock(AttnBlock):
    """AttnBlock with the q, k, v projections as one matmul and the attention as one kernel.
    Same parameters and state-dict keys; gradients flow (the weights are concatenated per call)."""

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): contiguous when x is channels_last
        if all(type(m) is nn.Linear for m in (self.q, self.k, self.v)):
            weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
            bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
            q, k, v = F.linear(tokens, weight, bias).chunk(3, dim=-1)
        else:  # projections replaced by another plugin (int8): call them as they are
            q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        out = self.proj_out(ops.attention(q, k, v))
        return x + out.transpose(1, 2).reshape(b, c, height, width)


class FusedAttention(Plugin):
    name = "fused_attention"
    description = "Self-attention as one qkv matmul and a fused attention kernel (Triton on CUDA; the core's elsewhere)."
    phase = Phase.REWRITE
    ops = ("attention",)

    @hookimpl
    def transform_model(self, model: nn.Module, ctx):
        for name, unit in model.blocks.items():
            if type(unit) is AttnBlock:
                unit.__class__ = FusedAttnBlock  # same module and parameters, fused forward
        ctx.report.append(f"fused_attention: attention backend {ops.backends(ctx.device.type)['attention']}")
        return model
