"""Triton kernels of the ddpm_perf ops (GPU; tested on the CPU under TRITON_INTERPRET=1).

Importing the package registers the operators ``ddpm_perf_triton::group_norm_silu`` (and its
uint8-output form ``group_norm_silu_quantized``), ``ddpm_perf_triton::attention`` and
``ddpm_perf_triton::dropout`` (and their backwards) if Triton is importable; without Triton the
package still imports and ``available()`` says why the kernels are missing.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["available", "attention", "dropout", "group_norm_silu", "group_norm_silu_quantized"]


def available() -> str | None:
    """None if the Triton kernels can be used here, else the reason they cannot."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error})"
    if not (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")):
        return f"torch {torch.__version__} has no torch.library.triton_op (needs torch >= 2.6)"
    return None


def _check_launchable(kernel, tensor: Tensor, op: str) -> None:
    """Raise a clear error instead of Triton's obscure one when the kernel cannot run on ``tensor``."""
    from triton.runtime.interpreter import InterpretedFunction

    # @triton.jit decides at decoration time, so TRITON_INTERPRET set after the import is too late.
    if tensor.device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(f"{op}: the Triton kernels need a GPU tensor; on the CPU they run only under the "
                           "Triton interpreter (TRITON_INTERPRET=1 set before ddpm_perf_triton's kernel "
                           "modules are imported)")


_REASON = available()
if _REASON is None:
    # Imported here, before the functions below are defined: importing a submodule binds its name
    # on the package, which would otherwise replace the functions of the same names.
    from . import attention as _attention_module  # noqa: E402
    from . import dropout as _dropout_module  # noqa: E402
    from . import group_norm_silu as _group_norm_silu_module  # noqa: E402


def _require() -> None:
    if _REASON is not None:
        raise RuntimeError(f"the ddpm_perf Triton kernels are unavailable: {_REASON}")


def group_norm_silu(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                    shift: Tensor | None = None, groups: int = 32, eps: float = 1e-5,
                    silu: bool = True) -> Tensor:
    """``silu(group_norm(x + shift[:, :, None, None]) * weight + bias)`` (differentiable); returns y."""
    _require()
    return _group_norm_silu_module.group_norm_silu_op(x, weight, bias, shift, groups, eps, silu)[0]


def group_norm_silu_quantized(x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor | None,
                              groups: int, eps: float, silu: bool, scale: float, zero_point: int) -> Tensor:
    """The same, quantised to uint8 with (scale, zero_point) for an int8 consumer (forward only)."""
    _require()
    return _group_norm_silu_module.group_norm_silu_quantized_op(x, weight, bias, shift, groups, eps, silu, scale,
                                                                zero_point)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over (..., L, d) tensors (differentiable); returns the output."""
    _require()
    return _attention_module.attention_op(q, k, v)[0]


def dropout(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """``keep ? x / (1 - p) : 0`` with a Philox mask keyed by ``seed`` (differentiable); returns y."""
    _require()
    return _dropout_module.dropout_op(x, seed, p)
