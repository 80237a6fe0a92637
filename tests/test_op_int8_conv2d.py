"""ddpm_perf::int8_conv2d (AMX-INT8, AVX-512 VNNI and portable CPU kernels) against the PyTorch reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from ddpm_perf import ops
from ddpm_perf.ops import reference

pytestmark = pytest.mark.skipif(ops.extension_status() != "loaded", reason=f"ddpm_perf._C: {ops.extension_status()}")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2)}
OUT_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.uint8: torch.float32}


def activations(shape, dtype, generator=None):
    """Float activations, or uint8 ones (already quantised: every byte value occurs)."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return torch.randn(shape, generator=generator).to(dtype)


def quantized(o, c, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(o, c, k, k, generator=g)
    wq, scale = reference.quantize_weight(weight)
    return weight, wq, scale, torch.randn(o, generator=g), wq.flatten(1).sum(1).int()


def run(x, wq, scale, bias, colsum, x_scale, zp, k, stride, pad):
    packed = torch.ops.ddpm_perf.int8_pack_weight(wq)
    return torch.ops.ddpm_perf.int8_conv2d(x, packed, colsum, scale, bias, x_scale, zp, [k, k], [stride, stride],
                                           [pad, pad])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), c=st.integers(1, 21), o=st.integers(1, 70), hw=st.tuples(st.integers(1, 11), st.integers(1, 11)),
       k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.uint8]), channels_last=st.booleans(),
       with_bias=st.booleans(), zp=st.sampled_from([0, 3, 128, 255]))
def test_matches_reference(n, c, o, hw, k, stride, pad, dtype, channels_last, with_bias, zp):
    """Odd channel counts (not multiples of 4 or 16), output tails, 1x1 and 3x3, stride 2, batch 1;
    float x, and uint8 x already quantised (pointwise convs on whole groups of 4 channels read it
    in place, others copy it with the padding)."""
    h, w = hw
    if h + 2 * pad < k or w + 2 * pad < k:
        return
    _, wq, scale, bias, colsum = quantized(o, c, k)
    x = activations((n, c, h, w), dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = bias if with_bias else None
    y = run(x, wq, scale, bias, colsum, 0.02, zp, k, stride, pad)
    y_ref = reference.int8_conv2d(x, wq, scale, bias, 0.02, zp, (stride, stride), (pad, pad))
    assert y.dtype == OUT_DTYPE[dtype] and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, **TOL[OUT_DTYPE[dtype]])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), c=st.sampled_from([64, 128, 192]), o=st.sampled_from([16, 32, 48, 80]),
       hw=st.tuples(st.integers(1, 9), st.integers(1, 9)), k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       pad=st.sampled_from([0, 1]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.uint8]),
       with_bias=st.booleans(), zp=st.sampled_from([0, 128, 255]))
def test_matches_reference_at_tile_shapes(n, c, o, hw, k, stride, pad, dtype, with_bias, zp):
    """Channels in multiples of 64 and outputs in multiples of 16 (an odd number of 16-blocks too),
    stride 1: the shapes the AMX-INT8 path takes where the CPU has it (32 padded-row positions x
    32 outputs per block: rows narrower than a block, blocks across rows, dropped padding
    columns); stride 2 falls back to the vector path."""
    h, w = hw
    if h + 2 * pad < k or w + 2 * pad < k:
        return
    _, wq, scale, bias, colsum = quantized(o, c, k)
    x = activations((n, c, h, w), dtype).contiguous(memory_format=torch.channels_last)
    bias = bias if with_bias else None
    y = run(x, wq, scale, bias, colsum, 0.02, zp, k, stride, pad)
    y_ref = reference.int8_conv2d(x, wq, scale, bias, 0.02, zp, (stride, stride), (pad, pad))
    torch.testing.assert_close(y, y_ref, **TOL[OUT_DTYPE[dtype]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("k, stride, pad", [(3, 1, 1), (3, 2, 0), (3, 1, 0), (1, 1, 0)])
@pytest.mark.parametrize("shape", [(3, 20, 13, 9), (1, 20, 3, 3)], ids=["split-inside-images", "fewer-tiles-than-threads"])
def test_threads_split_images_anywhere_and_agree(k, stride, pad, shape, dtype):
    """Each thread quantises the input rows (k x k) or pixels (1 x 1) its own output pixels need:
    with 1 to 5 threads the work splits inside images at different rows, or leaves threads with
    empty chunks, and the results are bit-identical."""
    _, wq, scale, bias, colsum = quantized(37, 20, k)
    x = activations(shape, dtype).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3, 5):
            torch.set_num_threads(t)
            results.append(run(x, wq, scale, bias, colsum, 0.02, 7, k, stride, pad))
    finally:
        torch.set_num_threads(threads)
    for y in results[1:]:
        assert torch.equal(y, results[0])
    y_ref = reference.int8_conv2d(x, wq, scale, bias, 0.02, 7, (stride, stride), (pad, pad))
    torch.testing.assert_close(results[0], y_ref, **TOL[torch.float32])


@pytest.mark.parametrize("k, pad", [(3, 1), (1, 0)])
def test_threads_agree_at_tile_shapes(k, pad):
    """The AMX path splits (image, block, output pair) items between threads: bit-identical."""
    _, wq, scale, bias, colsum = quantized(48, 64, k)
    x = torch.randn(3, 64, 13, 9).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(run(x, wq, scale, bias, colsum, 0.02, 7, k, 1, pad))
    finally:
        torch.set_num_threads(threads)
    for y in results[1:]:
        assert torch.equal(y, results[0])
    torch.testing.assert_close(results[0], reference.int8_conv2d(x, wq, scale, bias, 0.02, 7, (1, 1), (pad, pad)),
                               **TOL[torch.float32])


def test_cifar10_shape_is_close_to_the_float_conv():
    """At a real layer's shape the int8 result stays within ~2% of the fp32 convolution."""
    weight, wq, scale, bias, colsum = quantized(128, 128, 3)
    x = F.silu(torch.randn(8, 128, 32, 32)).contiguous(memory_format=torch.channels_last)
    lo, hi = x.min().item(), x.max().item()
    x_scale, zp = (hi - lo) / 255, round(-lo / ((hi - lo) / 255))
    y = run(x, wq, scale, bias, colsum, x_scale, zp, 3, 1, 1)
    torch.testing.assert_close(y, reference.int8_conv2d(x, wq, scale, bias, x_scale, zp, (1, 1), (1, 1)),
                               atol=1e-4, rtol=1e-5)
    y_float = F.conv2d(x, weight, bias, 1, 1)
    assert ((y - y_float).norm() / y_float.norm()).item() < 0.02


def test_saturates_outside_the_calibrated_range():
    _, wq, scale, bias, colsum = quantized(16, 8, 1)
    x = torch.randn(2, 8, 4, 4) * 100  # far outside [-(zp) * s, (255 - zp) * s]
    y = run(x, wq, scale, bias, colsum, 0.01, 128, 1, 1, 0)
    torch.testing.assert_close(y, reference.int8_conv2d(x, wq, scale, bias, 0.01, 128, (1, 1), (0, 0)))


@pytest.mark.parametrize("c", [64, 8])  # the 64-wide loop and the 16-lane tail
def test_saturates_far_outside_the_int32_range(c):
    """x / x_scale beyond 2^31: vcvtps2dq makes INT_MIN of it, which clamped a huge positive value
    to code 0 instead of 255 before session 26."""
    _, wq, scale, bias, colsum = quantized(16, c, 1)
    x = torch.full((1, c, 2, 2), 1e12)
    x[0, 0, 0, 0], x[0, 1, 1, 1] = -1e12, float("inf")
    y = run(x.contiguous(memory_format=torch.channels_last), wq, scale, bias, colsum, 0.1, 10, 1, 1, 0)
    torch.testing.assert_close(y, reference.int8_conv2d(x, wq, scale, bias, 0.1, 10, (1, 1), (0, 0)))


def test_opcheck():
    _, wq, scale, bias, colsum = quantized(20, 6, 3)
    packed = torch.ops.ddpm_perf.int8_pack_weight(wq)
    torch.library.opcheck(torch.ops.ddpm_perf.int8_pack_weight.default, (wq,))
    for x in (torch.randn(2, 6, 5, 7), torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last),
              activations((2, 6, 5, 7), torch.uint8)):
        torch.library.opcheck(torch.ops.ddpm_perf.int8_conv2d.default,
                              (x, packed, colsum, scale, bias, 0.05, 100, [3, 3], [1, 1], [1, 1]))
    _, wq, scale, bias, colsum = quantized(20, 8, 1)  # a pointwise conv reads a uint8 x in place
    x = activations((2, 8, 5, 7), torch.uint8).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.ddpm_perf.int8_conv2d.default, (x, torch.ops.ddpm_perf.int8_pack_weight(wq), colsum,
                                                                    scale, bias, 0.05, 100, [1, 1], [1, 1], [0, 0]))


def test_compile_fullgraph_traces_the_op():
    _, wq, scale, bias, colsum = quantized(20, 6, 3)
    packed = ops.int8_pack_weight(wq)

    def f(x):
        return ops.int8_conv2d(x, packed, colsum, scale, bias, 0.05, 100, (3, 3), (1, 1), (1, 1)).relu()

    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(2, 8, 6, 6).half()), "float32, bfloat16 or uint8"),
    (dict(x=torch.zeros(2, 8, 6, 6, dtype=torch.int8)), "float32, bfloat16 or uint8"),
    (dict(x=torch.randn(2, 12, 6, 6)), "packed_weight does not match"),
    (dict(x=torch.randn(8, 6, 6)), "must be \\(N, C, H, W\\)"),
    (dict(x_scale=0.0), "x_scale must be positive"),
    (dict(zp=300), "x_zero_point must be in"),
    (dict(colsum=torch.zeros(16, dtype=torch.int64)), "weight_colsum must be int32"),
    (dict(colsum=torch.zeros(15, dtype=torch.int32)), "weight_colsum has 15 values and weight_scale 16"),
    (dict(x=torch.randn(1, 8, 1, 1), pad=0), "input smaller than the kernel"),
])
def test_bad_input_is_a_clear_error(change, message):
    _, wq, scale, bias, colsum = quantized(16, 8, 3)
    args = dict(x=torch.randn(2, 8, 6, 6), colsum=colsum, x_scale=0.1, zp=10, pad=1)
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        run(args["x"], wq, scale, bias, args["colsum"], args["x_scale"], args["zp"], 3, 1, args["pad"])


def test_pack_rejects_float_weights():
    with pytest.raises(RuntimeError, match="weight must be int8"):
        torch.ops.ddpm_perf.int8_pack_weight(torch.randn(4, 4, 3, 3))


def test_uint8_x_is_the_float_x_quantised():
    """A uint8 x is taken as already quantised with (x_scale, x_zero_point): the op on
    quantize_activation(x) gives, bit for bit, what it gives on the float x (whose quantisation is
    inside), for a pointwise conv read in place, one copied (channels not a multiple of 4) and a
    3x3 conv."""
    for c, k, pad in ((32, 1, 0), (30, 1, 0), (32, 3, 1)):
        _, wq, scale, bias, colsum = quantized(40, c, k)
        x = torch.randn(2, c, 9, 7).contiguous(memory_format=torch.channels_last)
        xq = reference.quantize_activation(x, 0.03, 117)
        y_float = run(x, wq, scale, bias, colsum, 0.03, 117, k, 1, pad)
        y_uint8 = run(xq, wq, scale, bias, colsum, 0.03, 117, k, 1, pad)
        assert y_uint8.dtype == torch.float32 and torch.equal(y_uint8, y_float), (c, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, pad", [(3, 1), (1, 0)])
def test_out_dtype_chooses_the_output_dtype(dtype, out_dtype, k, pad):
    """out_dtype overrides x's dtype (float32 for uint8) for the output: codes from a norm under
    autocast come out in bf16, as their float input would have."""
    _, wq, scale, bias, colsum = quantized(24, 20, k)
    x = activations((2, 20, 7, 6), dtype).contiguous(memory_format=torch.channels_last)
    packed = torch.ops.ddpm_perf.int8_pack_weight(wq)
    y = torch.ops.ddpm_perf.int8_conv2d(x, packed, colsum, scale, bias, 0.05, 9, [k, k], [1, 1], [pad, pad], out_dtype)
    assert y.dtype == out_dtype
    torch.testing.assert_close(y, reference.int8_conv2d(x, wq, scale, bias, 0.05, 9, (1, 1), (pad, pad), out_dtype),
                               **TOL[out_dtype])
    torch.library.opcheck(torch.ops.ddpm_perf.int8_conv2d.default,
                          (x, packed, colsum, scale, bias, 0.05, 9, [k, k], [1, 1], [pad, pad], out_dtype))


def test_out_dtype_float16_is_a_clear_error_on_the_cpu():
    _, wq, scale, bias, colsum = quantized(8, 4, 1)
    with pytest.raises(RuntimeError, match="writes float32 or bfloat16, got out_dtype Half"):
        torch.ops.ddpm_perf.int8_conv2d(torch.randn(1, 4, 3, 3), torch.ops.ddpm_perf.int8_pack_weight(wq), colsum,
                                        scale, bias, 0.1, 0, [1, 1], [1, 1], [0, 0], torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("k, pad", [(3, 1), (1, 0)])
def test_empty_batch_gives_an_empty_output(dtype, k, pad):
    """Batch 0 returns an empty (0, O, OH, OW) output, as F.conv2d does (it crashed the process
    with a division by zero in the work split before session 25)."""
    _, wq, scale, bias, colsum = quantized(16, 8, k)
    y = run(activations((0, 8, 5, 5), dtype), wq, scale, bias, colsum, 0.1, 3, k, 1, pad)
    assert y.shape == (0, 16, 5, 5) and y.dtype == OUT_DTYPE[dtype]
