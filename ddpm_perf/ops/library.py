"""Loading the C++/CUDA operator library ``ddpm_perf._C``, and knowing why it is not there."""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch


@functools.cache
def load_extension() -> str | None:
    """Import ``ddpm_perf._C`` (registering ``torch.ops.ddpm_perf.*``). Returns None when it loaded,
    otherwise why not: not built, not loadable, or built for another torch version."""
    try:
        importlib.import_module("ddpm_perf._C")
    except ImportError as error:
        if "No module named" in str(error):
            return "ddpm_perf._C is not built (install with `pip install --no-build-isolation -e .` and a C++ compiler)"
        return f"ddpm_perf._C does not load ({error}); rebuild it against this torch"
    built_for = torch.ops.ddpm_perf.build_torch_version()
    if built_for != torch.__version__:
        return (f"ddpm_perf._C was built for torch {built_for} but torch {torch.__version__} is running; "
                "rebuild it with `pip install --no-build-isolation -e .`")
    return None


def extension_status() -> str:
    reason = load_extension()
    return "loaded" if reason is None else reason


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``torch.ops.ddpm_perf.<op>`` has a kernel for this device type here."""
    if load_extension() is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_perf::{op}", key)


@functools.cache
def triton_kernels():
    """The Triton kernels (``ddpm_perf_triton``) when Triton is installed and usable, else None."""
    try:
        import ddpm_perf_triton
    except ImportError:
        return None
    return ddpm_perf_triton if ddpm_perf_triton.available() is None else None


def kernel_backend(op: str, device: torch.device) -> str:
    """The backend of an op that has Triton, C++/CUDA and reference implementations: "triton" for
    CUDA tensors when the Triton kernels are usable, else "cpp"/"cuda" when ``ddpm_perf._C`` has a
    kernel for the device, else "reference (why)"."""
    if device.type == "cuda" and triton_kernels() is not None:
        return "triton"
    if has_kernel(op, device):
        return "cpp" if device.type == "cpu" else "cuda"
    reason = load_extension() or f"ddpm_perf._C has no {device.type} kernel for it"
    return f"reference ({reason})"


def per_device_type(backend: Callable[[torch.device], str]) -> Callable[[str], str]:
    """``backend`` looked up once per device type: the choice is fixed per process, and working it
    out (a dispatcher query, string building) cost ~4.5 us a call, as much as a small op's kernel.
    Marked constant, so torch.compile need not trace it."""
    chosen: dict[str, str] = {}

    @torch.compiler.assume_constant_result
    def lookup(device_type: str) -> str:
        if device_type not in chosen:
            chosen[device_type] = backend(torch.device(device_type))
        return chosen[device_type]

    return lookup
