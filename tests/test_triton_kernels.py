"""The Triton kernels (ddpm_perf_triton) against ddpm_perf/ops/reference.py, in Triton's interpreter.

@triton.jit chooses the interpreter when a kernel is *defined*, and another test module may already
have imported ddpm_perf_triton in this process without TRITON_INTERPRET=1. So the checks run in one
subprocess (this file run as a script) that sets it before the import, and each test below reports
one check of that run. Shapes are small: the interpreter runs each program in Python.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback
import zlib

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton); the Triton kernels are "
                                     "tested in its CPU interpreter")

# dtype name -> (rtol, atol): fp32 ~1e-5 and bf16 ~2e-2 as in DESIGN.md; fp16 in between.
TOLERANCES = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2), "float16": (5e-3, 5e-3)}
_MARK = "TRITON-INTERPRETER-RESULTS: "

CASES: dict = {}  # check name -> function run in the interpreter subprocess


def _case(name, fn, *args, **kwargs):
    CASES[name] = functools.partial(fn, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Checks (run in the subprocess; torch and ddpm_perf_triton are imported there, inside them)

def _close(got, ref, dtype_name, what, scale_atol=True):
    """assert_close at the dtype's tolerance; atol grows with the reference's magnitude when
    ``scale_atol`` (gradients are sums over many elements, so their size varies)."""
    import torch

    rtol, atol = TOLERANCES[dtype_name]
    if scale_atol:
        atol *= max(1.0, ref.detach().float().abs().max().item())
    torch.testing.assert_close(got.detach().float(), ref.detach().float(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def _gn_check(shape, groups, channels_last, dtype_name, affine, use_shift, silu, offset=0.0,
              param_dtype_name="float32"):
    import torch

    import ddpm_perf_triton
    from ddpm_perf.ops import reference

    dtype, pdtype = getattr(torch, dtype_name), getattr(torch, param_dtype_name)
    n, c = shape[:2]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, groups, dtype_name)).encode()))
    x = (torch.randn(shape, generator=gen) * 2 + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, generator=gen) + 1).to(pdtype) if affine in ("wb", "w") else None
    bias = torch.randn(c, generator=gen).to(pdtype) if affine in ("wb", "b") else None
    shift = torch.randn(n, c, generator=gen).to(pdtype) if use_shift else None
    grad_y = torch.randn(shape, generator=gen).to(dtype)
    eps = 1e-5

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, shift)]
        y, mean, rstd = fn(*leaves, groups, eps, silu)
        y.backward(grad_y)
        return (y, mean, rstd), [t.grad if t is not None else None for t in leaves]

    (y, mean, rstd), grads = run(torch.ops.ddpm_perf_triton.group_norm_silu)
    (y_ref, mean_ref, rstd_ref), grads_ref = run(reference.group_norm_silu)

    assert y.dtype == dtype and y.shape == x.shape, (y.dtype, y.shape)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), f"y lost x's memory format: strides {y.stride()}"
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (n, groups)
    assert not mean.requires_grad and not rstd.requires_grad, "the statistics must be non-differentiable"
    _close(y, y_ref, dtype_name, "y", scale_atol=False)
    # The statistics are fp32 from the same inputs whatever x's dtype.
    _close(mean, mean_ref, "float32", "mean")
    _close(rstd, rstd_ref, "float32", "rstd")
    for name, got, ref in zip(("grad x", "grad weight", "grad bias", "grad shift"), grads, grads_ref):
        assert (got is None) == (ref is None), f"{name}: {got is None} vs reference {ref is None}"
        if ref is not None:
            assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, ref.dtype)
            _close(got, ref, dtype_name, name)
    assert grads[0].is_contiguous(memory_format=fmt), f"grad x lost x's memory format: {grads[0].stride()}"

    # The package-level convenience function returns just y.
    y2 = ddpm_perf_triton.group_norm_silu(x, weight, bias, shift, groups, eps, silu)
    assert torch.equal(y2, y.detach())


def _attention_check(q_shape, kv_shape, dtype_name, scale=1.0, transposed=False):
    import torch

    import ddpm_perf_triton
    from ddpm_perf.ops import reference

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((q_shape, kv_shape, dtype_name)).encode()))
    if transposed:  # as the U-Net makes them from NCHW: (B, C, HW) viewed as (B, HW, C)
        q = (torch.randn(q_shape[0], q_shape[2], q_shape[1], generator=gen) * scale).to(dtype).transpose(1, 2)
        k = torch.randn(kv_shape[0], kv_shape[2], kv_shape[1], generator=gen).to(dtype).transpose(1, 2)
        v = torch.randn(kv_shape[0], kv_shape[2], kv_shape[1], generator=gen).to(dtype).transpose(1, 2)
        assert not q.is_contiguous()
    else:
        q = (torch.randn(q_shape, generator=gen) * scale).to(dtype)
        k = torch.randn(kv_shape, generator=gen).to(dtype)
        v = torch.randn(kv_shape, generator=gen).to(dtype)
    grad_out = torch.randn(q_shape, generator=gen).to(dtype)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out[0].backward(grad_out) if isinstance(out, tuple) else out.backward(grad_out)
        return out, [t.grad for t in leaves]

    (out, lse), grads = run(torch.ops.ddpm_perf_triton.attention)
    out_ref, grads_ref = run(reference.attention)
    assert out.dtype == dtype and out.shape == q.shape, (out.dtype, out.shape)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1] and not lse.requires_grad
    _close(out, out_ref, dtype_name, "out", scale_atol=False)
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    _close(lse, torch.logsumexp(scores, dim=-1), dtype_name, "logsumexp")
    for name, got, ref in zip(("grad q", "grad k", "grad v"), grads, grads_ref):
        assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, got.shape, ref.shape)
        _close(got, ref, dtype_name, name)
    assert torch.equal(ddpm_perf_triton.attention(q, k, v), out.detach())


def _errors_check():
    import torch
    import triton
    import triton.language as tl

    import ddpm_perf_triton

    gn = torch.ops.ddpm_perf_triton.group_norm_silu
    attn = torch.ops.ddpm_perf_triton.attention
    x = torch.randn(2, 6, 3, 3)
    bad = [
        (ValueError, "do not split into 4 groups", lambda: gn(x, None, None, None, 4, 1e-5, True)),
        (TypeError, "float64", lambda: gn(x.double(), None, None, None, 3, 1e-5, True)),
        (ValueError, "shift must have shape (2, 6)", lambda: gn(x, None, None, torch.randn(6), 3, 1e-5, True)),
        (ValueError, "head dim 600 > 512", lambda: attn(*(torch.randn(1, 4, 600),) * 3)),
        (ValueError, "shapes do not match",
         lambda: attn(torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.randn(1, 6, 8))),
        (TypeError, "float64", lambda: attn(*(torch.randn(1, 4, 16, dtype=torch.float64),) * 3)),
    ]
    for error, fragment, call in bad:
        try:
            call()
        except error as e:
            assert fragment in str(e), f"{error.__name__} without {fragment!r}: {e}"
        else:
            raise AssertionError(f"no {error.__name__} ({fragment})")

    # A kernel compiled for a GPU (defined without TRITON_INTERPRET) refuses CPU tensors clearly.
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        @triton.jit
        def _compiled(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        ddpm_perf_triton._check_launchable(_compiled, x, "group_norm_silu")
    except RuntimeError as e:
        assert "TRITON_INTERPRET=1" in str(e), e
    else:
        raise AssertionError("no RuntimeError for a compiled kernel on CPU tensors")


def _dropout_check(shape, channels_last, dtype_name, p, seed):
    """The mask bit for bit, values to the dtype's rounding (the interpreter truncates fp32 to bf16
    where torch rounds to nearest), and the backward."""
    import torch

    import ddpm_perf_triton
    from ddpm_perf.ops import reference

    x = torch.randn(shape).to(getattr(torch, dtype_name))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = ddpm_perf_triton.dropout(x, torch.tensor([seed]), p)
    assert y.stride() == x.stride(), (y.stride(), x.stride())
    ref = reference.dropout(x.detach(), seed, p)
    assert torch.equal(y == 0, ref == 0), "the dropout mask differs from the reference"
    _close(y, ref, dtype_name, "dropout values", scale_atol=False)
    grad = torch.randn(shape).to(x.dtype)
    y.backward(grad)
    ref_grad = reference.dropout(grad, seed, p)
    assert torch.equal(x.grad == 0, ref_grad == 0), "the gradient's mask differs from the reference"
    _close(x.grad, ref_grad, dtype_name, "dropout gradient", scale_atol=False)


def _gn_quantized_check(shape, groups, channels_last, dtype_name, silu, scale, zero_point):
    """The uint8 output against the reference's codes (from y in fp32): tl.sigmoid is accurate, so
    a code may be one off only where y / scale sits at a rounding boundary."""
    import torch

    import ddpm_perf_triton
    from ddpm_perf.ops import reference

    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, groups, dtype_name, "q")).encode()))
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(getattr(torch, dtype_name))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight, bias, shift = torch.randn(c, generator=gen) + 1, torch.randn(c, generator=gen), torch.randn(shape[0], c)
    bias[0] = 1e30  # beyond the int32 range: must still saturate to 255
    q = ddpm_perf_triton.group_norm_silu_quantized(x, weight, bias, shift, groups, 1e-5, silu, scale, zero_point)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert q.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y = reference.group_norm_silu(x.float(), weight, bias, shift, groups, 1e-5, silu)[0]
    ref = reference.quantize_activation(y, scale, zero_point)
    diff = (q.int() - ref.int()).abs()
    t = y * (1.0 / scale)
    assert diff.max() <= 1 and not ((diff > 0) & ((t - t.floor() - 0.5).abs() > 1e-3)).any(), "codes off"
    assert (q[:, 0] == 255).all()


def _opcheck_check():
    import torch

    # Only the schema and autograd-registration checks: the fake-tensor ones (and torch.compile) cannot
    # run under the interpreter, which reads the data pointers of fake tensors (DESIGN.md, Custom ops).
    utils = ("test_schema", "test_autograd_registration")
    ops = torch.ops.ddpm_perf_triton
    x = torch.randn(2, 6, 3, 5, requires_grad=True)
    weight, bias, shift = torch.randn(6, requires_grad=True), torch.randn(6), torch.randn(2, 6, requires_grad=True)
    torch.library.opcheck(ops.group_norm_silu.default, (x, weight, bias, shift, 3, 1e-5, True), test_utils=utils)
    y, mean, rstd = ops.group_norm_silu(x.detach(), weight.detach(), bias, shift.detach(), 3, 1e-5, True)
    torch.library.opcheck(ops.group_norm_silu_backward.default,
                          (torch.randn_like(y), x.detach(), weight.detach(), bias, shift.detach(), mean, rstd, 3, True),
                          test_utils=("test_schema",))
    q = torch.randn(1, 20, 16, requires_grad=True)
    k, v = torch.randn(1, 9, 16), torch.randn(1, 9, 16, requires_grad=True)
    torch.library.opcheck(ops.attention.default, (q, k, v), test_utils=utils)
    out, lse = ops.attention(q.detach(), k, v.detach())
    torch.library.opcheck(ops.attention_backward.default, (torch.randn_like(out), q.detach(), k, v.detach(), out, lse),
                          test_utils=("test_schema",))
    torch.library.opcheck(ops.dropout.default, (x, torch.tensor([5]), 0.3), test_utils=utils)
    torch.library.opcheck(ops.group_norm_silu_quantized.default, (x.detach(), weight.detach(), bias, shift.detach(), 3,
                                                                  1e-5, True, 0.05, 20), test_utils=("test_schema",))


def _interpreter_check():
    from triton.runtime.interpreter import InterpretedFunction

    import ddpm_perf_triton

    assert ddpm_perf_triton.available() is None, ddpm_perf_triton.available()
    gn = sys.modules["ddpm_perf_triton.group_norm_silu"]
    attn = sys.modules["ddpm_perf_triton.attention"]
    drop = sys.modules["ddpm_perf_triton.dropout"]
    for kernel in (gn._gn_forward_kernel, gn._gn_backward_kernel, attn._attn_forward_kernel,
                   attn._attn_backward_dq_kernel, attn._attn_backward_dkdv_kernel, drop._dropout_kernel):
        assert isinstance(kernel, InterpretedFunction), f"{kernel} is not interpreted"
    # Importing a submodule must not replace the package's functions of the same names.
    assert callable(ddpm_perf_triton.group_norm_silu) and not isinstance(ddpm_perf_triton.attention, type(sys))


_case("interpreter_active", _interpreter_check)
_case("errors", _errors_check)
_case("opcheck", _opcheck_check)
# group_norm_silu: (shape, groups, channels_last, dtype, affine, shift, silu)
# Every combination of layout, affine, shift and silu on one small odd shape.
for _cl in (False, True):
    for _affine in ("wb", "w", "b", None):
        for _shift in (False, True):
            for _silu in (False, True):
                _case(f"gn-fp32-{'cl' if _cl else 'nchw'}-affine_{_affine}-shift_{int(_shift)}-silu_{int(_silu)}",
                      _gn_check, (2, 6, 3, 5), 3, _cl, "float32", _affine, _shift, _silu)
_case("gn-fp32-nchw-affine-shift-silu", _gn_check, (2, 6, 5, 7), 3, False, "float32", "wb", True, True)
_case("gn-fp32-cl-batch1-cpg1-odd_c", _gn_check, (1, 5, 9, 9), 5, True, "float32", "wb", True, False)
_case("gn-fp32-cl-plain-silu", _gn_check, (2, 15, 7, 5), 5, True, "float32", None, False, True)
_case("gn-fp32-nchw-weight_only-shift-offset", _gn_check, (3, 9, 6, 6), 3, False, "float32", "w", True, False,
      offset=5.0)
_case("gn-fp32-nchw-bias_only", _gn_check, (2, 4, 3, 3), 2, False, "float32", "b", False, True)
# HW = 2350 over 512-wide tiles (4 full, 1 partial); 260 channels per group over 128-wide chunks.
_case("gn-fp32-cl-many_hw_tiles", _gn_check, (2, 6, 50, 47), 2, True, "float32", "wb", True, True)
_case("gn-fp32-nchw-many_c_chunks", _gn_check, (1, 260, 3, 5), 1, False, "float32", "wb", True, True)
_case("gn-bf16-cl-affine-shift-silu", _gn_check, (2, 6, 5, 7), 2, True, "bfloat16", "wb", True, True)
_case("gn-bf16-nchw-bf16_params", _gn_check, (1, 10, 3, 11), 5, False, "bfloat16", "wb", True, True,
      param_dtype_name="bfloat16")
_case("gn-fp32-3d_input", _gn_check, (2, 6, 7), 3, False, "float32", "wb", True, True)
_case("gn-fp16-cl-plain", _gn_check, (2, 8, 4, 4), 4, True, "float16", None, False, False)
# group_norm_silu_quantized: (shape, groups, channels_last, dtype, silu, scale, zero_point)
_case("gn_quantized-fp32-nchw-silu", _gn_quantized_check, (2, 6, 5, 7), 3, False, "float32", True, 0.02, 30)
_case("gn_quantized-fp32-cl-no_silu", _gn_quantized_check, (2, 15, 7, 5), 5, True, "float32", False, 0.03, 128)
_case("gn_quantized-bf16-cl-silu", _gn_quantized_check, (1, 10, 3, 11), 5, True, "bfloat16", True, 0.01, 0)
# attention: (q shape, k/v shape, dtype); the blocks are 64 (d <= 64), 32 (d <= 256), 16 keys (d <= 512).
_case("attn-fp32-L37-d24", _attention_check, (2, 37, 24), (2, 37, 24), "float32")
_case("attn-fp32-batch1-L80-d40", _attention_check, (1, 80, 40), (1, 80, 40), "float32")
_case("attn-fp32-head_dim1-cross-L70x50", _attention_check, (2, 1, 70, 24), (2, 1, 50, 24), "float32")
_case("attn-fp32-L45-d130", _attention_check, (1, 45, 130), (1, 45, 130), "float32")
_case("attn-fp32-L21-d300", _attention_check, (1, 21, 300), (1, 21, 300), "float32")
_case("attn-fp32-peaked_scores", _attention_check, (1, 70, 32), (1, 70, 32), "float32", scale=6.0)
_case("attn-fp32-transposed_views", _attention_check, (2, 37, 24), (2, 37, 24), "float32", transposed=True)
_case("attn-bf16-L37-d24", _attention_check, (2, 37, 24), (2, 37, 24), "bfloat16")
_case("attn-bf16-L70-d128", _attention_check, (1, 70, 128), (1, 70, 128), "bfloat16")
_case("attn-fp32-one_query-d3", _attention_check, (1, 1, 3), (1, 5, 3), "float32")
_case("attn-fp16-L33-d16", _attention_check, (1, 33, 16), (1, 33, 16), "float16")
# dropout: (shape, channels_last, dtype, p, seed); C % 4 != 0, a seed with both 32-bit halves set
_case("dropout-fp32-nchw", _dropout_check, (2, 7, 5, 3), False, "float32", 0.3, 2**40 + 17)
_case("dropout-fp32-cl", _dropout_check, (2, 70, 3, 5), True, "float32", 0.5, 12345)
_case("dropout-bf16-cl", _dropout_check, (1, 9, 4, 4), True, "bfloat16", 0.1, 3)
_case("dropout-fp16-3d", _dropout_check, (2, 5, 33), False, "float16", 0.9, 2**62 - 1)


def _worker() -> None:
    """Run every check under the interpreter; print one JSON line of {name: (error or None, seconds)}."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before running this file as a script")
    import torch

    torch.set_num_threads(1)  # the interpreter's time is Python; extra threads only contend on 2 cores
    torch.manual_seed(0)
    results = {}
    for name, check in CASES.items():
        start = time.perf_counter()
        try:
            check()
            error = None
        except Exception:  # reported by the test of that name
            error = traceback.format_exc()
        results[name] = (error, round(time.perf_counter() - start, 3))
    print(_MARK + json.dumps(results), flush=True)


# ----------------------------------------------------------------------------------------------
# Tests (in pytest's process)

@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    assert proc.returncode == 0 and lines, f"interpreter run failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len(_MARK):])


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel(interpreter_results, name):
    assert name in interpreter_results, f"the interpreter run did not report {name}"
    error, _seconds = interpreter_results[name]
    if error is not None:
        pytest.fail(f"{name} under TRITON_INTERPRET=1:\n{error}", pytrace=False)


if __name__ == "__main__":
    _worker()
