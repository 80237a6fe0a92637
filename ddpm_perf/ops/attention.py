"""``attention``: single-head softmax attention over the U-Net's H*W tokens.

Backends: the Triton flash-attention kernel of ``ddpm_perf_triton`` for CUDA tensors when Triton
is installed; elsewhere the core's ``native_attention`` (torch's SDPA, or on the CPU in training
and in bf16 two matmuls around an fp32 softmax: ``ddpm_perf.model.attention``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.attention import describe, native_attention
from .library import per_device_type, triton_kernels

OP = "attention"


def backend(device: torch.device) -> str:
    if device.type == "cuda" and triton_kernels() is not None:
        return "triton"
    return describe()


def backends(device: torch.device) -> dict[str, str]:  # for ops.backends()
    return {OP: backend(device)}


_backend = per_device_type(backend)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for (B, L, d) tensors."""
    if _backend(q.device.type) == "triton":
        return triton_kernels().attention(q, k, v)
    return native_attention(q, k, v)
