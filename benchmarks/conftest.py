"""Shared set-up of the pytest-benchmark suites.

Run them with ``make bench`` or ``pytest benchmarks --benchmark-only [--benchmark-json out.json]``.

Environment:
  DDPM_PERF_BENCH_SMOKE=1     tiny configs (the digits-size U-Net, 2 steps) so that
                              ``pytest benchmarks --benchmark-disable`` checks the suites in seconds
  DDPM_PERF_BENCH_THREADS=N   torch threads (default 2, the project's machines)
  DDPM_PERF_BENCH_ROUNDS=N    timed rounds of the benchmarks that use ``timing.rounds`` (default 9;
                              1 in smoke runs unless set: the nightly's --smoke sets 5)
  DDPM_PERF_BENCH_TRAIN_ROUNDS=N
                              timed pairs of training steps (test_training.py; default 5)
  DDPM_PERF_BENCH_SMOKE_COMPILE=1
                              smoke runs include the benchmarks marked ``compile`` (skipped there by
                              default: a cold inductor compile of even the digits U-Net took ~50 s on
                              the 2-core machines; ~3 s with a warm inductor cache)
  DDPM_PERF_BENCH_INJECT_SLOWDOWN=S
                              add S seconds to every timed call of the target of the benchmarks whose
                              node name contains DDPM_PERF_BENCH_INJECT_INTO (all if unset), inside the
                              timing helpers below: a fake regression, to test that the nightly
                              (benchmarks/nightly.py) catches one (tests/test_nightly.py)
  OMP_WAIT_POLICY             left as set; if unset it is set to PASSIVE here, before torch loads.
                              With the default (spinning) policy, a 2-thread run on a 2-core machine
                              that is busy with another process was measured 7-8x slower per U-Net
                              step (4.6 s instead of 0.6 s): the threads spin at barriers while the
                              other process holds the core. Set OMP_WAIT_POLICY=ACTIVE to measure
                              with spinning on a quiet machine.

Every figure the suites report is a ratio to a baseline measured in the same run, interleaved
round by round (``interleaved``): the machines are shared and noisy, absolute times are not
comparable between runs. Every benchmark's ``extra_info`` carries the standard keys of
``REQUIRED_INFO`` (filled by the autouse fixture ``_standard_extra_info``); one whose outputs
differ from eager fp32 (``outputs_change=True``) also carries its deviation (``DEVIATION_INFO``,
from ``timing.deviation``). The keys the nightly report reads: ``speedup_vs_eager`` (with
``speedup_vs_eager_iqr``), ``gflop_per_s``, ``dtype``, ``rel_dev``/``max_abs_dev``/``deviation_of``,
``fd_digits``, and the roofline's ``roofline_rate``.

Benchmarks marked ``compile`` (torch.compile: minutes of compilation of the cifar10 U-Net on
the CPU, outside the timed rounds) can be left out with ``-m 'not compile'`` (or
``-k 'not compile'``: their ids contain "compile").
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

if "torch" not in sys.modules:  # must precede the first load of libgomp
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils import flop_counter  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ddpm_perf import memory  # noqa: E402
from ddpm_perf.model.checkpoint import Checkpoint  # noqa: E402
from ddpm_perf.model.config import CONFIGS, UNetConfig  # noqa: E402
from ddpm_perf.model.unet import UNet, count_parameters  # noqa: E402

SMOKE = os.environ.get("DDPM_PERF_BENCH_SMOKE", "").lower() in ("1", "true", "yes", "on")
THREADS = int(os.environ.get("DDPM_PERF_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("DDPM_PERF_BENCH_ROUNDS", "1" if SMOKE else "9"))
SMOKE_COMPILE = os.environ.get("DDPM_PERF_BENCH_SMOKE_COMPILE", "").lower() in ("1", "true", "yes", "on")
INJECT_SLOWDOWN = float(os.environ.get("DDPM_PERF_BENCH_INJECT_SLOWDOWN", "0") or 0)
INJECT_INTO = os.environ.get("DDPM_PERF_BENCH_INJECT_INTO", "")
torch.set_num_threads(THREADS)
HEAP = memory.keep_freed_memory()  # as the CLI does, for baselines and plugins alike

REQUIRED_INFO = ("plugins", "batch", "shape", "dtype", "device", "seconds_per_step", "images_per_s",
                 "gflop_per_s")
DEVIATION_INFO = ("deviation_of", "rel_dev", "max_abs_dev", "mean_abs_dev")


@dataclass(frozen=True)
class BenchSetup:
    """What the suites run: the cifar10 U-Net at batch 8 (smoke: the digits U-Net, 2 steps)."""

    config_name: str
    model_config: UNetConfig
    batch: int
    steps: int  # DDIM steps of a sampling run
    smoke: bool = False
    seed: int = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model_config
        return (c.in_channels, c.image_size, c.image_size)


def bench_setup() -> BenchSetup:
    if SMOKE:
        return BenchSetup("digits", CONFIGS["digits"], batch=8, steps=2, smoke=True)
    return BenchSetup("cifar10", CONFIGS["cifar10"], batch=8, steps=5)


def quality_checkpoint_path() -> Path:
    """The digits model the quality benchmarks sample: $DDPM_PERF_BENCH_QUALITY_CHECKPOINT, else the
    embedded one."""
    from ddpm_perf.model.checkpoint import default_checkpoint

    override = os.environ.get("DDPM_PERF_BENCH_QUALITY_CHECKPOINT")
    return Path(override) if override else default_checkpoint()


def build_cpp(source: Path, exe: Path, cpu_flag: str, *flags: str) -> Path:
    """Compile a stand-alone C++ microbenchmark of benchmarks/ with g++ -O2 (skipping the test,
    with the reason, where g++ or the CPU flag ``cpu_flag`` of /proc/cpuinfo is missing)."""
    cpuinfo = Path("/proc/cpuinfo")
    if shutil.which("g++") is None or not cpuinfo.exists() or f" {cpu_flag}" not in cpuinfo.read_text():
        pytest.skip(f"needs g++ and a CPU with {cpu_flag}")
    subprocess.run(["g++", "-O2", *flags, "-o", str(exe), str(source)], check=True)
    return exe


# -- FLOPs ------------------------------------------------------------------------------------

_FLOPS: dict[tuple, int] = {}


@torch.inference_mode()
def flops_per_image(model: torch.nn.Module, image_shape: tuple[int, ...], key: object = None) -> int:
    """FLOPs of one forward per image, counted by torch's FlopCounterMode (a multiply-add is 2
    FLOPs; only convolutions, matmuls and attention are counted, not norms or activations).
    Counted once per (model key, shape) at batch 1 (the count is linear in the batch)."""
    key = (key if key is not None else id(model), tuple(image_shape))
    if key not in _FLOPS:
        x = torch.zeros((1, *image_shape))
        t = torch.full((1,), 500, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t)
        _FLOPS[key] = counter.get_total_flops()
    return _FLOPS[key]


# torch 2.13 has no FLOP formula for SDPA's fused CPU kernel (our attention's path): count it as
# the math path's two matmuls, so attention is not dropped from GFLOP/s figures.
if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_flash_attention_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)  # shapes, not tensors


# -- timing -----------------------------------------------------------------------------------

# The injected delay (DDPM_PERF_BENCH_INJECT_SLOWDOWN) of the running benchmark: set by the
# autouse fixture for the benchmarks it applies to, added inside the timed target calls.
_INJECTED = {"seconds": 0.0}


def _inject() -> None:
    if _INJECTED["seconds"]:
        time.sleep(_INJECTED["seconds"])


def rounds_of(benchmark, fn: Callable[[], object], rounds: int = ROUNDS, warmup_rounds: int = 1) -> SimpleNamespace:
    """Time ``fn`` alone with ``benchmark.pedantic`` (no baseline); returns the timed seconds
    (warm-up rounds dropped) and the last result. For kernels whose figure is a rate, not a ratio."""
    times: list[float] = []
    results: dict[str, object] = {}

    def run() -> None:
        start = time.perf_counter()
        _inject()
        results["result"] = fn()
        times.append(time.perf_counter() - start)

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup_rounds)
    keep = min(rounds, len(times))
    return SimpleNamespace(target=times[-keep:], result=results.get("result"))


def interleaved(benchmark, target: Callable[[], object], baseline: Callable[[], object], rounds: int = ROUNDS,
                warmup_rounds: int = 1, warm: Callable[[], object] | None = None) -> SimpleNamespace:
    """Time ``target`` with ``benchmark.pedantic`` and ``baseline`` between its rounds, in
    alternating order (baseline-target, target-baseline, ...), so slow drifts of a shared machine
    hit both alike. Returns the timed seconds of both (warm-up rounds dropped) and the last
    result of each. The benchmark's own statistics are those of ``target``. ``warm``, if given,
    is called untimed before each timed ``target``: one call of a repeated op, as the kernel
    suites' baselines get (``test_kernels.Baselines``), so both sides start from warm caches.

    Under --benchmark-disable pedantic runs setup and target once: one pair is still timed."""
    times: dict[str, list[float]] = {"target": [], "baseline": []}
    results: dict[str, object] = {}
    state = {"round": 0}

    def timed(fn: Callable[[], object], key: str) -> None:
        if key == "target" and warm is not None:
            warm()
        start = time.perf_counter()
        if key == "target":
            _inject()
        results[key] = fn()
        times[key].append(time.perf_counter() - start)

    def setup() -> None:
        if state["round"] % 2 == 0:
            timed(baseline, "baseline")

    def run() -> None:
        timed(target, "target")

    def teardown() -> None:
        if state["round"] % 2 == 1:
            timed(baseline, "baseline")
        state["round"] += 1

    benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=warmup_rounds)
    keep = min(rounds, len(times["target"]), len(times["baseline"]))
    return SimpleNamespace(target=times["target"][-keep:], baseline=times["baseline"][-keep:],
                           target_result=results.get("target"), baseline_result=results.get("baseline"))


def speedup(target: list[float], baseline: list[float]) -> dict[str, object]:
    """baseline/target (> 1: the target is faster): the median of the pair ratios, with their
    quartiles, and the ratio of the medians. The extra_info keys the nightly report reads."""
    r = ratios(target, baseline)
    return {"speedup_vs_eager": 1 / r["paired"], "speedup_vs_eager_iqr": [1 / r["paired_q3"], 1 / r["paired_q1"]],
            "speedup_vs_eager_medians": 1 / r["median"], "pairs": len(target)}


def deviation(out: torch.Tensor, ref: torch.Tensor, of: str) -> dict[str, object]:
    """How far ``out`` is from the fp32 reference ``ref``: relative L2 (||out - ref|| / ||ref||),
    max and mean absolute deviation; ``of`` names what was compared (eps, images, ...)."""
    out, ref = out.detach().double(), ref.detach().double()
    diff = out - ref
    return {"deviation_of": of, "rel_dev": (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
            "max_abs_dev": diff.abs().max().item(), "mean_abs_dev": diff.abs().mean().item(),
            "ref_abs_mean": ref.abs().mean().item()}


def ratios(target: list[float], baseline: list[float]) -> dict[str, float]:
    """target/baseline three ways: ratio of medians, of minimums, and the median of the ratios of
    adjacent pairs (the most robust to drift), with the quartiles of those pair ratios."""
    pairs = [a / b for a, b in zip(target, baseline)]
    q1, _, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (pairs[0],) * 3
    return {
        "median": statistics.median(target) / statistics.median(baseline),
        "min": min(target) / min(baseline),
        "paired": statistics.median(pairs),
        "paired_q1": q1,  # the spread of the pair ratios: the run's noise
        "paired_q3": q3,
    }


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: torch.compile benchmarks (minutes of compilation on the CPU); "
                            "deselect with -m 'not compile'")


def pytest_collection_modifyitems(config, items):
    if SMOKE and not SMOKE_COMPILE:
        skip = pytest.mark.skip(reason="smoke run: torch.compile takes ~50 s even for the digits U-Net on 2 cores "
                                "(cold inductor cache); set DDPM_PERF_BENCH_SMOKE_COMPILE=1 to include it")
        for item in items:
            if item.get_closest_marker("compile"):
                item.add_marker(skip)


def pytest_generate_tests(metafunc):
    """``sampling_steps``: the benchmark's DDIM step count and 100 (to separate the engine's
    per-call from its per-step cost)."""
    if "sampling_steps" in metafunc.fixturenames:
        metafunc.parametrize("sampling_steps", sorted({bench_setup().steps, 100}))


# -- a summary at the end of the run ----------------------------------------------------------

HEADLINES: list[str] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if HEADLINES:
        terminalreporter.section("ddpm-perf benchmark ratios (same run, interleaved)")
        for line in HEADLINES:
            terminalreporter.write_line(line)


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bench() -> BenchSetup:
    return bench_setup()


@pytest.fixture(scope="session")
def unet(bench) -> UNet:
    """The benchmark U-Net with seeded random weights (speed does not depend on the values)."""
    torch.manual_seed(bench.seed)
    return UNet(bench.model_config).eval()


@pytest.fixture(scope="session")
def checkpoint(unet) -> Checkpoint:
    return Checkpoint.from_model(unet)


@pytest.fixture(scope="session")
def unet_flops(bench, unet) -> int:
    return flops_per_image(unet, bench.image_shape, key=("ddpm_perf", bench.model_config))


@pytest.fixture(scope="session")
def timing() -> SimpleNamespace:
    """The timing helpers, for the test modules: ``timing.interleaved``, ``timing.rounds_of``,
    ``timing.ratios``, ``timing.speedup``, ``timing.deviation``, ``timing.flops_per_image``,
    ``timing.rounds``, ``timing.headline(line)`` (printed in the summary)."""
    return SimpleNamespace(interleaved=interleaved, rounds_of=rounds_of, ratios=ratios, speedup=speedup,
                           deviation=deviation, flops_per_image=flops_per_image, rounds=ROUNDS,
                           headline=HEADLINES.append)


@pytest.fixture(autouse=True)
def _standard_extra_info(request, bench):
    """Give every benchmark the standard extra_info keys. A test sets what it measured:
    ``seconds_per_step`` (one model evaluation of the whole batch) and, unless it is the
    benchmark U-Net, ``flops_per_image`` and ``steps``; throughput and GFLOP/s are derived here.
    A benchmark that leaves a required key unset is an error."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    info = benchmark.extra_info
    info.update(plugins="none", config=bench.config_name,
                parameters=count_parameters(request.getfixturevalue("unet")), batch=bench.batch,
                shape=[bench.batch, *bench.image_shape], dtype="float32", device="cpu", mode="eager",
                threads=torch.get_num_threads(), steps=bench.steps, smoke=SMOKE)
    default_flops = request.getfixturevalue("unet_flops")
    if INJECT_SLOWDOWN and INJECT_INTO in request.node.name:
        _INJECTED["seconds"] = info["injected_slowdown_s"] = INJECT_SLOWDOWN
    try:
        yield
    finally:
        _INJECTED["seconds"] = 0.0
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.passed:
        return
    if "seconds_per_step" not in info and benchmark.stats is not None:
        info["seconds_per_step"] = benchmark.stats.stats.median / info["steps"]
    sps = info.get("seconds_per_step")
    if sps:
        info.setdefault("images_per_s", info["batch"] / (sps * info["steps"]))
        info.setdefault("image_steps_per_s", info["batch"] / sps)
        if "flops_per_image" not in info:
            info["flops_per_image"] = default_flops
        info.setdefault("gflop_per_s", info["flops_per_image"] * info["batch"] / sps / 1e9)
    missing = [k for k in REQUIRED_INFO + (DEVIATION_INFO if info.get("outputs_change") else ()) if k not in info]
    if missing:
        pytest.fail(f"benchmark {request.node.name} did not record extra_info {missing}", pytrace=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    machine_info["mkldnn"] = torch.backends.mkldnn.is_available()
    machine_info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    machine_info["heap"] = HEAP
    machine_info["ddpm_perf_bench_smoke"] = SMOKE
    # machine_info must not change from run to run on the same machine: pytest-benchmark compares
    # it with the baseline's (--benchmark-compare) and warns on any difference (and 5.2.3 crashes
    # in that warning when the storage is outside the working directory). So no load average
    # here (it is in the run's "run_info", below), and no measured clock.
    for volatile in ("hz_actual", "hz_actual_friendly"):
        (machine_info.get("cpu") or {}).pop(volatile, None)


_LOAD_AT_START = list(os.getloadavg())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["run_info"] = {"load_average_at_start": _LOAD_AT_START, "load_average_at_end": list(os.getloadavg()),
                               "smoke": SMOKE, "rounds": ROUNDS, "threads": torch.get_num_threads(),
                               "injected_slowdown_s": INJECT_SLOWDOWN, "injected_into": INJECT_INTO}


def pytest_report_header(config):
    s = bench_setup()
    return (f"ddpm-perf benchmarks: {s.config_name} U-Net, batch {s.batch}, {s.steps} DDIM steps, "
            f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, "
            f"load average {os.getloadavg()[0]:.1f}" + (" [SMOKE]" if SMOKE else ""))

