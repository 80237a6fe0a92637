"""Plain-PyTorch reference implementations of every ddpm_perf op.

These define what each op computes: every kernel (C++, CUDA, Triton) is tested against them,
and they are the path taken where no kernel is available.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def group_norm_silu(x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor | None,
                    groups: int, eps: float, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``silu(group_norm(x + shift[:, :, None, None]) * weight + bias)``, statistics in fp32.

    Returns (y in x's dtype, mean (N, groups) fp32, rstd (N, groups) fp32).
    """
    n, c = x.shape[:2]
    h = x.float()
    if shift is not None:
        h = h + shift.float().reshape(n, c, *([1] * (x.dim() - 2)))
    grouped = h.reshape(n, groups, -1)
    var, mean = torch.var_mean(grouped, dim=2, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = ((grouped - mean[..., None]) * rstd[..., None]).reshape(h.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().reshape(shape)
    if bias is not None:
        y = y + bias.float().reshape(shape)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), mean, rstd


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d)) v`` over (..., L, d) tensors, fp32 inside."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: returns (int8 weight, fp32 scale per output channel)."""
    amax = weight.detach().float().flatten(1).abs().amax(dim=1).clamp_min(1e-12)
    scale = amax / 127.0
    q = torch.round(weight.float() / scale.reshape(-1, *([1] * (weight.dim() - 1)))).clamp(-127, 127)
    return q.to(torch.int8), scale


def quantize_activation(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """Per-tensor affine uint8: ``clamp(round(x / scale) + zero_point, 0, 255)``."""
    return (torch.round(x.float() * (1.0 / scale)) + zero_point).clamp(0, 255).to(torch.uint8)


def int8_conv2d(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, x_scale: float,
                x_zero_point: int, stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """The int8 convolution: x quantised to uint8 with (x_scale, x_zero_point), int8 OIHW
    ``weight`` with per-output-channel ``weight_scale``, products summed exactly, dequantised,
    plus bias. Padding contributes zeros (the zero point). Output in x's dtype, channels_last."""
    xq = quantize_activation(x, x_scale, x_zero_point).float() - x_zero_point  # exact integers
    acc = F.conv2d(xq.double(), weight.double(), None, stride, padding)  # exact in fp64
    y = acc * (x_scale * weight_scale.double()).reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.double().reshape(1, -1, 1, 1)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)
