"""``group_norm_silu``: fused ``[silu](group_norm(x + shift) * weight + bias)``, forward and backward;
``group_norm_silu_quantized``: its forward with y quantised to uint8 for an int8 consumer.

Backends: Triton (``ddpm_perf_triton``) for CUDA tensors when Triton is installed, otherwise the
C++/CUDA kernels of ``ddpm_perf._C``, otherwise :func:`ddpm_perf.ops.reference.group_norm_silu`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import kernel_backend, load_extension, per_device_type, triton_kernels

OP = "group_norm_silu"


def _register() -> None:
    @torch.library.register_fake("ddpm_perf::group_norm_silu")
    def _(x, weight, bias, shift, groups, eps, silu):
        torch._check(x.dim() >= 2 and x.shape[1] % groups == 0, lambda: "channels must divide into groups")
        y = torch.empty_like(x, memory_format=torch.preserve_format)
        stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
        return y, stats, torch.empty_like(stats)

    @torch.library.register_fake("ddpm_perf::group_norm_silu_quantized")
    def _(x, weight, bias, shift, groups, eps, silu, scale, zero_point):
        torch._check(x.dim() >= 2 and x.shape[1] % groups == 0, lambda: "channels must divide into groups")
        return torch.empty_like(x, dtype=torch.uint8, memory_format=torch.preserve_format)

    @torch.library.register_fake("ddpm_perf::group_norm_silu_backward")
    def _(grad_y, x, weight, bias, shift, mean, rstd, groups, silu):
        # without weight (bias): an empty gradient in x's dtype
        dw = x.new_empty((x.shape[1],), dtype=weight.dtype) if weight is not None else x.new_empty((0,))
        db = x.new_empty((x.shape[1],), dtype=bias.dtype) if bias is not None else x.new_empty((0,))
        return torch.empty_like(x, memory_format=torch.preserve_format), dw, db

    def setup_context(ctx, inputs, output):
        x, weight, bias, shift, groups, eps, silu = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, shift, mean, rstd)
        ctx.groups, ctx.silu = groups, silu

    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, shift, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.ddpm_perf.group_norm_silu_backward(
            grad_y, x, weight, bias, shift, mean, rstd, ctx.groups, ctx.silu)
        # Summed from dx in x's dtype: for bf16 the rounded terms nearly cancel, so this gradient is
        # the least accurate of the four (large H*W in bf16 can exceed the test tolerance of 2e-2).
        dshift = dx.sum(dim=tuple(range(2, x.dim())), dtype=torch.float32).to(shift.dtype) if shift is not None else None
        return (dx, dw if weight is not None else None, db if bias is not None else None, dshift, None, None, None)

    torch.library.register_autograd("ddpm_perf::group_norm_silu", backward, setup_context=setup_context)


if load_extension() is None:
    _register()


def backend(device: torch.device) -> str:
    return kernel_backend(OP, device)


def quantized_backend(device: torch.device) -> str:
    return kernel_backend(f"{OP}_quantized", device)


def backends(device: torch.device) -> dict[str, str]:  # for ops.backends()
    return {OP: backend(device), f"{OP}_quantized": quantized_backend(device)}


_backend = per_device_type(backend)
_quantized_backend = per_device_type(quantized_backend)


def group_norm_silu(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float = 1e-5,
                    silu: bool = True, shift: Tensor | None = None) -> Tensor:
    """``[silu](group_norm(x + shift[:, :, None, None], groups) * weight + bias)`` in one pass.

    ``shift`` (N, C) is the time-embedding add the U-Net's ResBlocks make before their second
    norm. Statistics are fp32 whatever x's dtype; the output keeps x's dtype and memory format.
    """
    kind = _backend(x.device.type)
    if kind == "triton":
        return triton_kernels().group_norm_silu(x, weight, bias, shift, groups, eps, silu)
    if kind.startswith("reference"):
        return reference.group_norm_silu(x, weight, bias, shift, groups, eps, silu)[0]
    return torch.ops.ddpm_perf.group_norm_silu(x, weight, bias, shift, groups, eps, silu)[0]


def group_norm_silu_quantized(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                              silu: bool, shift: Tensor | None, scale: float, zero_point: int) -> Tensor:
    """:func:`group_norm_silu`'s y quantised to uint8, ``clamp(round(y / scale) + zero_point, 0, 255)``,
    as ``int8_conv2d`` quantises its input: a norm feeding that convolution hands it codes and never
    writes y in float. Forward only. Rounding as the int8 convolution's (``y * (1 / scale)``, half to
    even); the CPU kernel's SiLU is the bf16 outputs' (at most 0.074 of a quantisation step off inside
    the quantised range), so a code can differ by one from the reference's.
    """
    kind = _quantized_backend(x.device.type)
    if kind == "triton":
        return triton_kernels().group_norm_silu_quantized(x, weight, bias, shift, groups, eps, silu, scale, zero_point)
    if kind.startswith("reference"):
        return reference.group_norm_silu_quantized(x, weight, bias, shift, groups, eps, silu, scale, zero_point)
    return torch.ops.ddpm_perf.group_norm_silu_quantized(x, weight, bias, shift, groups, eps, silu, scale, zero_point)
