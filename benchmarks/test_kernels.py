"""Per-op kernel benchmarks of the C++ operator library ``ddpm_perf._C``, each a ratio to baselines
timed in the same run, interleaved round by round (skipped, with the reason, when the library is
not loaded: ``ddpm_perf.ops.extension_status()``).

``test_group_norm_silu``: ``torch.ops.ddpm_perf.group_norm_silu(x, weight, bias, None, 32, eps,
silu=True)`` against eager ``F.silu(F.group_norm(...))`` at the cifar10 U-Net's norm shapes
(batch 8, 32 groups; (8,128,32,32), (8,256,16,16), (8,256,8,8), (8,512,16,16), and the largest,
(8,256,32,32) and (8,384,32,32): their samples are 1-1.5 MiB in fp32, beyond the L2), fp32 and bf16
(weight and bias fp32, as the model's parameters stay under autocast), NCHW and channels_last,
cache warm and cold. ``test_group_norm_silu_compile`` (marked ``compile``) adds ``torch.compile``
of the same eager function (one compiled function per case: fresh code objects, so dynamo's
recompile limit never sends a case back to eager; checked). A timed sample is ``calls`` calls
(enough for ~32 MiB of traffic); between the op's samples the baselines each run an untimed call
and then their ``calls`` timed ones: eager (and compiled), a copy of the same size
(``dst.copy_(x)``: the bandwidth reachable at this size) and one copy of a large buffer (256 MiB
fp32, far beyond the L3: the DRAM bandwidth), first in each group. "warm": one input, re-read by
every call (it fits in the L3; the large copy precedes only the untimed calls). "cold": the calls
cycle through enough distinct inputs (one cursor shared by all, at least twice the L3) that no
input is in the L3 when it is read. Recorded: GB/s with bytes = read x + write y at x's dtype,
as a fraction of the large copy's GB/s (``bandwidth_fraction``) and of the same-size copy's
(``bandwidth_fraction_same_size_copy``); speedups (median of the round pairs, quartiles); the
deviation of the op's output, and of eager's and compiled's, from eager fp32 on the same
(dtype-rounded) input.

``test_silu_sequences``: the SiLU of the AVX-512 paths alone (benchmarks/silu_sequences.cpp, built
with g++ against csrc/cpu/silu.h): the kernel's one-division sequence against the rcp14 (+ Newton)
sequence it replaced, ns per 16 values on one thread, and each one's largest relative error.

``test_int8_conv2d``: each distinct conv of one cifar10 U-Net forward (found by hooking every
``nn.Conv2d`` of ``UNet(CONFIGS["cifar10"])`` in a meta-device forward at batch 8; ids name the
input C x H x W, output channels, kernel, stride, padding), on its input captured from a real
forward (seeded random weights, t = 500) and the layer's weights. Timed, interleaved:

* ``int8``: ``torch.ops.ddpm_perf.int8_conv2d`` (float in, float out: the quantisation of x and
  the dequantising epilogue are inside), weights from ``reference.quantize_weight`` (symmetric
  per output channel), packed once; x channels_last;
* ``fp32``: ``F.conv2d`` (oneDNN) on NCHW x (the eager model's layout) and ``fp32_cl`` on
  channels_last x and weight;
* ``ao_q``: torch.ao's x86 engine, ``torch.ops.quantized.conv2d`` on a quint8 channels_last x,
  output quint8 (the same int8 weights, per channel, ``conv2d_prepack``ed);
* ``ao_float``: the same with ``quantize_per_tensor`` before and ``dequantize`` after: float in,
  float out, like for like with ``int8``;
* ``int8_q``: ``int8_conv2d`` on ``ao_q``'s input, the quint8 x's uint8 codes (``int_repr``): x
  already quantised, as for ``ao_q``; the output is fp32 (``ao_q`` writes uint8, a quarter of the
  bytes). Like for like with ``ao_q`` on the input side.

Static quantisation for all: x's scale and zero point from the captured input's range (uint8,
affine), ao's output scale from the fp32 output's range. Recorded: per-call times, GOP/s (a
multiply-add counts 2), ratios (``speedup_vs_<variant>`` for ``int8``; ``int8_q_speedup_vs_ao_q`` for
``int8_q`` against ``ao_q``), ``count_in_model``, the deviation of ``int8`` from the fp32 conv
(and of ``ao_float``), and ``kernel_vs_reference_rel_dev``: the kernel against
``reference.int8_conv2d`` (exact integer maths; it must agree to rounding).

``test_int8_conv2d_model``: one timed sample of a variant runs every distinct conv ``count`` times
(so it is the sum of time x count over the model's 65 convs), interleaved the same way; the totals
and their ratios. ``summed_from_per_shape`` re-adds the per-shape medians (when those ran in the
same session) as a cross-check.

``test_norm_conv_codes``: a ResBlock's norm and the 3x3 conv it feeds (fp32 channels_last, batch
8, the model's ResBlock shapes): ``group_norm_silu_quantized`` writing uint8 codes and the conv
reading them, against ``group_norm_silu`` writing fp32 and the conv quantising it
(``speedup_vs_float_norm``); the two norms alone (``norm_codes_speedup_vs_float_norm``).

Rounds: the per-case benchmarks time twice conftest's rounds (DDPM_PERF_BENCH_ROUNDS, default 9)
pairs, the model total conftest's rounds.

The issue's targets are recorded beside the figures (``targets``, ``meets_*``), never asserted.
Smoke runs (DDPM_PERF_BENCH_SMOKE=1): the same cases at tiny sizes (norms at a quarter of the
channels and sides, batch 1; convs at batch 1 with the sides cut to 6), 1 call per sample,
4 MiB for the large copy, cold runs over 2 inputs.
"""

from __future__ import annotations

import collections
import math
import os
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddpm_perf import ops
from ddpm_perf.model.config import CONFIGS
from ddpm_perf.model.unet import UNet
from ddpm_perf.ops import reference

from conftest import build_cpp

EXTENSION = ops.extension_status()
pytestmark = [
    pytest.mark.skipif(EXTENSION != "loaded", reason=f"the ddpm_perf._C kernels are not available: {EXTENSION}"),
    # torch.ao's quantized tensors (the ao baseline) warn that they are deprecated
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
]

MODEL = "cifar10"
CONFIG = CONFIGS[MODEL]
GROUPS, EPS = CONFIG.num_groups, CONFIG.norm_eps
NORM_SHAPES = [(8, 128, 32, 32), (8, 256, 16, 16), (8, 256, 8, 8), (8, 512, 16, 16), (8, 256, 32, 32), (8, 384, 32, 32)]
GN_TARGETS = {"speedup_vs_eager": 2.5, "speedup_vs_compile": 1.2, "bandwidth_fraction": 0.70}
CONV_TARGETS = {"speedup_vs_fp32": 3.5, "speedup_vs_ao": 1.0}
LARGE_COPY_MIB = 256
LARGE_COPY_REPEATS = 3  # large copies timed (median) outside a case's interleaved rounds, not between them
TRAFFIC_PER_SAMPLE = 32 * 2**20  # bytes of a norm sample: sets its number of calls
CONV_OPS_PER_SAMPLE = 1e9  # operations of a conv sample
SHORT_ROUNDS_FACTOR = 2  # the per-case benchmarks are short: twice conftest's rounds (DDPM_PERF_BENCH_ROUNDS)


# -- the model's shapes (meta-device forward: no weights, no compute) ----------------------------

@dataclass(frozen=True)
class ConvKey:
    """One distinct convolution of the model, without the batch."""

    in_shape: tuple[int, int, int]  # C, H, W (H, W after the explicit pad of a Downsample)
    weight_shape: tuple[int, int, int, int]  # O, I, kh, kw
    stride: tuple[int, int]
    padding: tuple[int, int]

    @property
    def id(self) -> str:
        c, h, w = self.in_shape
        o, _, kh, kw = self.weight_shape
        return f"{c}x{h}x{w}-{o}o-k{kh}x{kw}s{self.stride[0]}p{self.padding[0]}"


def model_shapes() -> tuple[dict[ConvKey, int], dict[tuple[int, ...], int]]:
    """The distinct convs of one forward of the cifar10 U-Net at batch 8, with how often each runs,
    in order of first use; and the same count for the norms' input shapes."""
    convs: collections.Counter = collections.Counter()
    norms: collections.Counter = collections.Counter()
    with torch.device("meta"):
        model = UNet(CONFIG).eval()

    def conv_hook(module, args):
        convs[ConvKey(tuple(args[0].shape[1:]), tuple(module.weight.shape), tuple(module.stride),
                      tuple(module.padding))] += 1

    def norm_hook(module, args):
        norms[tuple(args[0].shape)] += 1

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(conv_hook)
        elif isinstance(module, torch.nn.GroupNorm):
            module.register_forward_pre_hook(norm_hook)
    with torch.no_grad():
        model(torch.empty(8, CONFIG.in_channels, CONFIG.image_size, CONFIG.image_size, device="meta"),
              torch.full((8,), 500, dtype=torch.long, device="meta"))
    return dict(convs), dict(norms)


CONV_COUNTS, NORM_COUNTS = model_shapes()
CONV_KEYS = list(CONV_COUNTS)
CONV_RESULTS: dict[ConvKey, dict[str, float]] = {}  # per-shape medians (s per call), for the total's cross-check


# -- timing: the op as the target of conftest's interleaved(), several baselines between ---------

class Baselines:
    """The baseline callable of ``timing.interleaved``: runs several functions, each timed alone
    (``calls`` timed calls after one untimed call if ``warm_call``), ``first`` always first and the
    others in an order rotated from group to group."""

    def __init__(self, fns: dict[str, tuple[Callable[[], object], int]], first: str | None = None,
                 warm_call: bool = True):
        self.fns, self.first, self.warm_call = fns, first, warm_call
        self.times: dict[str, list[float]] = {name: [] for name in fns}
        self.groups = 0

    def __call__(self) -> None:
        rest = [name for name in self.fns if name != self.first]
        k = self.groups % len(rest) if rest else 0
        order = ([self.first] if self.first else []) + rest[k:] + rest[:k]
        self.groups += 1
        for name in order:
            fn, calls = self.fns[name]
            if self.warm_call:
                fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            self.times[name].append(time.perf_counter() - start)

    def last(self, n: int) -> dict[str, list[float]]:
        """The samples paired with the target's last ``n`` (the warm-up round's dropped)."""
        return {name: times[-n:] for name, times in self.times.items()}


def time_calls(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds of each of n calls of fn."""
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def repeat(fn: Callable[[], object], calls: int) -> Callable[[], object]:
    def run():
        for _ in range(calls):
            out = fn()
        return out

    return run


def cycle(tensors: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The next tensor of the list at each call (one cursor for every function that shares it)."""
    state = {"i": 0}

    def next_tensor() -> torch.Tensor:
        i = state["i"]
        state["i"] = (i + 1) % len(tensors)
        return tensors[i]

    return next_tensor


def ratio(timing, target: list[float], baseline: list[float], name: str) -> dict[str, object]:
    """``speedup_vs_<name>``: baseline/target (median of the pair ratios), with quartiles."""
    r = timing.ratios(target, baseline)
    return {f"speedup_vs_{name}": 1 / r["paired"], f"speedup_vs_{name}_iqr": [1 / r["paired_q3"], 1 / r["paired_q1"]],
            f"speedup_vs_{name}_medians": 1 / r["median"]}


def l3_bytes() -> int:
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if size > 0:
            return size
    except (ValueError, OSError):
        pass
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().upper()
        return int(text.rstrip("KMB")) * {"K": 2**10, "M": 2**20}.get(text.rstrip("B")[-1], 1)
    except (OSError, ValueError, IndexError):
        return 32 * 2**20  # the project's machines


@pytest.fixture(scope="module")
def large_copy(bench):
    """One copy of a buffer far beyond the caches (read + write): the DRAM bandwidth."""
    numel = (4 if bench.smoke else LARGE_COPY_MIB) * 2**20 // 4
    src, dst = torch.randn(numel), torch.empty(numel)
    return (lambda: dst.copy_(src)), 2 * src.nbytes


def fill_info(info: dict, bench, **kw) -> None:
    """The standard keys for a kernel benchmark (conftest.REQUIRED_INFO), and the rest."""
    info.update(config=MODEL, parameters=None, mode="kernel", steps=1, images_per_s=None, image_steps_per_s=None,
                smoke=bench.smoke, outputs_change=True)
    info.update(kw)


# -- group_norm_silu -----------------------------------------------------------------------------

_COMPILED: dict[tuple, Callable] = {}


def _eager_gn_silu(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def compiled_gn_silu(key: tuple) -> tuple[Callable, bool]:
    """``torch.compile`` of ``_eager_gn_silu`` for one case, on its own copy of the code object
    (dynamo's caches and recompile limit are per code object). Returns it and whether it is new."""
    if key in _COMPILED:
        return _COMPILED[key], False
    name = "gn_silu_" + "_".join(str(k) for k in key).replace(" ", "").replace(",", "x")
    fn = types.FunctionType(_eager_gn_silu.__code__.replace(co_name=name), _eager_gn_silu.__globals__, name)
    _COMPILED[key] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[key], True


def norm_params():
    shapes = [pytest.param(s, id="x".join(map(str, s[1:]))) for s in NORM_SHAPES]
    return [pytest.mark.parametrize("shape", shapes), pytest.mark.parametrize("dtype", ["float32", "bfloat16"]),
            pytest.mark.parametrize("layout", ["nchw", "channels_last"]),
            pytest.mark.parametrize("cache", ["warm", "cold"])]


def with_params(marks):
    def apply(fn):
        for mark in reversed(marks):
            fn = mark(fn)
        return fn

    return apply


def run_group_norm_silu(benchmark, bench, timing, large_copy, shape, dtype, layout, cache, compiled: bool):
    if bench.smoke:
        n, c, h, w = shape
        shape = (1, c // 4, max(h // 4, 2), max(w // 4, 2))
    torch_dtype = getattr(torch, dtype)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randn(shape, generator=gen) * 1.5 + 0.3).to(torch_dtype).contiguous(memory_format=memory_format)
    weight = 1 + 0.2 * torch.randn(shape[1], generator=gen)
    bias = 0.2 * torch.randn(shape[1], generator=gen)
    nbytes = 2 * x0.nbytes  # read x, write y
    if cache == "cold":
        count = 2 if bench.smoke else math.ceil(2 * l3_bytes() / x0.nbytes) + 1
    else:
        count = 1
    inputs = [x0] + [x0.clone() for _ in range(count - 1)]  # distinct memory, same values
    next_x = cycle(inputs)
    calls = 1 if bench.smoke else max(1, min(64, round(TRAFFIC_PER_SAMPLE / nbytes)))
    dst = torch.empty_like(x0)

    def op():
        return torch.ops.ddpm_perf.group_norm_silu(next_x(), weight, bias, None, GROUPS, EPS, True)[0]

    def eager():
        return _eager_gn_silu(next_x(), weight, bias)

    fns = {"eager": (eager, calls), "copy_same": (lambda: dst.copy_(next_x()), calls)}
    info = benchmark.extra_info
    with torch.inference_mode():
        # deviations on the first input, outside the timing: the fp32 reference is eager fp32 on
        # the same (dtype-rounded) values
        ref = _eager_gn_silu(x0.float(), weight, bias)
        out, eager_out = torch.ops.ddpm_perf.group_norm_silu(x0, weight, bias, None, GROUPS, EPS, True)[0], \
            _eager_gn_silu(x0, weight, bias)
        assert out.dtype == torch_dtype and out.shape == x0.shape
        assert out.is_contiguous(memory_format=memory_format)
        dev = timing.deviation(out, ref, "group_norm_silu output")
        extra = {"eager_rel_dev": timing.deviation(eager_out, ref, "")["rel_dev"]}
        if compiled:
            from torch._dynamo.utils import counters

            fn, new = compiled_gn_silu((tuple(shape), dtype, layout))
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            compiled_out = fn(x0, weight, bias)
            extra["compile_seconds"] = time.perf_counter() - start if new else None
            assert not new or counters["stats"]["unique_graphs"] == graphs + 1, "torch.compile fell back to eager"
            extra["compiled_rel_dev"] = timing.deviation(compiled_out, ref, "")["rel_dev"]
            fns["compiled"] = ((lambda: fn(next_x(), weight, bias)), calls)
        # The large copy brackets the interleaved rounds instead of running between them: 512 MiB
        # streamed before every other sample slowed both the op and eager by up to ~40% and
        # scattered them (docs/performance.md, session 21), a perturbation no U-Net step makes.
        copy_seconds = time_calls(large_copy[0], LARGE_COPY_REPEATS)
        baselines = Baselines(fns)
        r = timing.interleaved(benchmark, repeat(op, calls), baselines, rounds=timing.rounds * SHORT_ROUNDS_FACTOR,
                               warm=op)
        copy_seconds += time_calls(large_copy[0], LARGE_COPY_REPEATS)
    base = baselines.last(len(r.target))
    med = {name: statistics.median(t) for name, t in base.items()}
    per_call = statistics.median(r.target) / calls
    gb_per_s = nbytes / per_call / 1e9
    large_gb_per_s = large_copy[1] / statistics.median(copy_seconds) / 1e9
    same_gb_per_s = nbytes * calls / med["copy_same"] / 1e9
    fill_info(
        info, bench, plugins="op:group_norm_silu", op="group_norm_silu", batch=shape[0], shape=list(shape),
        dtype=dtype, param_dtype="float32", memory_format=layout, cache=cache, groups=GROUPS, eps=EPS,
        count_in_model=NORM_COUNTS.get(tuple(shape), 0), calls_per_sample=calls, distinct_inputs=count,
        inputs_mib=count * x0.nbytes / 2**20, l3_mib=l3_bytes() / 2**20,
        seconds_per_step=per_call, eager_seconds_per_call=med["eager"] / calls,
        flops_per_image=0, gflop_per_s=None,  # a memory-bound op: FLOPs of norms are not counted
        bytes_per_call=nbytes, gb_per_s=gb_per_s, gb_per_s_best=nbytes / (min(r.target) / calls) / 1e9,
        eager_gb_per_s=nbytes * calls / med["eager"] / 1e9, copy_same_gb_per_s=same_gb_per_s,
        large_copy_gb_per_s=large_gb_per_s, large_copy_mib=large_copy[1] / 2 / 2**20,
        bandwidth_fraction=gb_per_s / large_gb_per_s, bandwidth_fraction_same_size_copy=gb_per_s / same_gb_per_s,
        **timing.speedup(r.target, base["eager"]),
        target_seconds=r.target, baseline_seconds=base, large_copy_seconds=copy_seconds, targets=GN_TARGETS,
        **dev, **extra,
    )
    info["meets_speedup_vs_eager"] = info["speedup_vs_eager"] >= GN_TARGETS["speedup_vs_eager"]
    info["meets_bandwidth_fraction"] = info["bandwidth_fraction"] >= GN_TARGETS["bandwidth_fraction"]
    line = (f"group_norm_silu {'x'.join(map(str, shape)):12s} {dtype:8s} {layout:13s} {cache:4s}: "
            f"{info['speedup_vs_eager']:5.2f}x eager")
    if compiled:
        info.update(mode="kernel vs compiled", **ratio(timing, r.target, base["compiled"], "compile"),
                    compiled_seconds_per_call=med["compiled"] / calls)
        info["meets_speedup_vs_compile"] = info["speedup_vs_compile"] >= GN_TARGETS["speedup_vs_compile"]
        line += f", {info['speedup_vs_compile']:5.2f}x compile"
    line += (f", {per_call * 1e6:7.1f} us, {gb_per_s:5.1f} GB/s = {info['bandwidth_fraction']:4.0%} of large copy "
             f"({large_gb_per_s:.1f}), {info['bandwidth_fraction_same_size_copy']:4.0%} of same-size copy "
             f"({same_gb_per_s:.1f}); rel dev {dev['rel_dev']:.1e}")
    timing.headline(line)
    assert dev["rel_dev"] < (1e-2 if dtype == "bfloat16" else 1e-5), dev


@with_params(norm_params())
def test_group_norm_silu(benchmark, bench, timing, large_copy, shape, dtype, layout, cache):
    run_group_norm_silu(benchmark, bench, timing, large_copy, shape, dtype, layout, cache, compiled=False)


@pytest.mark.compile
@with_params(norm_params())
def test_group_norm_silu_compile(benchmark, bench, timing, large_copy, shape, dtype, layout, cache):
    run_group_norm_silu(benchmark, bench, timing, large_copy, shape, dtype, layout, cache, compiled=True)


def test_silu_sequences(benchmark, bench, tmp_path):
    """The two ways to finish the AVX-512 SiLU of group_norm_silu (csrc/cpu/silu.h): one
    division, or rcp14 (plus a Newton step for fp32 outputs). The kernel divides for fp32 outputs
    and takes rcp14 for bf16 outputs. Alone on L1-resident values, one thread
    (benchmarks/silu_sequences.cpp). Records ns per 16 values, the division's speedups (below 1:
    rcp14 is faster) and the largest relative error of each fp32 sequence against fp64."""
    root = Path(__file__).resolve().parent
    exe = build_cpp(root / "silu_sequences.cpp", tmp_path / "silu_sequences", "avx512dq",
                    "-I", str(root.parent / "csrc" / "cpu"))
    runs: list[list[float]] = []
    reps = "200" if bench.smoke else "20000"
    benchmark.pedantic(lambda: runs.append([float(v) for v in subprocess.run(
        [str(exe), reps], capture_output=True, text=True, check=True).stdout.split()]),
        rounds=1 if bench.smoke else 3, iterations=1)
    ns = [statistics.median(r[i] for r in runs) for i in range(4)]
    error_division, error_reciprocal = runs[0][4], runs[0][5]
    fill_info(benchmark.extra_info, bench, plugins="op:group_norm_silu (SiLU alone)", op="silu16_fast", batch=1,
              shape=[4096], dtype="float32", device="cpu", threads=1, seconds_per_step=ns[0] * 1e-9,
              gflop_per_s=None, outputs_change=False,
              ns_per_16_values={"fp32 division": ns[0], "fp32 reciprocal": ns[1], "bf16-output division": ns[2],
                                "bf16-output reciprocal": ns[3]},
              speedup_fp32=ns[1] / ns[0], speedup_bf16_output=ns[3] / ns[2],
              max_rel_error_fp32={"division": error_division, "reciprocal": error_reciprocal})
    print(f"silu sequences: fp32 division {ns[0]:.2f} ns, reciprocal {ns[1]:.2f} ns ({ns[1] / ns[0]:.2f}x); "
          f"bf16 outputs {ns[2]:.2f} vs {ns[3]:.2f} ns ({ns[3] / ns[2]:.2f}x); max rel error fp32 "
          f"{error_division:.2e} vs {error_reciprocal:.2e}")
    # both fp32 sequences must stay within a few ulp of fp64 (the kernel's fp32 promise)
    assert 0 < error_division < 5e-7 and 0 < error_reciprocal < 5e-7, (error_division, error_reciprocal)


# -- int8_conv2d ---------------------------------------------------------------------------------

@dataclass
class ConvCase:
    key: ConvKey
    count: int
    flops: int  # of one call at this batch (a multiply-add = 2)
    calls: dict[str, Callable[[], torch.Tensor]]
    info: dict


@pytest.fixture(scope="module")
def ao_engine():
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    yield "x86"
    torch.backends.quantized.engine = previous


def uint8_params(t: torch.Tensor) -> tuple[float, int]:
    """Affine uint8 scale and zero point covering t's range (and 0)."""
    lo, hi = min(t.min().item(), 0.0), max(t.max().item(), 0.0)
    scale = max(hi - lo, 1e-8) / 255
    return scale, int(min(255, max(0, round(-lo / scale))))


def make_conv_case(key: ConvKey, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, timing) -> ConvCase:
    stride, padding, kernel = list(key.stride), list(key.padding), list(key.weight_shape[2:])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = weight.contiguous(memory_format=torch.channels_last)
    w_int8, w_scale = reference.quantize_weight(weight)
    packed = torch.ops.ddpm_perf.int8_pack_weight(w_int8)
    colsum = w_int8.flatten(1).sum(1).int()
    x_scale, x_zp = uint8_params(x)
    y32 = F.conv2d(x, weight, bias, key.stride, key.padding)
    out_scale, out_zp = uint8_params(y32)
    # ao: the same int8 weights and scales, as a per-channel qint8 tensor
    w_q = torch._make_per_channel_quantized_tensor(w_int8, w_scale.double(),
                                                   torch.zeros(w_int8.shape[0], dtype=torch.long), 0)
    ao_packed = torch.ops.quantized.conv2d_prepack(w_q, bias, stride, padding, [1, 1], 1)
    x_q = torch.quantize_per_tensor(x_cl, x_scale, x_zp, torch.quint8)
    x_u8 = x_q.int_repr().contiguous(memory_format=torch.channels_last)

    calls = {
        "int8": lambda: torch.ops.ddpm_perf.int8_conv2d(x_cl, packed, colsum, w_scale, bias, x_scale, x_zp, kernel,
                                                        stride, padding),
        "fp32": lambda: F.conv2d(x, weight, bias, key.stride, key.padding),
        "fp32_cl": lambda: F.conv2d(x_cl, w_cl, bias, key.stride, key.padding),
        "ao_q": lambda: torch.ops.quantized.conv2d(x_q, ao_packed, out_scale, out_zp),
        "ao_float": lambda: torch.ops.quantized.conv2d(torch.quantize_per_tensor(x_cl, x_scale, x_zp, torch.quint8),
                                                       ao_packed, out_scale, out_zp).dequantize(),
        "int8_q": lambda: torch.ops.ddpm_perf.int8_conv2d(x_u8, packed, colsum, w_scale, bias, x_scale, x_zp, kernel,
                                                          stride, padding),
    }
    y8 = calls["int8"]()
    assert y8.shape == y32.shape and y8.dtype == torch.float32 and y8.is_contiguous(memory_format=torch.channels_last)
    exact = reference.int8_conv2d(x_cl, w_int8, w_scale, bias, x_scale, x_zp, key.stride, key.padding)
    # on torch.ao's codes (which round a few values differently from quantize_activation) the op
    # must agree with the exact integer maths on those codes
    exact_q = reference.int8_conv2d(x_u8, w_int8, w_scale, bias, x_scale, x_zp, key.stride, key.padding)
    ao_dev = timing.deviation(calls["ao_float"](), y32, "")
    info = {**timing.deviation(y8, y32, "conv output vs fp32 F.conv2d"),
            "kernel_vs_reference_rel_dev": timing.deviation(y8, exact, "")["rel_dev"],
            "int8_q_kernel_vs_reference_rel_dev": timing.deviation(calls["int8_q"](), exact_q, "")["rel_dev"],
            "ao_float_rel_dev": ao_dev["rel_dev"], "ao_float_max_abs_dev": ao_dev["max_abs_dev"],
            "x_scale": x_scale, "x_zero_point": x_zp, "ao_out_scale": out_scale, "ao_out_zero_point": out_zp}
    flops = 2 * y32.numel() * key.weight_shape[1] * key.weight_shape[2] * key.weight_shape[3]
    return ConvCase(key, CONV_COUNTS[key], flops, calls, info)


@pytest.fixture(scope="module")
def conv_cases(bench, timing, ao_engine) -> dict[ConvKey, ConvCase]:
    """Every distinct conv on its input captured from a real forward of the cifar10 U-Net (seeded
    random weights; batch 8, smoke: batch 1 with the sides cut to 6)."""
    batch = 1 if bench.smoke else 8
    torch.manual_seed(bench.seed)
    model = UNet(CONFIG).eval()
    captured: dict[ConvKey, tuple] = {}

    def hook(module, args):
        x = args[0]
        key = ConvKey(tuple(x.shape[1:]), tuple(module.weight.shape), tuple(module.stride), tuple(module.padding))
        if key not in captured:
            captured[key] = (x.detach().clone(), module.weight.detach().clone(), module.bias.detach().clone())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    gen = torch.Generator().manual_seed(bench.seed)
    with torch.inference_mode():
        model(torch.randn(batch, CONFIG.in_channels, CONFIG.image_size, CONFIG.image_size, generator=gen),
              torch.full((batch,), 500, dtype=torch.long))
    for h in handles:
        h.remove()
    del model
    assert set(captured) == set(CONV_KEYS), "the real forward ran other convs than the meta one"
    cases = {}
    with torch.inference_mode():
        for key in CONV_KEYS:
            x, weight, bias = captured.pop(key)
            if bench.smoke:
                x = x[:, :, :6, :6].contiguous()
            cases[key] = make_conv_case(key, x, weight, bias, timing)
    return cases


CONV_VARIANTS = ("fp32", "fp32_cl", "ao_q", "ao_float", "int8_q")


def conv_ratios(timing, target: list[float], base: dict[str, list[float]]) -> dict[str, object]:
    out = timing.speedup(target, base["fp32"])  # speedup_vs_eager: against eager fp32 (NCHW) F.conv2d
    for name in CONV_VARIANTS:
        out.update(ratio(timing, target, base[name], name))
    out.update({f"int8_q_{k}": v for k, v in ratio(timing, base["int8_q"], base["ao_q"], "ao_q").items()})
    return out


def conv_meets(info: dict) -> dict[str, bool]:
    return {"meets_speedup_vs_fp32": info["speedup_vs_fp32"] >= CONV_TARGETS["speedup_vs_fp32"],
            "meets_speedup_vs_fp32_cl": info["speedup_vs_fp32_cl"] >= CONV_TARGETS["speedup_vs_fp32"],
            "meets_speedup_vs_ao_float": info["speedup_vs_ao_float"] >= CONV_TARGETS["speedup_vs_ao"],
            "meets_speedup_vs_ao_q": info["speedup_vs_ao_q"] >= CONV_TARGETS["speedup_vs_ao"],
            "meets_int8_q_speedup_vs_ao_q": info["int8_q_speedup_vs_ao_q"] >= CONV_TARGETS["speedup_vs_ao"]}


@pytest.mark.parametrize("key", [pytest.param(k, id=k.id) for k in CONV_KEYS])
def test_int8_conv2d(benchmark, bench, timing, conv_cases, key):
    case = conv_cases[key]
    calls = 1 if bench.smoke else max(1, min(64, round(CONV_OPS_PER_SAMPLE / case.flops)))
    baselines = Baselines({name: (case.calls[name], calls) for name in CONV_VARIANTS})
    with torch.inference_mode():
        r = timing.interleaved(benchmark, repeat(case.calls["int8"], calls), baselines,
                               rounds=timing.rounds * SHORT_ROUNDS_FACTOR, warm=case.calls["int8"])
    base = baselines.last(len(r.target))
    per_call = {"int8": statistics.median(r.target) / calls,
                **{name: statistics.median(t) / calls for name, t in base.items()}}
    CONV_RESULTS[key] = per_call
    info = benchmark.extra_info
    output_pixels = case.flops // (2 * math.prod(key.weight_shape))  # N * OH * OW
    n = 1 if bench.smoke else 8
    c, h, w = key.in_shape
    if bench.smoke:
        h, w = min(h, 6), min(w, 6)
    x_shape = [n, c, h, w]
    gops = {name: case.flops / t / 1e9 for name, t in per_call.items()}
    fill_info(
        info, bench, plugins="op:int8_conv2d", op="int8_conv2d", batch=n, shape=x_shape, dtype="int8",
        weight_shape=list(key.weight_shape), stride=list(key.stride), padding=list(key.padding),
        output_pixels=output_pixels, memory_format="channels_last (fp32: NCHW and channels_last)",
        ao_engine=torch.backends.quantized.engine, count_in_model=case.count, calls_per_sample=calls,
        seconds_per_step=per_call["int8"], seconds_per_call=per_call, gop_per_s=gops,
        flops_per_image=case.flops / n, gflop_per_s=gops["int8"],
        **conv_ratios(timing, r.target, base), target_seconds=r.target, baseline_seconds=base,
        targets=CONV_TARGETS, **case.info,
    )
    info.update(conv_meets(info))
    timing.headline(
        f"int8_conv2d {key.id:26s} x{case.count:<2d}: int8 {per_call['int8'] * 1e3:7.3f} ms {gops['int8']:4.0f} GOP/s; "
        f"fp32 {per_call['fp32'] * 1e3:7.3f} ms ({info['speedup_vs_fp32']:4.2f}x), fp32 CL "
        f"{info['speedup_vs_fp32_cl']:4.2f}x, ao q {info['speedup_vs_ao_q']:4.2f}x, ao float "
        f"{info['speedup_vs_ao_float']:4.2f}x; uint8 in {per_call['int8_q'] * 1e3:7.3f} ms, "
        f"{info['int8_q_speedup_vs_ao_q']:4.2f}x ao q; rel err {info['rel_dev']:.1e}")
    assert info["kernel_vs_reference_rel_dev"] < 1e-5, info["kernel_vs_reference_rel_dev"]
    assert info["int8_q_kernel_vs_reference_rel_dev"] < 1e-5, info["int8_q_kernel_vs_reference_rel_dev"]
    assert info["rel_dev"] < 0.05, info["rel_dev"]


def test_int8_conv2d_model(benchmark, bench, timing, conv_cases):
    """All of the model's convs: one sample = every distinct conv ``count`` times."""
    cases = [conv_cases[k] for k in CONV_KEYS]

    def sequence(name: str) -> Callable[[], None]:
        fns = [(case.calls[name], case.count) for case in cases]

        def run() -> None:
            for fn, count in fns:
                for _ in range(count):
                    fn()

        return run

    baselines = Baselines({name: (sequence(name), 1) for name in CONV_VARIANTS}, warm_call=False)
    with torch.inference_mode():
        r = timing.interleaved(benchmark, sequence("int8"), baselines)
    base = baselines.last(len(r.target))
    total = {"int8": statistics.median(r.target), **{name: statistics.median(t) for name, t in base.items()}}
    flops = sum(case.flops * case.count for case in cases)
    n = 1 if bench.smoke else 8
    info = benchmark.extra_info
    worst = max(cases, key=lambda case: case.info["rel_dev"])
    summed = None
    if all(k in CONV_RESULTS for k in CONV_KEYS):
        summed = {name: sum(CONV_RESULTS[k][name] * CONV_COUNTS[k] for k in CONV_KEYS)
                  for name in ("int8",) + CONV_VARIANTS}
        summed["speedup_vs_fp32"] = summed["fp32"] / summed["int8"]
        summed["speedup_vs_fp32_cl"] = summed["fp32_cl"] / summed["int8"]
        summed["speedup_vs_ao_q"] = summed["ao_q"] / summed["int8"]
        summed["speedup_vs_ao_float"] = summed["ao_float"] / summed["int8"]
        summed["int8_q_speedup_vs_ao_q"] = summed["ao_q"] / summed["int8_q"]
    fill_info(
        info, bench, plugins="op:int8_conv2d", op="int8_conv2d (all convs of one forward)", batch=n,
        shape=[n, CONFIG.in_channels, CONFIG.image_size, CONFIG.image_size] if not bench.smoke else [n, "smoke"],
        dtype="int8", convs=sum(CONV_COUNTS.values()), distinct_convs=len(cases),
        ao_engine=torch.backends.quantized.engine, seconds_per_step=total["int8"], seconds_total=total,
        gop_per_s={name: flops / t / 1e9 for name, t in total.items()}, flops_per_image=flops / n,
        gflop_per_s=flops / total["int8"] / 1e9, **conv_ratios(timing, r.target, base), target_seconds=r.target,
        baseline_seconds=base, targets=CONV_TARGETS, summed_from_per_shape=summed,
        **{k: worst.info[k] for k in ("rel_dev", "max_abs_dev", "mean_abs_dev")},
        deviation_of=f"conv output vs fp32 F.conv2d, worst of the distinct convs ({worst.key.id})",
        rel_dev_per_conv={case.key.id: case.info["rel_dev"] for case in cases},
        max_kernel_vs_reference_rel_dev=max(case.info["kernel_vs_reference_rel_dev"] for case in cases),
    )
    info.update(conv_meets(info))
    timing.headline(
        f"int8_conv2d model total ({info['convs']} convs, batch {n}): int8 {total['int8'] * 1e3:.1f} ms, fp32 "
        f"{total['fp32'] * 1e3:.1f} ms ({info['speedup_vs_fp32']:.2f}x), fp32 CL {total['fp32_cl'] * 1e3:.1f} ms "
        f"({info['speedup_vs_fp32_cl']:.2f}x), ao q {total['ao_q'] * 1e3:.1f} ms ({info['speedup_vs_ao_q']:.2f}x), "
        f"ao float {total['ao_float'] * 1e3:.1f} ms ({info['speedup_vs_ao_float']:.2f}x); uint8 in "
        f"{total['int8_q'] * 1e3:.1f} ms ({info['int8_q_speedup_vs_ao_q']:.2f}x ao q); worst rel err "
        f"{info['rel_dev']:.1e}")


# -- a norm handing its conv uint8 codes -----------------------------------------------------------

# (channels, side) of a ResBlock norm of the model at batch 8 -> the 3x3 conv it feeds (out channels)
CODES_PAIRS = [((128, 32), 128), ((256, 32), 128), ((384, 32), 128), ((256, 16), 256), ((512, 16), 256),
               ((256, 8), 256), ((512, 4), 256)]


@pytest.mark.parametrize("pair", [pytest.param(p, id=f"{p[0][0]}x{p[0][1]}-{p[1]}o") for p in CODES_PAIRS])
def test_norm_conv_codes(benchmark, bench, timing, pair):
    """group_norm_silu then a 3x3 int8_conv2d, fp32 channels_last, as a ResBlock runs them: the norm
    writing uint8 codes (``group_norm_silu_quantized``, the conv reading them) against the norm
    writing fp32 (the conv quantising it), interleaved. ``speedup_vs_float_norm``; the norms alone
    (``norm_codes_speedup_vs_float_norm``); the conv's outputs must agree to the codes' rounding."""
    (c, side), o = pair
    n, side = (1, min(side, 6)) if bench.smoke else (8, side)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, side, side, generator=gen) * 1.5 + 0.3).contiguous(memory_format=torch.channels_last)
    weight, bias = 1 + 0.2 * torch.randn(c, generator=gen), 0.2 * torch.randn(c, generator=gen)
    w_float = torch.randn(o, c, 3, 3, generator=gen)
    w_int8, w_scale = reference.quantize_weight(w_float)
    packed, colsum = torch.ops.ddpm_perf.int8_pack_weight(w_int8), w_int8.flatten(1).sum(1, dtype=torch.int32)
    y = torch.ops.ddpm_perf.group_norm_silu(x, weight, bias, None, GROUPS, EPS, True)[0]
    lo, hi = min(y.min().item(), 0.0), max(y.max().item(), 0.0)
    x_scale = (hi - lo) / 255
    x_zp = round(-lo / x_scale)

    def conv(v):
        return torch.ops.ddpm_perf.int8_conv2d(v, packed, colsum, w_scale, None, x_scale, x_zp, [3, 3], [1, 1], [1, 1])

    def norm_float():
        return torch.ops.ddpm_perf.group_norm_silu(x, weight, bias, None, GROUPS, EPS, True)[0]

    def norm_codes():
        return torch.ops.ddpm_perf.group_norm_silu_quantized(x, weight, bias, None, GROUPS, EPS, True, x_scale, x_zp)

    calls = 1 if bench.smoke else 4
    baselines = Baselines({"float": (lambda: conv(norm_float()), calls), "norm_float": (norm_float, calls),
                           "norm_codes": (norm_codes, calls)})
    with torch.inference_mode():
        codes_out, float_out = conv(norm_codes()), conv(norm_float())
        r = timing.interleaved(benchmark, repeat(lambda: conv(norm_codes()), calls), baselines,
                               rounds=timing.rounds * SHORT_ROUNDS_FACTOR, warm=lambda: conv(norm_codes()))
    base = baselines.last(len(r.target))
    dev = timing.deviation(codes_out, float_out, "conv output, norm codes vs float norm")
    int8_dev = timing.deviation(float_out, F.conv2d(y, w_float, None, 1, 1), "")
    info = benchmark.extra_info
    fill_info(info, bench, plugins="op:group_norm_silu_quantized+int8_conv2d", op="norm then conv", batch=n,
              shape=[n, c, side, side], out_channels=o, dtype="float32", memory_format="channels_last",
              calls_per_sample=calls, seconds_per_step=statistics.median(r.target) / calls,
              float_seconds_per_call=statistics.median(base["float"]) / calls,
              flops_per_image=0, gflop_per_s=None, **ratio(timing, r.target, base["float"], "float_norm"),
              **{f"norm_codes_{k}": v for k, v in ratio(timing, base["norm_codes"], base["norm_float"],
                                                        "float_norm").items()},
              target_seconds=r.target, baseline_seconds=base, **dev, int8_rel_dev=int8_dev["rel_dev"])
    timing.headline(
        f"norm codes -> conv {c}x{side}x{side}->{o}: {info['speedup_vs_float_norm']:.3f}x float norm "
        f"(quartiles {info['speedup_vs_float_norm_iqr'][0]:.3f} .. {info['speedup_vs_float_norm_iqr'][1]:.3f}); "
        f"norm alone {info['norm_codes_speedup_vs_float_norm']:.3f}x; conv output rel dev {dev['rel_dev']:.1e}")
    # the codes differ from the conv's own by one at rounding boundaries only (the norm's SiLU): a
    # small part of what int8 itself moves the output from the fp32 conv (int8_rel_dev)
    assert dev["rel_dev"] < 0.25 * int8_dev["rel_dev"], (dev, int8_dev)


# -- dropout -------------------------------------------------------------------------------------

DROPOUT_SHAPES = [(16, 128, 32, 32), (16, 256, 16, 16)]  # the cifar10 ResBlocks' dropouts in a batch-16 training step
DROPOUT_P = 0.1


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [pytest.param(s, id="x".join(map(str, s[1:]))) for s in DROPOUT_SHAPES])
def test_dropout(benchmark, bench, timing, large_copy, shape, dtype, layout):
    """``ddpm_perf::dropout`` (the Philox mask drawn in registers) against eager ``F.dropout``
    (torch's Bernoulli mask, then a multiply) on the same input, training mode, p = 0.1; bandwidth
    = (read x + write y) / time against the large copy's. Outputs differ from eager by design (a
    different random stream): the keep rate is recorded instead of a deviation."""
    if EXTENSION != "loaded":
        pytest.skip(f"ddpm_perf._C: {EXTENSION}")
    if bench.smoke:
        shape = (2, shape[1], 8, 8)
    x = torch.randn(shape).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    seed = torch.tensor([1])
    calls = max(1, TRAFFIC_PER_SAMPLE // (2 * x.nbytes))
    copy_fn, copy_bytes = large_copy
    op = repeat(lambda: torch.ops.ddpm_perf.dropout(x, seed, DROPOUT_P), calls)
    eager = repeat(lambda: torch.nn.functional.dropout(x, DROPOUT_P, training=True), calls)
    copy_fn()
    r = timing.interleaved(benchmark, op, eager, rounds=timing.rounds * SHORT_ROUNDS_FACTOR)
    per_call = statistics.median(r.target) / calls
    copy_gbs = copy_bytes / statistics.median(time_calls(copy_fn, LARGE_COPY_REPEATS)) / 1e9
    gbs = 2 * x.nbytes / per_call / 1e9
    kept = (r.target_result != 0).float().mean().item()
    fill_info(
        benchmark.extra_info, bench, plugins="op:dropout", op="dropout", batch=shape[0], shape=list(shape),
        dtype=str(dtype).removeprefix("torch."), layout=layout, p=DROPOUT_P, calls_per_sample=calls,
        seconds_per_step=per_call, eager_seconds_per_call=statistics.median(r.baseline) / calls,
        **ratio(timing, r.target, r.baseline, "eager"), gb_per_s=gbs, large_copy_gb_per_s=copy_gbs,
        bandwidth_fraction=gbs / copy_gbs, keep_rate=kept, outputs_change=False,
        deviation_of="none: a different random stream from torch's by design (keep_rate instead)",
    )
    timing.headline(
        f"dropout {'x'.join(map(str, shape))} {dtype} {layout}: {per_call * 1e3:.2f} ms/call, "
        f"{benchmark.extra_info['speedup_vs_eager']:.2f}x eager F.dropout, {gbs:.1f} GB/s "
        f"({gbs / copy_gbs:.0%} of the large copy), keep rate {kept:.4f}")
    assert abs(kept - (1 - DROPOUT_P)) < 0.01
