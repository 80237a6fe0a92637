"""``attention``: single-head softmax attention over the U-Net's H*W tokens.

Backends: the Triton flash-attention kernel of ``ddpm_perf_triton`` for CUDA tensors when Triton
is installed; elsewhere torch's ``scaled_dot_product_attention``, whose CPU flash kernel is
the fastest correct path measured here (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .library import triton_kernels

OP = "attention"


@torch.compiler.assume_constant_result  # fixed per process: torch.compile need not trace the choice
def _backend(device_type: str) -> str:
    return backend(torch.device(device_type))


def backend(device: torch.device) -> str:
    if device.type == "cuda" and triton_kernels() is not None:
        return "triton"
    return "sdpa (torch's fused attention kernel)"


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for (B, L, d) tensors."""
    if _backend(q.device.type) == "triton":
        return triton_kernels().attention(q, k, v)
    # As (B, heads=1, L, d): the 4-D form reaches SDPA's fused CPU kernel, 3-D takes the math path.
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
