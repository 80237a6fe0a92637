"""Quality versus speed of the step-compute savers on the embedded digits model: do DeepCache
(``deep_cache``) and ASE early exit (``early_exit``) beat simply taking fewer DDIM steps?

One test runs the whole sweep for N images of a fixed seed (full: 512 images in engine batches
of 128; smoke: 16 images, one batch of 16):

* the "fewer steps" frontier of the embedded weights: DDIM (eta 0) at 8, 10, 12, 16, 20, 30 and 50
  steps (smoke: 2, 4), no plugins;
* DDIM 50 (smoke: 4) with ``deep_cache(interval=2)``, ``deep_cache(interval=3)``,
  ``deep_cache(interval=5)``, ``deep_cache(interval=2|3,branch=1)``,
  ``deep_cache(interval=3,branch=1,schedule=nonuniform)``, ``deep_cache(interval=3),amp`` and ``deep_cache(interval=2,branch=1),amp``;
* where the shipped early-exit model exists: the frontier of those weights run whole, and DDIM 50
  with ``early_exit`` and ``early_exit,amp`` (on another checkpoint under test, early_exit runs on
  it, judged against its frontier);
* on the embedded model, where the shipped slimmable model exists (step_aware samples
  ``digits_slim.safetensors``, other weights): the frontier of *those* weights, at full width
  (``step_aware(width=1)``) and the same step counts; DDIM 50 with ``step_aware`` (its searched
  schedule) and ``step_aware,amp``; DDIM 20 (smoke: 4) with ``step_aware(width=0.5)`` and
  ``step_aware(width=0.25)``, the narrow widths alone.

DDIM 50 without plugins is the baseline. Every configuration is timed once per round (full: 2
rounds, smoke: 1), in alternating order (forward, then reversed), after one warm-up model call of
each engine; its ``speedup`` is the median over rounds of the baseline's time over its time in the
same round. For each configuration the sweep records the FLOPs per image of the whole sampling run
(FlopCounterMode around one batch-1 sampling run of the engine: it sees the partial forwards of
deep_cache and the units early_exit skips), the FD-digits of its images and their deviation from
the DDIM-50 fp32 images.

The frontier test: each configuration is judged against fewer steps *of its own weights* (the
``weights`` key: ``embedded``, ``slimmable`` or ``early_exit``), so that better-trained weights do
not pass for a faster method. The frontier's FD-digits at the configuration's time (time relative
to the DDIM-50 baseline of the same round) is the best of what takes no longer: any frontier point
at or before that time, or the piecewise-linear curve through the points — clamped at the fastest
point: a configuration faster than its fewest steps is compared with that point's FD, a
conservative choice (the frontier only gets worse at fewer steps). ``beats_fewer_steps_frontier``
is true where the configuration's FD-digits is below the frontier's at its time.

``extra_info``: the standard keys describe the DDIM-50 baseline (``seconds_per_step``: one model
evaluation of an engine batch); ``configs`` holds one record per configuration (``weights``,
``seconds``, ``speedup_vs_ddim50``, ``flops_per_image_run``, ``gflop_per_image``, ``fd_digits``, the
deviation keys, ``frontier_fd_at_time``, ``beats_fewer_steps_frontier``); ``beats_fewer_steps_frontier``
and ``frontier_fd_at_time`` are also given as {configuration: value} maps.

DDPM_PERF_BENCH_QUALITY_CHECKPOINT=PATH uses another digits checkpoint (as test_quality.py does).

A second test, ``test_step_compute_speed``, times the plugins on the benchmark U-Net (cifar10
config, random weights: speed and FLOPs only).
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm_perf.diffusion.samplers import DDIMSampler
from ddpm_perf.diffusion.schedule import Diffusion, ScheduleConfig
from ddpm_perf.engine import SamplingEngine
from ddpm_perf.errors import RunWarning
from ddpm_perf.model.checkpoint import default_checkpoint, load_checkpoint, save_checkpoint
from ddpm_perf.model.unet import StepPlan, count_parameters
from ddpm_perf.plugins import PluginHost

from conftest import quality_checkpoint_path

SEED = 0
FULL = dict(images=512, batch=128, frontier=(8, 10, 12, 16, 20, 30, 50), narrow_steps=20, rounds=2)
SMOKE = dict(images=16, batch=16, frontier=(2, 4), narrow_steps=4, rounds=1)
PLUGIN_SPECS = ("deep_cache(interval=2)", "deep_cache(interval=3)", "deep_cache(interval=5)",
                # branch 1: the cut after the first full-resolution ResBlock (see deep_cache's docstring)
                "deep_cache(interval=2,branch=1)", "deep_cache(interval=3,branch=1)",
                "deep_cache(interval=3,branch=1,schedule=nonuniform)",  # the digits model's choice (session 10)
                "deep_cache(interval=3),amp", "deep_cache(interval=2,branch=1),amp")


@dataclass(frozen=True)
class Shipped:
    """A plugin that brings its own weights (sampled when no checkpoint is given): the spec that runs
    those weights whole (their fewer-steps frontier), the configurations swept on them at the full
    step count and at ``narrow_steps``, and whether other weights can run them at all."""
    weights: str
    whole: str
    specs: tuple[str, ...]
    fewer_steps_specs: tuple[str, ...] = ()
    any_weights: bool = True


SHIPPED = {
    # width=1: the slimmable model at full width; the narrow widths alone at fewer steps
    "step_aware": Shipped("slimmable", "step_aware(width=1)", ("step_aware", "step_aware,amp"),
                          ("step_aware(width=0.5)", "step_aware(width=0.25)"), any_weights=False),
    # fine-tuned with tune=random, so the same weights also run whole
    "early_exit": Shipped("early_exit", "", ("early_exit", "early_exit,amp")),
}


def shipped_weights(plugin: str) -> Path | None:
    return PluginHost.from_spec(plugin).default_checkpoint()


def make_engine(checkpoint, spec: str, steps: int, batch: int) -> SamplingEngine:
    host = PluginHost.from_spec(spec)
    own = host.default_checkpoint()
    if own is not None and checkpoint.path == default_checkpoint():
        checkpoint = load_checkpoint(own)  # the plugin's own model (step_aware's slimmable one), as the CLI does
    sampler = DDIMSampler(Diffusion(checkpoint.schedule_config), steps, eta=0.0)
    return SamplingEngine(checkpoint, sampler, host, batch_size=batch)


def run_flops(engine: SamplingEngine) -> int:
    """FLOPs of one whole sampling run of one image (every step, partial forwards included)."""
    with FlopCounterMode(display=False) as counter:
        engine.sample(1, seed=SEED)
    return counter.get_total_flops()


def frontier_fd(points: list[tuple[float, float]], at: float) -> float:
    """FD of the (time, FD) fewer-steps frontier at time ``at``: the best of what takes no longer —
    any point at or before ``at``, or the piecewise-linear curve through the points (step counts in
    between) — clamped at the fastest point. On a curve that is not monotone (fewer steps can score
    better) a configuration must beat every faster point, not only its neighbours."""
    times, fds = zip(*sorted(points))
    return min([float(np.interp(at, times, fds)), *(fd for t, fd in points if t <= at)])


def test_step_compute_frontier(benchmark, timing, bench):
    path = quality_checkpoint_path()
    if not path.is_file():
        pytest.skip(f"the digits model {path} does not exist; set DDPM_PERF_BENCH_QUALITY_CHECKPOINT")
    try:
        from ddpm_perf.metrics.digits_classifier import fd_digits
    except ImportError as e:
        pytest.skip(f"FD-digits is not available: {e}")
    size = SMOKE if bench.smoke else FULL
    num, batch, rounds = size["images"], size["batch"], size["rounds"]
    full_steps = max(size["frontier"])
    checkpoint = load_checkpoint(path)
    c = checkpoint.model_config
    shape = (c.in_channels, c.image_size, c.image_size)

    # (name, spec, steps, weights, frontier): the frontiers first; DDIM max without plugins is the baseline
    configs = [(f"DDIM {s}", "", s, "embedded", True) for s in size["frontier"]]
    configs += [(f"DDIM {full_steps} + {spec}", spec, full_steps, "embedded", False) for spec in PLUGIN_SPECS]
    checkpoints = {"embedded": checkpoint}
    for plugin, ship in SHIPPED.items():
        own = shipped_weights(plugin) if path == default_checkpoint() else None
        if own is None:  # another checkpoint under test, or nothing shipped: the plugin runs on it if it can
            configs += [] if not ship.any_weights else [(f"DDIM {full_steps} + {spec}", spec, full_steps, "embedded", False) for spec in ship.specs]
            continue
        checkpoints[ship.weights] = load_checkpoint(own)
        configs += [(f"DDIM {s} + {ship.whole or plugin + ' weights'}", ship.whole, s, ship.weights, True)
                    for s in size["frontier"]]
        configs += [(f"DDIM {full_steps} + {spec}", spec, full_steps, ship.weights, False) for spec in ship.specs]
        configs += [(f"DDIM {size['narrow_steps']} + {spec}", spec, size["narrow_steps"], ship.weights, False)
                    for spec in ship.fewer_steps_specs]
    baseline = f"DDIM {full_steps}"
    engines = {name: make_engine(checkpoints[weights], spec, steps, batch)
               for name, spec, steps, weights, _ in configs}
    for engine in engines.values():  # first-call costs outside the timed runs
        with torch.inference_mode():
            engine.denoise(torch.zeros((batch, *shape)), torch.full((batch,), 500, dtype=torch.long), StepPlan())

    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    images: dict[str, torch.Tensor] = {}

    def sweep() -> None:
        for r in range(rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for name, *_ in order:
                start = time.perf_counter()
                images[name] = engines[name].sample(num, seed=SEED)
                times[name].append(time.perf_counter() - start)

    benchmark.pedantic(sweep, rounds=1, warmup_rounds=0)

    ref = images[baseline]
    fd_ref = float(fd_digits(ref))
    records = {}
    for name, spec, steps, weights, frontier in configs:
        t = times[name]
        rel = [a / b for a, b in zip(t, times[baseline])]  # time relative to the baseline, per round
        flops = run_flops(engines[name])
        amp = next((p for p in engines[name].plugins.plugins if p.name == "amp"), None)
        records[name] = dict(
            config=name, plugins=spec or "none", steps=steps, weights=weights, frontier=frontier,
            dtype=amp.opts.dtype if amp else "float32",
            seconds=statistics.median(t), round_seconds=t, relative_time=statistics.median(rel),
            speedup_vs_ddim50=1 / statistics.median(rel),
            seconds_per_step=statistics.median(t) / (steps * -(-num // batch)),
            flops_per_image_run=flops, flops_per_image=flops / steps, gflop_per_image=flops / 1e9,
            fd_digits=fd_ref if name == baseline else float(fd_digits(images[name])),
            **timing.deviation(images[name], ref, "images"),
        )
    points: dict[str, list[tuple[float, float]]] = {}
    for rec in records.values():
        if rec["frontier"]:
            points.setdefault(rec["weights"], []).append((rec["relative_time"], rec["fd_digits"]))
    for rec in records.values():
        if rec["frontier"]:
            continue
        own = points[rec["weights"]]
        rec["frontier_fd_at_time"] = frontier_fd(own, rec["relative_time"])
        rec["frontier_extrapolated"] = not min(own)[0] <= rec["relative_time"] <= max(own)[0]
        rec["beats_fewer_steps_frontier"] = bool(rec["fd_digits"] < rec["frontier_fd_at_time"])

    base = records[baseline]
    info = benchmark.extra_info
    info.update(
        plugins="none", config="digits (trained)", checkpoint=str(checkpoint.path),
        parameters=count_parameters(engines[baseline].model), batch=batch, images=num, shape=[batch, *shape],
        dtype="float32", mode="sample", sampler=f"DDIM {full_steps} (eta 0)", steps=full_steps, rounds=rounds,
        seconds_per_step=base["seconds_per_step"], flops_per_image=base["flops_per_image"],
        fd_digits=fd_ref, fd_digits_fp32=fd_ref, fd_digits_images=num,
        frontier_time_basis="wall time relative to the DDIM-%d baseline of the same round (median)" % full_steps,
        frontier_weights="each configuration against fewer steps of its own weights (the 'weights' key)",
        configs=list(records.values()),
        beats_fewer_steps_frontier={n: r["beats_fewer_steps_frontier"] for n, r in records.items() if not r["frontier"]},
        frontier_fd_at_time={n: r["frontier_fd_at_time"] for n, r in records.items() if not r["frontier"]},
    )
    timing.headline(f"step compute vs fewer steps (digits model, {num} images, batch {batch}, {rounds} round(s)): "
                    f"{'config':42s} {'seconds':>8s} {'speedup':>8s} {'GFLOP/img':>9s} {'FD-digits':>9s} "
                    f"{'frontier FD':>11s} beats")
    for rec in records.values():
        beats = "-" if rec["frontier"] else ("yes" if rec["beats_fewer_steps_frontier"] else "no")
        front = "-" if rec["frontier"] else f"{rec['frontier_fd_at_time']:.3f}"
        timing.headline(f"  {rec['config']:42s} {rec['seconds']:8.2f} {rec['speedup_vs_ddim50']:7.2f}x "
                        f"{rec['gflop_per_image']:9.3f} {rec['fd_digits']:9.3f} {front:>11s} {beats}")

    assert all(torch.isfinite(x).all() for x in images.values())
    assert base["rel_dev"] == 0.0
    # the step-compute savers do less work per image than the baseline
    savers = ["deep_cache(interval=2)", "deep_cache(interval=3)", "deep_cache(interval=5)",
              "deep_cache(interval=2,branch=1)", "step_aware", "early_exit"]
    for name in (n for n in savers if f"DDIM {full_steps} + {n}" in records):
        assert records[f"DDIM {full_steps} + {name}"]["flops_per_image_run"] < base["flops_per_image_run"], name
    if "slimmable" in checkpoints:  # a narrow width does less work than the full one at the same steps
        full_width = records[f"DDIM {size['narrow_steps']} + {SHIPPED['step_aware'].whole}"]["flops_per_image_run"]
        for spec in SHIPPED["step_aware"].fewer_steps_specs:
            assert records[f"DDIM {size['narrow_steps']} + {spec}"]["flops_per_image_run"] < full_width, spec


# Speed only, on the benchmark U-Net with random weights (the cifar10 config; quality is the digits sweep's):
# DeepCache's paper setting and the cut inside the first level, early exit's default schedule (its
# units skipped as a fine-tuned model would skip them), and two fixed widths of a slimmable U-Net.
SPEED_SPECS = ("deep_cache(interval=3)", "deep_cache(interval=5)", "deep_cache(interval=2,branch=1)", "early_exit",
               "step_aware(width=0.75)", "step_aware(width=0.5)")
SLIMMABLE = {"plugins": {"step_aware": {"widths": [1.0, 0.75, 0.5, 0.25]}}}  # what sandwich training records


def test_step_compute_speed(benchmark, timing, bench, unet, tmp_path):
    """The step-compute plugins' speedup over the plain model (``bench``'s config, random weights,
    DDIM 10, smoke: 4), each timed once per round, rounds in alternating order, against the FLOPs
    of the run. The images' deviation from the plain model's is recorded but means nothing here:
    random weights, and every one of these plugins changes the function."""
    steps, rounds = (4, 1) if bench.smoke else (10, 2)
    weights = {k: v.detach() for k, v in unet.state_dict().items()}
    path = save_checkpoint(tmp_path / "random.safetensors", bench.model_config, ScheduleConfig(), weights,
                           train_meta=SLIMMABLE)
    checkpoint = load_checkpoint(path)
    specs = ("",) + SPEED_SPECS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunWarning)  # early_exit: weights never fine-tuned (speed only)
        engines = {spec: make_engine(checkpoint, spec, steps, bench.batch) for spec in specs}
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    images: dict[str, torch.Tensor] = {}
    for engine in engines.values():
        with torch.inference_mode():
            engine.denoise(torch.zeros((bench.batch, *bench.image_shape)),
                           torch.full((bench.batch,), 500, dtype=torch.long), StepPlan())

    def sweep() -> None:
        for r in range(rounds):
            for spec in specs if r % 2 == 0 else specs[::-1]:
                start = time.perf_counter()
                images[spec] = engines[spec].sample(bench.batch, seed=SEED)
                times[spec].append(time.perf_counter() - start)

    benchmark.pedantic(sweep, rounds=1, warmup_rounds=0)

    base_flops = run_flops(engines[""])
    records = []
    for spec in SPEED_SPECS:
        flops = run_flops(engines[spec])
        per_round = [b / t for b, t in zip(times[""], times[spec])]
        records.append(dict(plugins=spec, speedup=statistics.median(per_round), round_speedups=per_round,
                            flops_of_plain=flops / base_flops, seconds=statistics.median(times[spec]),
                            **timing.deviation(images[spec], images[""], "images")))
    benchmark.extra_info.update(
        sampler=f"DDIM {steps} (eta 0)", steps=steps, rounds=rounds, weights="random",
        seconds_per_step=statistics.median(times[""]) / steps, configs=records,
        speedup_vs_plain={r["plugins"]: r["speedup"] for r in records},
        flops_of_plain={r["plugins"]: r["flops_of_plain"] for r in records})
    timing.headline(f"step compute, speed only ({bench.config_name}, random weights, batch {bench.batch}, "
                    f"DDIM {steps}, {rounds} round(s)): {'plugins':32s} {'speedup':>8s} {'FLOPs':>6s}")
    for r in records:
        timing.headline(f"  {r['plugins']:32s} {r['speedup']:7.2f}x {r['flops_of_plain']:6.3f}")
    for r in records:  # each does less work than the plain model
        assert r["flops_of_plain"] < 1.0, r["plugins"]
