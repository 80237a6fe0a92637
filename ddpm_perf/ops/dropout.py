"""``dropout``: ``keep ? x / (1 - p) : 0`` with a counter-based (Philox4x32-10) mask.

The mask is computed in registers from (seed, element position) and never stored; the backward
is the same op on the gradient with the same seed. The seed is drawn from torch's generator for
x's device on every call, so runs stay reproducible under ``torch.manual_seed`` and a checkpointed
RNG state. Backends: Triton for CUDA tensors when Triton is installed, otherwise the C++ kernel
of ``ddpm_perf._C`` (CPU), otherwise :func:`ddpm_perf.ops.reference.dropout`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import kernel_backend, load_extension, per_device_type, triton_kernels

OP = "dropout"


def _register() -> None:
    @torch.library.register_fake("ddpm_perf::dropout")
    def _(x, seed, p):
        return torch.empty_like(x, memory_format=torch.preserve_format)

    def setup_context(ctx, inputs, output):
        _x, seed, p = inputs
        ctx.save_for_backward(seed)
        ctx.p = p

    def backward(ctx, grad_y):
        (seed,) = ctx.saved_tensors
        return torch.ops.ddpm_perf.dropout(grad_y, seed, ctx.p), None, None

    torch.library.register_autograd("ddpm_perf::dropout", backward, setup_context=setup_context)


if load_extension() is None:
    _register()


class _ReferenceDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, seed: int, p: float) -> Tensor:
        ctx.seed, ctx.p = seed, p
        return reference.dropout(x, seed, p)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        return reference.dropout(grad_y, ctx.seed, ctx.p), None, None


def backend(device: torch.device) -> str:
    return kernel_backend(OP, device)


def backends(device: torch.device) -> dict[str, str]:  # for ops.backends()
    return {OP: backend(device)}


_backend = per_device_type(backend)


def draw_seed(device: torch.device) -> Tensor:
    """A one-element int64 CPU tensor from the generator of ``device`` (the seed of one call)."""
    generator_device = device if device.type == "cuda" else "cpu"
    return torch.randint(2**62, (1,), device=generator_device).cpu()


def dropout(x: Tensor, p: float, training: bool = True, seed: Tensor | None = None) -> Tensor:
    """Dropout of an (N, C, ...) tensor with a Philox mask; identity when not ``training`` or p == 0.

    ``seed`` (a one-element int64 CPU tensor) fixes the mask; by default one is drawn from torch's
    generator. The mask depends on each element's (n, c, position), not on the memory layout.
    """
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    seed = draw_seed(x.device) if seed is None else seed
    kind = _backend(x.device.type)
    if kind == "triton":
        return triton_kernels().dropout(x, seed, p)
    if kind.startswith("reference") or x.dtype not in (torch.float32, torch.bfloat16):
        return _ReferenceDropout.apply(x, int(seed), p)
    return torch.ops.ddpm_perf.dropout(x, seed, p)
