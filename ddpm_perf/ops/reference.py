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


def group_norm_silu_quantized(x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor | None,
                              groups: int, eps: float, silu: bool, scale: float, zero_point: int) -> Tensor:
    """``group_norm_silu``'s y quantised to uint8 with (scale, zero_point), from y in fp32 (for a bf16
    x too: y is never rounded to x's dtype)."""
    y = group_norm_silu(x.float(), weight, bias, shift, groups, eps, silu)[0]
    return quantize_activation(y, scale, zero_point)


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


def int8_conv2d_out_dtype(x_dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> torch.dtype:
    """int8_conv2d's output dtype: ``out_dtype`` if given, else x's (float32 for a uint8 x)."""
    if out_dtype is not None:
        return out_dtype
    return torch.float32 if x_dtype == torch.uint8 else x_dtype


def int8_conv2d(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, x_scale: float,
                x_zero_point: int, stride: tuple[int, int], padding: tuple[int, int],
                out_dtype: torch.dtype | None = None) -> Tensor:
    """The int8 convolution: x quantised to uint8 with (x_scale, x_zero_point) (a uint8 x already
    is), int8 OIHW ``weight`` with per-output-channel ``weight_scale``, products summed exactly,
    dequantised, plus bias. Padding contributes zeros (the zero point). Output channels_last, in
    ``out_dtype``, by default x's dtype (float32 for a uint8 x)."""
    q = x if x.dtype == torch.uint8 else quantize_activation(x, x_scale, x_zero_point)
    xq = q.float() - x_zero_point  # exact integers
    acc = F.conv2d(xq.double(), weight.double(), None, stride, padding)  # exact in fp64
    y = acc * (x_scale * weight_scale.double()).reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.double().reshape(1, -1, 1, 1)
    return y.to(int8_conv2d_out_dtype(x.dtype, out_dtype)).contiguous(memory_format=torch.channels_last)


# Philox4x32 constants (Salmon et al. 2011; the same as cuRAND's and Triton's).
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of the constant ``a`` and the uint32 values in
    int64 tensor ``b``, exact: b is split in 16-bit halves so that no product exceeds 2^48."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = a * b_lo                      # < 2^48
    mid = a * b_hi + (low >> 16)        # the product >> 16, < 2^49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(counter: Tensor, seed: int, rounds: int = 10) -> tuple[Tensor, ...]:
    """Philox4x32-``rounds`` of the int64 ``counter`` (words 0 and 1: its low and high halves) with
    key (seed low, seed high): four uint32 words, as int64 tensors."""
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _U32, (k1 + _PHILOX_KEY[1]) & _U32
    return c0, c1, c2, c3


def dropout_draws(shape: torch.Size, seed: int, device=None) -> Tensor:
    """The 32-bit draw of every element of an (N, C, ...) tensor: element (n, c, s) (s the flat
    spatial index) takes word c % 4 of Philox(counter (n * S + s) * ceil(C / 4) + c // 4, seed).
    Four channels of a pixel share one counter, whatever the memory layout."""
    n, c = shape[:2]
    s = math.prod(shape[2:])
    c4 = (c + 3) // 4
    ni = torch.arange(n, device=device).reshape(n, 1, 1)
    ci = torch.arange(c, device=device).reshape(1, c, 1)
    si = torch.arange(s, device=device).reshape(1, 1, s)
    words = torch.stack(philox4x32((ni * s + si) * c4 + ci // 4, seed))  # (4, n, c, s)
    return words.gather(0, (ci % 4).expand(1, n, c, s))[0].reshape(shape)


def dropout_threshold(p: float) -> int:
    """Elements whose draw is >= round(p * 2^32) are kept: probability 1 - p to within 2^-32."""
    return min(math.floor(p * 2**32 + 0.5), _U32)


def dropout(x: Tensor, seed: int, p: float) -> Tensor:
    """``keep ? x / (1 - p) : 0`` with keep = draw >= threshold (:func:`dropout_draws`), in fp32,
    rounded to x's dtype; x's memory format is kept."""
    keep = dropout_draws(x.shape, seed, x.device) >= dropout_threshold(p)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    y = torch.where(keep, x.float() * scale, torch.zeros((), dtype=torch.float32, device=x.device))
    return torch.empty_like(x).copy_(y)
