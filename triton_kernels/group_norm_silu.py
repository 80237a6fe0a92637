"""Fused GroupNorm (+ per-(N, C) shift before, + SiLU after) in Triton, forward and backward.

Semantics: ``ddpm_perf.ops.reference.group_norm_silu``. One program per (sample, group); NCHW and
channels_last share the kernels, which take (n, c, hw) strides.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _check_launchable

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per tile: large enough to keep a GPU's loads wide, small enough for registers.
_TILE = 2048


@triton.jit
def _silu_grad(z):
    # d/dz [z * sigmoid(z)] = s * (1 + z * (1 - s))
    s = tl.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@triton.jit
def _quantize_u8(z, inv_scale, zero_point):
    # round(z * inv_scale) + zero_point clamped to [0, 255], as reference.quantize_activation. Half
    # to even by adding and subtracting 1.5 * 2^23 (exact for |t| <= 2^22; t is clamped first,
    # which cannot change the clamped result).
    t = tl.minimum(tl.maximum(z * inv_scale, -512.0), 512.0)
    r = (t + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r + zero_point, 0.0), 255.0).to(tl.uint8)


@triton.jit
def _gn_forward_kernel(x_ptr, shift_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                       C, HW, groups, cpg, eps, inv_scale, zero_point,
                       sxn, sxc, sxhw, syn, syc, syhw,
                       HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       SILU: tl.constexpr, QUANT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # QUANT: y is uint8, quantised with (inv_scale, zero_point) for an int8 consumer.
    pid = tl.program_id(0)
    n = (pid // groups).to(tl.int64)  # int64: n * sxn overflows int32 on large batches
    c0 = (pid % groups) * cpg
    x_base = x_ptr + n * sxn + c0 * sxc
    y_base = y_ptr + n * syn + c0 * syc
    eps = tl.cast(eps, tl.float32)  # Inductor may pass Python floats as fp64
    inv_scale = tl.cast(inv_scale, tl.float32)
    zero_point = tl.cast(zero_point, tl.float32)
    hw_range = tl.arange(0, BLOCK_HW)
    c_range = tl.arange(0, BLOCK_C)

    # Pass 1: fp32 statistics. Each tile's mean and centred sum of squares are merged with Chan's
    # formula, which avoids the cancellation of E[x^2] - E[x]^2 when |mean| >> std.
    count = tl.zeros([], tl.float32)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    for cs in range(0, cpg, BLOCK_C):
        cc = cs + c_range
        c_mask = cc < cpg
        if HAS_SHIFT:
            sh = tl.load(shift_ptr + n * C + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        for hs in range(0, HW, BLOCK_HW):
            hw = hs + hw_range
            mask = (hw[:, None] < HW) & c_mask[None, :]
            v = tl.load(x_base + hw[:, None] * sxhw + cc[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            if HAS_SHIFT:
                v = v + sh[None, :]
            t_count = tl.sum(mask.to(tl.float32))
            t_mean = tl.sum(tl.where(mask, v, 0.0)) / t_count
            d = tl.where(mask, v - t_mean, 0.0)
            t_m2 = tl.sum(d * d)
            total = count + t_count
            delta = t_mean - mean
            mean = mean + delta * (t_count / total)
            m2 = m2 + t_m2 + delta * delta * (count * t_count / total)
            count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)

    # Pass 2: normalise, affine, activation; x is read again rather than kept (a group can be MBs).
    for cs in range(0, cpg, BLOCK_C):
        cc = cs + c_range
        c_mask = cc < cpg
        if HAS_SHIFT:
            sh = tl.load(shift_ptr + n * C + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(b_ptr + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        for hs in range(0, HW, BLOCK_HW):
            hw = hs + hw_range
            mask = (hw[:, None] < HW) & c_mask[None, :]
            v = tl.load(x_base + hw[:, None] * sxhw + cc[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            if HAS_SHIFT:
                v = v + sh[None, :]
            z = (v - mean) * rstd
            if HAS_W:
                z = z * w[None, :]
            if HAS_B:
                z = z + b[None, :]
            if SILU:
                z = z * tl.sigmoid(z)
            if QUANT:
                out = _quantize_u8(z, inv_scale, zero_point)
            else:
                out = z.to(y_ptr.dtype.element_ty)
            tl.store(y_base + hw[:, None] * syhw + cc[None, :] * syc, out, mask=mask)


@triton.jit
def _gn_backward_kernel(dy_ptr, x_ptr, shift_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
                        C, HW, groups, cpg,
                        sdn, sdc, sdhw, sxn, sxc, sxhw, sgn, sgc, sghw,
                        HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # With xhat = (x + shift - mean) * rstd, z = xhat * w + b, y = silu(z) or z, g = dL/dz * w:
    #   dL/dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  (means over the group),
    #   dL/dw = sum dL/dz * xhat, dL/db = sum dL/dz  (per channel; here per (n, c), summed over n outside,
    #   which keeps the result deterministic where atomics would not).
    pid = tl.program_id(0)
    n = (pid // groups).to(tl.int64)
    c0 = (pid % groups) * cpg
    dy_base = dy_ptr + n * sdn + c0 * sdc
    x_base = x_ptr + n * sxn + c0 * sxc
    dx_base = dx_ptr + n * sgn + c0 * sgc
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    hw_range = tl.arange(0, BLOCK_HW)
    c_range = tl.arange(0, BLOCK_C)

    # Pass 1: the two group sums and the per-(n, c) weight and bias gradients.
    sum_g = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    for cs in range(0, cpg, BLOCK_C):
        cc = cs + c_range
        c_mask = cc < cpg
        if HAS_SHIFT:
            sh = tl.load(shift_ptr + n * C + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(b_ptr + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        db_acc = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        for hs in range(0, HW, BLOCK_HW):
            hw = hs + hw_range
            mask = (hw[:, None] < HW) & c_mask[None, :]
            v = tl.load(x_base + hw[:, None] * sxhw + cc[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            dz = tl.load(dy_base + hw[:, None] * sdhw + cc[None, :] * sdc, mask=mask, other=0.0).to(tl.float32)
            if HAS_SHIFT:
                v = v + sh[None, :]
            xhat = tl.where(mask, (v - mean) * rstd, 0.0)
            if SILU:
                z = xhat
                if HAS_W:
                    z = z * w[None, :]
                if HAS_B:
                    z = z + b[None, :]
                dz = dz * _silu_grad(z)  # dz is 0 on masked lanes, so this stays 0 there
            dw_acc += dz * xhat
            db_acc += dz
            g = dz
            if HAS_W:
                g = g * w[None, :]
            sum_g += g
            sum_gx += g * xhat
        tl.store(dw_ptr + n * C + c0 + cc, tl.sum(dw_acc, axis=0), mask=c_mask)
        tl.store(db_ptr + n * C + c0 + cc, tl.sum(db_acc, axis=0), mask=c_mask)
    count = cpg * HW * 1.0  # a product, not .to(): Triton may specialise an int argument of 1 to a constant
    mean_g = tl.sum(sum_g) / count
    mean_gx = tl.sum(sum_gx) / count

    # Pass 2: the input gradient, recomputing xhat and dz rather than storing them.
    for cs in range(0, cpg, BLOCK_C):
        cc = cs + c_range
        c_mask = cc < cpg
        if HAS_SHIFT:
            sh = tl.load(shift_ptr + n * C + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(b_ptr + c0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        for hs in range(0, HW, BLOCK_HW):
            hw = hs + hw_range
            mask = (hw[:, None] < HW) & c_mask[None, :]
            v = tl.load(x_base + hw[:, None] * sxhw + cc[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            dz = tl.load(dy_base + hw[:, None] * sdhw + cc[None, :] * sdc, mask=mask, other=0.0).to(tl.float32)
            if HAS_SHIFT:
                v = v + sh[None, :]
            xhat = (v - mean) * rstd
            if SILU:
                z = xhat
                if HAS_W:
                    z = z * w[None, :]
                if HAS_B:
                    z = z + b[None, :]
                dz = dz * _silu_grad(z)
            g = dz
            if HAS_W:
                g = g * w[None, :]
            dx = rstd * (g - mean_g - xhat * mean_gx)
            tl.store(dx_base + hw[:, None] * sghw + cc[None, :] * sgc, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _layout(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` dense in the given layout, so that (n, c, hw) strides describe it."""
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _nchw_strides(t: Tensor) -> tuple[int, int, int]:
    """(n, c, hw) strides of a dense NCHW or channels_last tensor (H and W flatten into one index)."""
    if t.dim() == 2:
        return t.stride(0), t.stride(1), 1
    return t.stride(0), t.stride(1), t.stride(-1)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _blocks(cpg: int, hw: int) -> tuple[int, int, int]:
    block_c = min(triton.next_power_of_2(cpg), 128)
    block_hw = min(triton.next_power_of_2(hw), max(1, _TILE // block_c))
    num_warps = 8 if block_c * block_hw >= 2048 else 4
    return block_c, block_hw, num_warps


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shift: Optional[Tensor], groups: int) -> None:
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be (N, C, ...), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"group_norm_silu: x must be float32, bfloat16 or float16, got {x.dtype}")
    n, c = x.shape[:2]
    if groups <= 0 or c % groups:
        raise ValueError(f"group_norm_silu: {c} channels do not split into {groups} groups")
    for name, t, shape in (("weight", weight, (c,)), ("bias", bias, (c,)), ("shift", shift, (n, c))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"group_norm_silu: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"group_norm_silu: {name} is on {t.device}, x on {x.device}")
    if x.numel() == 0:
        raise ValueError(f"group_norm_silu: x is empty (shape {tuple(x.shape)})")


def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shift: Optional[Tensor], groups: int,
             eps: float, silu: bool, quant: Optional[tuple[float, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); y in x's dtype, or uint8 quantised with quant = (scale, zero_point)."""
    x = _layout(x, _is_channels_last(x))
    n, c = x.shape[:2]
    hw = math.prod(x.shape[2:])
    cpg = c // groups
    y = torch.empty_like(x) if quant is None else torch.empty_like(x, dtype=torch.uint8)
    inv_scale, zero_point = (1.0, 0) if quant is None else (1.0 / quant[0], quant[1])
    mean = torch.empty((n, groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty((n, groups), device=x.device, dtype=torch.float32)
    shift_c = shift.contiguous() if shift is not None else None
    weight_c = weight.contiguous() if weight is not None else None
    bias_c = bias.contiguous() if bias is not None else None
    block_c, block_hw, num_warps = _blocks(cpg, hw)
    # Absent operands get x as a placeholder pointer; the constexpr flags keep it from being read.
    torch.library.wrap_triton(_gn_forward_kernel)[(n * groups,)](
        x, shift_c if shift_c is not None else x, weight_c if weight_c is not None else x,
        bias_c if bias_c is not None else x, y, mean, rstd,
        c, hw, groups, cpg, eps, inv_scale, zero_point, *_nchw_strides(x), *_nchw_strides(y),
        HAS_SHIFT=shift is not None, HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        QUANT=quant is not None, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)
    return y, mean, rstd


@torch.library.triton_op("ddpm_perf_triton::group_norm_silu", mutates_args=())
def group_norm_silu_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shift: Optional[Tensor],
                       groups: int, eps: float, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y in x's dtype and memory format, mean (N, groups) fp32, rstd (N, groups) fp32)."""
    _check(x, weight, bias, shift, groups)
    _check_launchable(_gn_forward_kernel, x, "group_norm_silu")
    return _forward(x, weight, bias, shift, groups, eps, silu, None)


@torch.library.triton_op("ddpm_perf_triton::group_norm_silu_quantized", mutates_args=())
def group_norm_silu_quantized_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                 shift: Optional[Tensor], groups: int, eps: float, silu: bool, scale: float,
                                 zero_point: int) -> Tensor:
    """y quantised to uint8, ``clamp(round(y / scale) + zero_point, 0, 255)``, in x's memory format
    (forward only: for an int8 consumer)."""
    _check(x, weight, bias, shift, groups)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"group_norm_silu_quantized: scale must be positive and finite, got {scale}")
    if not 0 <= zero_point <= 255:
        raise ValueError(f"group_norm_silu_quantized: zero_point must be in [0, 255], got {zero_point}")
    _check_launchable(_gn_forward_kernel, x, "group_norm_silu_quantized")
    return _forward(x, weight, bias, shift, groups, eps, silu, (scale, zero_point))[0]


@torch.library.triton_op("ddpm_perf_triton::group_norm_silu_backward", mutates_args=())
def group_norm_silu_backward_op(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                shift: Optional[Tensor], mean: Tensor, rstd: Tensor, groups: int,
                                silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias); grad_x is also the gradient of x + shift.

    grad_weight and grad_bias are computed even when weight or bias is None (as if they were ones
    and zeros), in the dtype of weight/bias, else x's."""
    _check(x, weight, bias, shift, groups)
    _check_launchable(_gn_backward_kernel, x, "group_norm_silu_backward")
    channels_last = _is_channels_last(x)
    x = _layout(x, channels_last)
    grad_y = _layout(grad_y, channels_last)
    n, c = x.shape[:2]
    hw = math.prod(x.shape[2:])
    cpg = c // groups
    grad_x = torch.empty_like(x)
    dw_partial = torch.empty((n, c), device=x.device, dtype=torch.float32)
    db_partial = torch.empty((n, c), device=x.device, dtype=torch.float32)
    shift_c = shift.contiguous() if shift is not None else None
    weight_c = weight.contiguous() if weight is not None else None
    bias_c = bias.contiguous() if bias is not None else None
    block_c, block_hw, num_warps = _blocks(cpg, hw)
    torch.library.wrap_triton(_gn_backward_kernel)[(n * groups,)](
        grad_y, x, shift_c if shift_c is not None else x, weight_c if weight_c is not None else x,
        bias_c if bias_c is not None else x, mean.contiguous(), rstd.contiguous(), grad_x, dw_partial, db_partial,
        c, hw, groups, cpg, *_nchw_strides(grad_y), *_nchw_strides(x), *_nchw_strides(grad_x),
        HAS_SHIFT=shift is not None, HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)
    grad_weight = dw_partial.sum(0).to(weight.dtype if weight is not None else x.dtype)
    grad_bias = db_partial.sum(0).to(bias.dtype if bias is not None else x.dtype)
    return grad_x, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, shift, groups, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, shift, mean, rstd)
    ctx.groups, ctx.silu = groups, silu
    # The statistics are outputs for the backward, not values to differentiate through: the
    # backward has no term for them, so mark them rather than silently drop their gradients.
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, shift, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.ddpm_perf_triton.group_norm_silu_backward(
        grad_y, x, weight, bias, shift, mean, rstd, ctx.groups, ctx.silu)
    grad_shift = None
    if shift is not None and ctx.needs_input_grad[3]:
        # Summed in fp32 (for bf16/fp16 x, of the rounded grad_x: within the dtype's tolerance).
        grad_shift = grad_x.float().sum(dim=tuple(range(2, x.dim()))).to(shift.dtype)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_weight if weight is not None and ctx.needs_input_grad[1] else None,
            grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
            grad_shift, None, None, None)


torch.library.register_autograd("ddpm_perf_triton::group_norm_silu", _backward, setup_context=_setup_context)
