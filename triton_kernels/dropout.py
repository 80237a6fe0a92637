"""Dropout with a counter-based Philox mask in Triton (the backward is the same op on the gradient).

Semantics: ``ddpm_perf.ops.reference.dropout``: element (n, c, s) takes word c % 4 of
Philox4x32-10(counter (n * S + s) * ceil(C / 4) + c // 4, key seed), whatever the layout. One
program per block of elements in memory order; NCHW and channels_last differ only in how a
memory index maps to (n, c, s).
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _check_launchable

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024


@triton.jit
def _dropout_kernel(x_ptr, y_ptr, seed_ptr, numel, C, S, threshold, scale,
                    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    if CHANNELS_LAST:
        c = i % C
        pixel = i // C
    else:
        c = (i // S) % C
        pixel = (i // (C * S)) * S + i % S
    counter = pixel * ((C + 3) // 4) + c // 4
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    w0, w1, w2, w3 = tl.philox(tl.load(seed_ptr), c0, c1, zero, zero)
    word = c % 4
    draw = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(draw >= threshold.to(tl.uint32), x * scale, 0.0)
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=mask)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@torch.library.triton_op("ddpm_perf_triton::dropout", mutates_args=())
def dropout_op(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """``keep ? x / (1 - p) : 0``, keep from the Philox draw of each element (see the module)."""
    if x.dim() < 2:
        raise ValueError(f"dropout: x must be (N, C, ...), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"dropout: x must be float32, bfloat16 or float16, got {x.dtype}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    _check_launchable(_dropout_kernel, x, "dropout")
    channels_last = _is_channels_last(x)
    x = x if channels_last else x.contiguous()
    y = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return y
    n, c = x.shape[:2]
    threshold = min(math.floor(p * 2**32 + 0.5), 2**32 - 1)
    # The seed is read in the kernel, not with .item() here: torch.compile traces this function
    # with fake tensors, whose values cannot be read.
    torch.library.wrap_triton(_dropout_kernel)[(triton.cdiv(numel, _BLOCK),)](
        x, y, seed.to(x.device), numel, c, numel // (n * c), threshold, 1.0 / (1.0 - p),
        CHANNELS_LAST=channels_last, BLOCK=_BLOCK)
    return y


def _setup_context(ctx, inputs, output):
    _x, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _backward(ctx, grad_y):
    (seed,) = ctx.saved_tensors
    return torch.ops.ddpm_perf_triton.dropout(grad_y, seed, ctx.p), None, None


torch.library.register_autograd("ddpm_perf_triton::dropout", _backward, setup_context=_setup_context)
