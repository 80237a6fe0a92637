"""Single-head softmax attention with torch's own operators, in the form measured fastest here
(docs/performance.md, "Attention on the CPU"): SDPA's fused kernel, except on the CPU at up to
``MATH_MAX_TOKENS`` tokens
- in training, where two batched matmuls around an fp32 softmax run forward + backward 1.2-1.7x
  faster than SDPA's flash backward, and
- in bf16, where SDPA's CPU kernel runs no faster than in fp32 while the two matmuls reach the
  bf16 matmul rate (3x faster at 8 x 256 tokens x 256 channels).
The U-Net's ``AttnBlock`` calls it, and so does ``ddpm_perf.ops.attention`` where it has no kernel
of its own: the baseline is torch's fastest form, not a strawman for the kernels to beat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MATH_MAX_TOKENS = 1024  # the L x L scores the matmuls materialise stay small (cifar10, celeba64: 256)


def _math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v as two batched matmuls; the softmax (and its saved output) in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)


def prefers_matmuls(q: Tensor, k: Tensor, v: Tensor) -> bool:
    if q.device.type != "cpu" or max(q.shape[-2], k.shape[-2]) > MATH_MAX_TOKENS:
        return False
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return training or q.dtype == torch.bfloat16


def native_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for (B, L, d) tensors."""
    if prefers_matmuls(q, k, v):
        return _math_attention(q, k, v)
    # As (B, heads=1, L, d): the 4-D form reaches SDPA's fused CPU kernel, 3-D takes the math path.
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


def describe() -> str:
    return f"sdpa (torch's fused kernel; on the CPU in training or bf16 at <= {MATH_MAX_TOKENS} tokens, matmuls + fp32 softmax)"
