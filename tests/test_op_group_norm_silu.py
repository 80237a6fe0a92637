"""ddpm_perf::group_norm_silu (C++ CPU kernel) against the PyTorch reference: values, gradients,
opcheck, torch.compile(fullgraph=True), bad input; and the fused_norm plugin end to end."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from ddpm_perf import ops
from ddpm_perf.ops import reference

pytestmark = pytest.mark.skipif(ops.extension_status() != "loaded", reason=f"ddpm_perf._C: {ops.extension_status()}")

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make(n, c, h, w, groups, dtype, channels_last, affine=True, shift=True, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 2 + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, generator=g) if affine else None
    bias = torch.randn(c, generator=g) if affine else None
    s = torch.randn(n, c, generator=g) if shift else None
    return x, weight, bias, s


def kernel(x, weight, bias, shift, groups, silu, eps=1e-5):
    return torch.ops.ddpm_perf.group_norm_silu(x, weight, bias, shift, groups, eps, silu)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), groups=st.integers(1, 5), cpg=st.integers(1, 7), h=st.integers(1, 19),
       w=st.integers(1, 19), dtype=st.sampled_from([torch.float32, torch.bfloat16]), channels_last=st.booleans(),
       affine=st.booleans(), shift=st.booleans(), silu=st.booleans(), offset=st.sampled_from([0.0, 50.0]))
# groups of one value with a shift: x + shift - mean must be exactly 0, or rstd = 1/sqrt(eps) blows
# up its rounding error (found by hypothesis)
@example(n=2, groups=3, cpg=1, h=1, w=1, dtype=torch.float32, channels_last=False, affine=False, shift=True, silu=False,
         offset=0.0)
def test_forward_matches_reference(n, groups, cpg, h, w, dtype, channels_last, affine, shift, silu, offset):
    """Odd channel counts, one channel per group, H*W not a multiple of 16, batch 1, both layouts,
    and a large mean (offset) that a naive E[x^2] - E[x]^2 would cancel away."""
    x, weight, bias, s = make(n, groups * cpg, h, w, groups, dtype, channels_last, affine, shift, offset=offset)
    y, mean, rstd = kernel(x, weight, bias, s, groups, silu)
    y_ref, mean_ref, rstd_ref = reference.group_norm_silu(x, weight, bias, s, groups, 1e-5, silu)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(mean, mean_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, rstd_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape, groups", [((2, 96, 5, 7), 4), ((1, 160, 3, 16), 8), ((2, 200, 8, 5), 8),
                                           ((1, 512, 4, 4), 32), ((1, 384, 20, 15), 32)])
def test_forward_matches_reference_at_wide_channels(dtype, channels_last, shape, groups):
    """Whole blocks of 32 channels and a tail past them: the channels_last loops take a block's 32
    values at a time, in bf16 as its even and odd channels, with their parameters reordered to
    match (the fuzz above stays below 36 channels). (1, 384, 20, 15): the channels_last
    statistics in three blocks of 128 channels over a tile of 256 pixels and a last one of 44."""
    x, weight, bias, s = make(*shape, groups, dtype, channels_last, offset=3.0)
    y, mean, rstd = kernel(x, weight, bias, s, groups, True)
    y_ref, mean_ref, rstd_ref = reference.group_norm_silu(x, weight, bias, s, groups, 1e-5, True)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(mean, mean_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, rstd_ref, atol=1e-5, rtol=1e-4)


def assert_same_at_1_2_3_threads(x, weight, bias, shift, groups):
    """The op's three outputs are bit-identical at 1, 2 and 3 threads, and match the reference."""
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outputs.append(kernel(x, weight, bias, shift, groups, True))
    finally:
        torch.set_num_threads(threads)
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            assert torch.equal(a, b)
    y_ref, mean_ref, rstd_ref = reference.group_norm_silu(x, weight, bias, shift, groups, 1e-5, True)
    torch.testing.assert_close(outputs[0][0], y_ref, **TOL[x.dtype])
    torch.testing.assert_close(outputs[0][1], mean_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[0][2], rstd_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64, 8, 8), (2, 40, 32, 33), (2, 16, 32, 32), (2, 16, 64, 80)])
@pytest.mark.parametrize("shift", [False, True])
def test_statistics_do_not_depend_on_the_thread_count(dtype, shape, shift):
    """With AVX-512 the output loop also sums a slice ahead in the thread's stream (NCHW, H*W a
    multiple of 32): the next, or for slices of up to 4 KiB the one after it; a thread's first
    slices are summed on their own. Both must add in one order, or the outputs would change with
    the number of threads. At 8 groups: (3, 64, 8, 8) has 512-value slices (a lead of two);
    (2, 16, 32, 32) 2048 (two for bf16, one for fp32); (2, 40, 32, 33) 5280, flushed to fp64
    across a row (one run without a shift); (2, 16, 64, 80) two 5120-value rows, flushed inside a
    row (one run per row with a shift)."""
    x, weight, bias, s = make(*shape, 8, dtype, channels_last=False, shift=shift, offset=3.0)
    assert_same_at_1_2_3_threads(x, weight, bias, s, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 32, 32), (1, 96, 45, 37), (3, 32, 64, 16), (2, 40, 24, 24),
                                   (2, 512, 12, 12), (4, 256, 32, 32)])
def test_channels_last_slices_shared_out_in_parts(dtype, shape):
    """channels_last cuts each slice's output into pixel ranges of ~64 KiB, run as separate tasks by
    whichever thread takes them, after the slice's statistics (computed once, by the first). The
    slices and parts change with the thread count: (2, 64, 32, 32) fp32 is 4 parts of one 256 KiB
    slice per sample at 1 thread, 2 parts of 128 KiB slices at 2; (1, 96, 45, 37) has a pixel count
    that no part count divides; (2, 40, 24, 24) slices of 40 channels, not whole vectors of 32;
    (2, 512, 12, 12) rows of 1-2 KiB; (4, 256, 32, 32) samples of 0.5-1 MiB, whole-row slices at 1
    and 2 threads, blocks of half the channels at 3."""
    x, weight, bias, s = make(*shape, 8, dtype, channels_last=True, offset=3.0)
    assert_same_at_1_2_3_threads(x, weight, bias, s, 8)


@pytest.mark.parametrize("shape", [(8, 256, 32, 32), (8, 512, 28, 28), (9, 200, 48, 48)])
@pytest.mark.parametrize("silu", [False, True])
def test_streamed_outputs_are_the_cached_ones(shape, silu):
    """fp32 NCHW outputs of 8 MiB or more are written with non-temporal stores (kStreamBytes).
    One sample alone (1-2.5 MiB) takes the ordinary stores, so each sample of the whole batch must
    equal it bit for bit. (8, 256, 32, 32) runs the loop that also sums the next slice; 28x28 rows
    end in 16 values, a masked ordinary store; (9, 200, 48, 48) has groups of 25 channels."""
    groups = 8
    x, weight, bias, s = make(*shape, groups, torch.float32, channels_last=False, offset=1.0)
    assert x.nbytes >= 8 << 20
    y = kernel(x, weight, bias, s, groups, silu)[0]
    for i in (0, shape[0] // 2, shape[0] - 1):
        alone = kernel(x[i:i + 1], weight, bias, s[i:i + 1], groups, silu)[0]
        assert torch.equal(y[i:i + 1], alone), i
    if silu:  # and the same at 1, 2 and 3 threads, against the reference
        assert_same_at_1_2_3_threads(x, weight, bias, s, groups)
    else:
        torch.testing.assert_close(y, reference.group_norm_silu(x, weight, bias, s, groups, 1e-5, silu)[0],
                                   **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_groups_of_equal_values_give_exactly_the_bias(dtype, channels_last):
    """(x - mean) * scale + bias, not x * scale + (bias - mean * scale): the latter would miss the
    bias by the rounding of its offset times rstd = 1/sqrt(eps) = 316 (folding only slices with
    every |mean * scale| <= 4 was measured and not kept: docs/performance.md, session 22). Groups of
    4 channels; the first 8 constant, at 37.25, -3.5, 0 or 1e-3, the others random."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, 8, generator=g)
    values = torch.tensor([37.25, -3.5, 0.0, 1e-3])[(torch.arange(32) // 4) % 4]
    x[:, :32] = values[None, :, None, None]
    x = x.to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight, bias = 1 + 0.1 * torch.randn(64, generator=g), torch.randn(64, generator=g)
    y = kernel(x, weight, bias, None, 16, False)[0]
    assert torch.equal(y[:, :32], bias[:32].to(dtype)[None, :, None, None].expand(2, 32, 8, 8))
    torch.testing.assert_close(y, reference.group_norm_silu(x, weight, bias, None, 16, 1e-5, False)[0], **TOL[dtype])


EXTREME = [-1e30, -200.0, -89.0, -88.5, -85.0, -80.5, -79.5, -10.0, -1e-3, 0.0, 1e-3, 10.0, 79.5, 85.0, 200.0, 1e30]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_at_extreme_activations(dtype, channels_last):
    """Weight 0 makes the norm's output the bias, so the SiLU sees exactly these values, past the
    kernel's clamping (+-80 in the backward, +-1000 in the forward) and fp32's exponent range;
    inf and NaN too."""
    bias = torch.tensor(EXTREME + [-float("inf"), float("inf"), float("nan")])
    c = len(bias)
    x = torch.randn(2, c, 3, 5).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = kernel(x, torch.zeros(c), bias, None, c, True)[0]
    want = torch.nn.functional.silu(bias.to(dtype).float()).to(dtype)[None, :, None, None].expand_as(y)
    torch.testing.assert_close(y, want, atol=1e-30, rtol=1e-6 if dtype == torch.float32 else 1e-2, equal_nan=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_at_extreme_activations(channels_last):
    """Weight 100 puts z well beyond +-80, where silu' is 0 or 1 (the backward once clamped z
    to +80 for z < -80 and gave 1 there)."""
    x, _, _, s = make(2, 12, 5, 7, 3, torch.float32, channels_last)
    assert_gradients_match(x, torch.full((12,), 100.0), torch.zeros(12), s, 3, True, torch.randn(x.shape),
                           dict(atol=2e-3, rtol=1e-4))


def test_non_contiguous_input():
    x = torch.randn(2, 8, 10, 12)[:, :, ::2, 1:]  # a strided view, neither layout
    y = kernel(x, torch.ones(8), torch.zeros(8), None, 4, True)[0]
    torch.testing.assert_close(y, reference.group_norm_silu(x, torch.ones(8), torch.zeros(8), None, 4, 1e-5, True)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_gradients_match_reference(dtype, channels_last, silu):
    x, weight, bias, s = make(2, 12, 5, 7, 3, dtype, channels_last)
    tol = dict(atol=5e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=5e-2)
    assert_gradients_match(x, weight, bias, s, 3, silu, torch.randn(x.shape).to(dtype), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_gradients_do_not_depend_on_the_thread_count(dtype, channels_last, silu):
    """The backward's tasks ((sample, group) for NCHW, channel blocks for channels_last) are shared
    out as the forward's are: every task must run at any thread count, in particular at one thread,
    where no other thread takes the owner's chunks (it once ran only the first eighth there, leaving
    the rest of dx, dw and db uninitialised), and the gradients must be bit-identical."""
    x, weight, bias, s = make(4, 64, 8, 8, 8, dtype, channels_last, shift=True)
    grad = torch.randn(x.shape).to(dtype)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias, s)]
            ops.group_norm_silu(leaves[0], leaves[1], leaves[2], 8, 1e-5, silu, shift=leaves[3]).backward(grad)
            grads.append([t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
    tol = dict(atol=5e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=5e-2)
    assert_gradients_match(x, weight, bias, s, 8, silu, grad, tol)


def assert_gradients_match(x, weight, bias, shift, groups, silu, grad, tol):
    """The op's gradients of x, weight, bias and shift against the reference's, for ``grad``."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, shift)]
    ops.group_norm_silu(leaves[0], leaves[1], leaves[2], groups, 1e-5, silu, shift=leaves[3]).backward(grad)
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias, shift)]
    reference.group_norm_silu(*ref_leaves[:3], ref_leaves[3], groups, 1e-5, silu)[0].backward(grad)
    for name, got, want in zip(("x", "weight", "bias", "shift"), leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, **tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("with_shift", [False, True])
def test_opcheck(with_shift):
    x, weight, bias, s = make(2, 6, 4, 5, 3, torch.float32, False, shift=with_shift)
    x.requires_grad_(), weight.requires_grad_()
    torch.library.opcheck(torch.ops.ddpm_perf.group_norm_silu.default, (x, weight, bias, s, 3, 1e-5, True))
    torch.library.opcheck(torch.ops.ddpm_perf.group_norm_silu.default,
                          (x.detach().contiguous(memory_format=torch.channels_last), None, None, s, 3, 1e-5, False))


def test_backward_opcheck():
    x, weight, bias, s = make(2, 6, 4, 5, 3, torch.float32, False)
    _, mean, rstd = kernel(x, weight, bias, s, 3, True)
    torch.library.opcheck(torch.ops.ddpm_perf.group_norm_silu_backward.default,
                          (torch.randn_like(x), x, weight, bias, s, mean, rstd, 3, True))


def test_compile_fullgraph_traces_the_op_without_graph_breaks():
    x, weight, bias, s = make(2, 8, 6, 6, 4, torch.float32, True)

    def f(x, s):
        return ops.group_norm_silu(x, weight, bias, 4, 1e-5, True, shift=s) * 2

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, s), f(x, s))


@pytest.mark.parametrize("args, message", [
    (dict(x=torch.randn(2, 6, 4, 4).half()), "float32 and bfloat16"),
    (dict(groups=4), "not divisible into 4 groups"),
    (dict(weight=torch.ones(5)), "weight and bias must be"),
    (dict(shift=torch.ones(3, 6)), "shift must be"),
])
def test_bad_input_is_a_clear_error(args, message):
    call = dict(x=torch.randn(2, 6, 4, 4), weight=torch.ones(6), bias=None, shift=None, groups=3)
    call.update(args)
    with pytest.raises(RuntimeError, match=message):
        kernel(call["x"], call["weight"], call["bias"], call["shift"], call["groups"], True)


# ---- group_norm_silu_quantized: y as uint8 codes for int8_conv2d ----

def quantized_kernel(x, weight, bias, shift, groups, silu, scale, zero_point, eps=1e-5):
    return torch.ops.ddpm_perf.group_norm_silu_quantized(x, weight, bias, shift, groups, eps, silu, scale, zero_point)


def assert_codes_close(q, x, weight, bias, shift, groups, silu, scale, zero_point):
    """Codes equal to the reference's (from y in fp32), except one off where y / scale lies within
    the SiLU's error of a rounding boundary: the kernel's SiLU is the bf16 outputs' one, relative
    error <= 3.5e-4 (exponential and reciprocal), plus a little for the statistics' rounding."""
    y = reference.group_norm_silu(x.float(), weight, bias, shift, groups, 1e-5, silu)[0]
    ref = reference.quantize_activation(y, scale, zero_point)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    diff = (q.int() - ref.int()).abs()
    assert diff.max().item() <= 1
    t = y * (1.0 / scale)
    near_boundary = (t - t.floor() - 0.5).abs() <= 4e-4 * t.abs() + 2e-3
    unexplained = (diff > 0) & ~near_boundary
    assert not unexplained.any(), f"{unexplained.sum().item()} of {q.numel()} codes off away from a rounding boundary"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), groups=st.integers(1, 5), cpg=st.integers(1, 7), h=st.integers(1, 19),
       w=st.integers(1, 19), dtype=st.sampled_from([torch.float32, torch.bfloat16]), channels_last=st.booleans(),
       affine=st.booleans(), shift=st.booleans(), silu=st.booleans(), offset=st.sampled_from([0.0, 50.0]),
       scale=st.sampled_from([0.004, 0.02, 0.3]), zero_point=st.integers(0, 255))
def test_quantized_matches_reference(n, groups, cpg, h, w, dtype, channels_last, affine, shift, silu, offset, scale,
                                     zero_point):
    """The fuzz above, with the output quantised: the reference's codes, one off only next to a
    rounding boundary (assert_codes_close), in x's memory format."""
    x, weight, bias, s = make(n, groups * cpg, h, w, groups, dtype, channels_last, affine, shift, offset=offset)
    q = quantized_kernel(x, weight, bias, s, groups, silu, scale, zero_point)
    assert q.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_codes_close(q, x, weight, bias, s, groups, silu, scale, zero_point)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(8, 64, 32, 32), (2, 96, 5, 7), (2, 512, 4, 4)])
def test_quantized_codes_at_model_shapes(dtype, channels_last, shape):
    """At the sizes the U-Net quantises (and a tail past whole blocks of 32 channels): the
    reference's codes as assert_codes_close allows, the same at 1, 2 and 3 threads."""
    x, weight, bias, s = make(*shape, 8, dtype, channels_last, offset=3.0)
    scale, zero_point = 6 / 255, 21
    threads = torch.get_num_threads()
    try:
        outputs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outputs.append(quantized_kernel(x, weight, bias, s, 8, True, scale, zero_point))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
    assert_codes_close(outputs[0], x, weight, bias, s, 8, True, scale, zero_point)


@pytest.mark.parametrize("channels_last", [False, True])
def test_quantized_without_silu_is_the_int8_convs_own_quantisation(channels_last):
    """Without the SiLU the fp32 values are group_norm_silu's exactly, so the codes are bit for bit
    the ones int8_conv2d makes of its float output: the conv gives the same result on either."""
    x, weight, bias, s = make(2, 64, 9, 7, 8, torch.float32, channels_last)
    scale, zero_point = 0.02, 117
    y = kernel(x, weight, bias, s, 8, False)[0]
    q = quantized_kernel(x, weight, bias, s, 8, False, scale, zero_point)
    assert torch.equal(q, reference.quantize_activation(y, scale, zero_point))
    wq, w_scale = reference.quantize_weight(torch.randn(16, 64, 3, 3))
    conv = [torch.ops.ddpm_perf.int8_conv2d(t, ops.int8_pack_weight(wq), wq.flatten(1).sum(1).int(), w_scale, None,
                                            scale, zero_point, [3, 3], [1, 1], [1, 1]) for t in (y, q)]
    assert torch.equal(conv[0], conv[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_quantized_saturates_outside_the_range(dtype, channels_last, silu):
    """Values far below and above the quantised range (biases of -1e6 and 1e6, and 1e30 beyond
    the int32 range of the conversion) give codes 0 and 255 (the SiLU takes -1e6 to 0: the zero
    point)."""
    x, weight, _, _ = make(2, 64, 8, 8, 8, dtype, channels_last, shift=False)
    bias = torch.tensor([-1e6, 1e6, 1e30, 0.0]).repeat(16)
    q = quantized_kernel(x, weight, bias, None, 8, silu, 0.01, 128)
    assert (q[:, 0::4] == (128 if silu else 0)).all() and (q[:, 1::4] == 255).all() and (q[:, 2::4] == 255).all()
    assert_codes_close(q, x, weight, bias, None, 8, silu, 0.01, 128)


def test_quantized_opcheck():
    x, weight, bias, s = make(2, 6, 4, 5, 3, torch.float32, False)
    op = torch.ops.ddpm_perf.group_norm_silu_quantized.default
    torch.library.opcheck(op, (x, weight, bias, s, 3, 1e-5, True, 0.05, 30))
    torch.library.opcheck(op, (x.contiguous(memory_format=torch.channels_last), None, None, None, 3, 1e-5, False,
                               0.05, 30))


def test_quantized_compile_fullgraph():
    x, weight, bias, s = make(2, 8, 6, 6, 4, torch.float32, True)

    def f(x, s):
        return ops.group_norm_silu_quantized(x, weight, bias, 4, 1e-5, True, s, 0.02, 40)[:, :4]

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(x, s), f(x, s))


@pytest.mark.parametrize("scale, zero_point, message", [
    (0.0, 0, "scale must be positive and finite"),
    (float("nan"), 0, "scale must be positive and finite"),
    (0.1, 256, r"zero_point must be in \[0, 255\]"),
    (0.1, -1, r"zero_point must be in \[0, 255\]"),
])
def test_quantized_bad_input_is_a_clear_error(scale, zero_point, message):
    with pytest.raises(RuntimeError, match=message):
        quantized_kernel(torch.randn(2, 6, 4, 4), None, None, None, 3, True, scale, zero_point)


def test_an_extension_built_for_another_torch_is_refused(monkeypatch):
    """The build records its torch version; a different running torch means: do not use it."""
    from ddpm_perf.ops import library

    monkeypatch.setattr(torch, "__version__", "0.0.1")
    reason = library.load_extension.__wrapped__()  # uncached: the check itself
    assert reason is not None and "built for torch" in reason and "0.0.1" in reason
    assert "rebuild" in reason
