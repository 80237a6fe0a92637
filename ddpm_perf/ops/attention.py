"""``attention``: single-head softmax attention over the U-Net's H*W tokens.

Backends: the Triton flash-attention kernel of ``ddpm_perf_triton`` for CUDA tensors when Triton
is installed; elsewhere torch's ``scaled_dot_product_attention``, whose CPU flash kernel is the
fastest forward measured here, except in training at up to ``MATH_MAX_TOKENS`` tokens, where two
batched matmuls around an fp32 softmax run forward + backward 1.2-1.7x faster than SDPA's flash
backward (docs/performance.md, "Training step") for an L x L score matrix that is small there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .library import triton_kernels

OP = "attention"
MATH_MAX_TOKENS = 1024  # the cifar10 U-Net's 16x16 attention: 256; celeba64's 16x16 too


@torch.compiler.assume_constant_result  # fixed per process: torch.compile need not trace the choice
def _backend(device_type: str) -> str:
    return backend(torch.device(device_type))


def backend(device: torch.device) -> str:
    if device.type == "cuda" and triton_kernels() is not None:
        return "triton"
    return f"sdpa (torch's fused attention kernel; in training at <= {MATH_MAX_TOKENS} tokens, matmuls + softmax)"


def _math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v as two batched matmuls; the softmax (and its saved output) in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for (B, L, d) tensors."""
    if _backend(q.device.type) == "triton":
        return triton_kernels().attention(q, k, v)
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if training and max(q.shape[-2], k.shape[-2]) <= MATH_MAX_TOKENS:
        return _math_attention(q, k, v)
    # As (B, heads=1, L, d): the 4-D form reaches SDPA's fused CPU kernel, 3-D takes the math path.
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
