"""``int8_conv2d``: uint8 activations x int8 weights -> int32, dequantised in the epilogue.

x is float (quantised inside the op with the static ``x_scale``, ``x_zero_point``; the output has
x's dtype) or uint8, already quantised with them (the output is float32): what a producer that
writes quantised activations (``group_norm_silu_quantized``), or ``torch.Tensor.int_repr`` of a
quint8 tensor, hands over. ``out_dtype`` chooses another output dtype.

The weight (int8, symmetric per output channel, see :func:`reference.quantize_weight`) is packed
once with :func:`int8_pack_weight` into the layout of the backend that runs it: on the CPU, VNNI
blocks for ``vpdpbusd`` (AVX-512 VNNI, with an AVX2 path); on CUDA, dp4a groups. Inference only:
the op has no autograd formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import has_kernel, load_extension, per_device_type

OP = "int8_conv2d"


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def packed_numel(shape, device: torch.device) -> int:
    """Size of the packed weight: CPU [O/16][KH*KW][I/4][16][4], CUDA [O][KH][KW][I/4][4] (I rounded up to 4)."""
    o, i, kh, kw = shape
    i4 = -(-i // 4) * 4
    return (-(-o // 16) * 16 if device.type == "cpu" else o) * kh * kw * i4


def _register() -> None:
    @torch.library.register_fake("ddpm_perf::int8_pack_weight")
    def _(weight):
        return weight.new_empty((packed_numel(weight.shape, weight.device),), dtype=torch.int8)

    @torch.library.register_fake("ddpm_perf::int8_conv2d")
    def _(x, packed_weight, weight_colsum, weight_scale, bias, x_scale, x_zero_point, kernel_size, stride, padding,
          out_dtype=None):
        torch._check(x.dim() == 4, lambda: "int8_conv2d: x must be (N, C, H, W)")
        n, _, h, w = x.shape
        out = (n, weight_scale.shape[0], _out_size(h, kernel_size[0], stride[0], padding[0]),
               _out_size(w, kernel_size[1], stride[1], padding[1]))
        return x.new_empty(out, dtype=reference.int8_conv2d_out_dtype(x.dtype, out_dtype)).contiguous(
            memory_format=torch.channels_last)


if load_extension() is None:
    _register()


def backend(device: torch.device) -> str:
    if has_kernel(OP, device):
        if device.type == "cpu":
            return "cpp (" + torch.ops.ddpm_perf.cpu_isa() + ")"
        return "cuda"
    reason = load_extension() or f"ddpm_perf._C has no {device.type} kernel for it"
    return f"reference ({reason})"


def backends(device: torch.device) -> dict[str, str]:  # for ops.backends()
    return {OP: backend(device)}


_backend = per_device_type(backend)


def int8_pack_weight(weight: Tensor) -> Tensor:
    """Pack an int8 OIHW weight for this device's kernel (the reference path keeps it as is)."""
    if _backend(weight.device.type).startswith("reference"):
        return weight
    return torch.ops.ddpm_perf.int8_pack_weight(weight)


def int8_conv2d(x: Tensor, packed_weight: Tensor, weight_colsum: Tensor, weight_scale: Tensor, bias: Tensor | None,
                x_scale: float, x_zero_point: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], out_dtype: torch.dtype | None = None) -> Tensor:
    """The quantised convolution; ``packed_weight`` from :func:`int8_pack_weight` on the same device."""
    if _backend(x.device.type).startswith("reference"):
        return reference.int8_conv2d(x, packed_weight, weight_scale, bias, x_scale, x_zero_point, stride, padding,
                                     out_dtype)
    return torch.ops.ddpm_perf.int8_conv2d(x, packed_weight, weight_colsum, weight_scale, bias, x_scale,
                                           x_zero_point, list(kernel_size), list(stride), list(padding), out_dtype)
