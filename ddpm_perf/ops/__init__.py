"""Custom ops: ``torch.ops.ddpm_perf.*`` from the C++/CUDA library ``ddpm_perf._C``, the Triton
kernels of ``ddpm_perf_triton`` on CUDA, and the plain-PyTorch references of
:mod:`ddpm_perf.ops.reference` wherever neither is available.

Each op has a module here that registers its fake (meta) kernel and autograd formula, so
``torch.compile(fullgraph=True)`` traces through it, and exposes one function that picks the
backend for the tensors it is given. :func:`backends` says which backend each op has here, and why.
"""

from __future__ import annotations

import sys

import torch

from .library import extension_status, load_extension
from .group_norm_silu import group_norm_silu, group_norm_silu_quantized
from .int8_conv2d import int8_conv2d, int8_pack_weight
from .attention import attention
from .dropout import dropout

__all__ = ["backends", "extension_status", "load_extension", "group_norm_silu", "group_norm_silu_quantized",
           "int8_conv2d", "int8_pack_weight", "attention", "dropout"]


def backends(device: str = "cpu") -> dict[str, str]:
    """Which implementation each op uses on ``device`` here, with the reason."""
    # The op modules share their functions' names, so reach them through sys.modules.
    modules = (sys.modules[f"{__name__}.{name}"] for name in ("group_norm_silu", "int8_conv2d", "attention", "dropout"))
    return {op: found for module in modules for op, found in module.backends(torch.device(device)).items()}
