"""Flash attention (single head, no mask) in Triton: forward with online softmax, FA2-style backward.

Semantics: ``ddpm_perf.ops.reference.attention``, ``softmax(q k^T / sqrt(d)) v`` over (..., L, d);
leading dimensions (batch, heads) are flattened into one.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _check_launchable

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 512
_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # UPCAST is set only under TRITON_INTERPRET=1 with bf16: the interpreter keeps bf16 as uint16 and
    # multiplies the raw bits. Products of bf16 values are exact in fp32, so the result matches the
    # GPU's bf16 MMA with fp32 accumulation. ieee: tf32 would miss the reference's fp32 tolerance.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _attn_forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, Lq, Lk, D, qk_scale,
                         sqb, sql, sqd, skb, skl, skd, svb, svl, svd, sob, sol, sod,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq
    d_mask = offs_d < D  # d is padded to a power of two; the zero padding adds nothing to q k^T or p v
    q = tl.load(q_ptr + b * sqb + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = k_ptr + b * skb
    v_base = v_ptr + b * svb

    # Scores in log2 units (qk_scale = log2(e) / sqrt(d)) so the exponentials are exp2.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, Lk, BLOCK_N):
        n_idx = start + offs_n
        n_mask = n_idx < Lk
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + n_idx[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every block has a valid key, so m_new is finite and exp2(-inf - m_new) = 0 on the first one.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n_idx[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + offs_m[:, None] * sol + offs_d[None, :] * sod, acc.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    # Natural-log logsumexp of the scaled scores, the same quantity as torch's.
    tl.store(lse_ptr + b * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_mask)


@triton.jit
def _attn_backward_delta_kernel(o_ptr, do_ptr, delta_ptr, Lq, D, sob, sol, sod, sdb, sdl, sdd,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta_i = sum_j dO_ij O_ij = sum_j P_ij dP_ij, the row term of the softmax gradient.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(o_ptr + b * sob + offs_m[:, None] * sol + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(do_ptr + b * sdb + offs_m[:, None] * sdl + offs_d[None, :] * sdd, mask=mask, other=0.0)
    tl.store(delta_ptr + b * Lq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=offs_m < Lq)


@triton.jit
def _attn_backward_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                               Lq, Lk, D, qk_scale, sm_scale,
                               sqb, sql, sqd, skb, skl, skd, svb, svl, svd, sdb, sdl, sdd, sgb, sgl, sgd,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               UPCAST: tl.constexpr):
    # One program per key block, looping over query blocks: dk and dv stay in registers and are
    # written once, with no atomics (dq has its own kernel for the same reason).
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < Lk
    d_mask = offs_d < D
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + b * skb + offs_n[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * svb + offs_n[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, Lq, BLOCK_M):
        m_idx = start + offs_m
        m_mask = m_idx < Lq
        qo_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + b * sqb + m_idx[:, None] * sql + offs_d[None, :] * sqd, mask=qo_mask, other=0.0)
        do = tl.load(do_ptr + b * sdb + m_idx[:, None] * sdl + offs_d[None, :] * sdd, mask=qo_mask, other=0.0)
        lse2 = tl.load(lse_ptr + b * Lq + m_idx, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + b * Lq + m_idx, mask=m_mask, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST)
        dp = _dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST)
    dk = dk * sm_scale
    # dk and dv are allocated alike, so they share the strides (sgb, sgl, sgd).
    g_offs = b * sgb + offs_n[:, None] * sgl + offs_d[None, :] * sgd
    tl.store(dk_ptr + g_offs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + g_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_backward_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                             Lq, Lk, D, qk_scale, sm_scale,
                             sqb, sql, sqd, skb, skl, skd, svb, svl, svd, sdb, sdl, sdd, sgb, sgl, sgd,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq
    d_mask = offs_d < D
    qo_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * sqb + offs_m[:, None] * sql + offs_d[None, :] * sqd, mask=qo_mask, other=0.0)
    do = tl.load(do_ptr + b * sdb + offs_m[:, None] * sdl + offs_d[None, :] * sdd, mask=qo_mask, other=0.0)
    lse2 = tl.load(lse_ptr + b * Lq + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + b * Lq + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, Lk, BLOCK_N):
        n_idx = start + offs_n
        n_mask = n_idx < Lk
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + b * skb + n_idx[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * svb + n_idx[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * sgb + offs_m[:, None] * sgl + offs_d[None, :] * sgd, dq.to(dq_ptr.dtype.element_ty),
             mask=qo_mask)


def _upcast(q: Tensor) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return q.dtype == torch.bfloat16 and isinstance(_attn_forward_kernel, InterpretedFunction)


def _blocks(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): smaller tiles as d grows. Chosen so that ptxas reports
    no register spills for sm_80 (bf16); not timed on a GPU."""
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs every dimension >= 16
    if block_d <= 64:
        return 64, 64, block_d, 4
    if block_d <= 128:
        return 64, 32, block_d, 8
    if block_d <= 256:
        return 32, 32, block_d, 8
    return 32, 16, block_d, 8


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"attention: q, k, v must be (..., L, d) with the same number of dimensions, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or not q.shape[-1] == k.shape[-1] == v.shape[-1]:
        raise ValueError(f"attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)} (need q (..., Lq, d), k and v (..., Lk, d))")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share one of float32, bfloat16, float16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Triton "
                         "kernel (its tiles would not fit in registers); use the reference")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"attention: empty input (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")


def _flat(t: Tensor) -> Tensor:
    """(..., L, d) as (B, L, d): a view where possible; the kernels take any strides."""
    return t if t.dim() == 3 else t.reshape(-1, t.shape[-2], t.shape[-1])


@torch.library.triton_op("ddpm_perf_triton::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (out (..., Lq, d) in q's dtype, logsumexp of the scaled scores (..., Lq) fp32)."""
    _check(q, k, v)
    _check_launchable(_attn_forward_kernel, q, "attention")
    q3, k3, v3 = _flat(q), _flat(k), _flat(v)
    batch, lq, d = q3.shape
    lk = k3.shape[1]
    out = torch.empty((batch, lq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, lq), device=q.device, dtype=torch.float32)
    block_m, block_n, block_d, num_warps = _blocks(d)
    torch.library.wrap_triton(_attn_forward_kernel)[(triton.cdiv(lq, block_m), batch)](
        q3, k3, v3, out, lse, lq, lk, d, _LOG2E / math.sqrt(d),
        *q3.stride(), *k3.stride(), *v3.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=_upcast(q), num_warps=num_warps)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


@torch.library.triton_op("ddpm_perf_triton::attention_backward", mutates_args=())
def attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_q, grad_k, grad_v) from the forward's out and logsumexp."""
    _check(q, k, v)
    _check_launchable(_attn_backward_dq_kernel, q, "attention_backward")
    q3, k3, v3 = _flat(q), _flat(k), _flat(v)
    do3, o3 = _flat(grad_out), _flat(out)
    batch, lq, d = q3.shape
    lk = k3.shape[1]
    lse2 = lse.reshape(batch, lq).contiguous()
    dq = torch.empty((batch, lq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((batch, lk, d), device=q.device, dtype=q.dtype)
    dv = torch.empty((batch, lk, d), device=q.device, dtype=q.dtype)
    delta = torch.empty((batch, lq), device=q.device, dtype=torch.float32)
    block_m, block_n, block_d, num_warps = _blocks(d)
    torch.library.wrap_triton(_attn_backward_delta_kernel)[(triton.cdiv(lq, block_m), batch)](
        o3, do3, delta, lq, d, *o3.stride(), *do3.stride(), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    scales = (_LOG2E / math.sqrt(d), 1.0 / math.sqrt(d))
    torch.library.wrap_triton(_attn_backward_dkdv_kernel)[(triton.cdiv(lk, block_n), batch)](
        q3, k3, v3, do3, lse2, delta, dk, dv, lq, lk, d, *scales,
        *q3.stride(), *k3.stride(), *v3.stride(), *do3.stride(), *dk.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=_upcast(q), num_warps=num_warps)
    torch.library.wrap_triton(_attn_backward_dq_kernel)[(triton.cdiv(lq, block_m), batch)](
        q3, k3, v3, do3, lse2, delta, dq, lq, lk, d, *scales,
        *q3.stride(), *k3.stride(), *v3.stride(), *do3.stride(), *dq.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=_upcast(q), num_warps=num_warps)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    # The backward has no term for a gradient of the logsumexp; mark it instead of dropping one silently.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, _grad_lse: Optional[Tensor]):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.ddpm_perf_triton.attention_backward(grad_out, q, k, v, out, lse)
    return tuple(g if needed else None for g, needed in zip((dq, dk, dv), ctx.needs_input_grad))


torch.library.register_autograd("ddpm_perf_triton::attention", _backward, setup_context=_setup_context)
