"""The nightly benchmark run: run the suites, save the run, compare it with the baseline, fail on
a regression, and write a report (markdown table + PNG plot).

    python benchmarks/nightly.py [--threshold 10] [--storage .benchmarks] [--report-dir reports]
                                 [--smoke] [--compare-only] [--baseline last-good|last|FILE|NNNN]
                                 [--no-ratio-check] [-- extra pytest args]

    make nightly NIGHTLY_ARGS="--threshold 15 -- -m 'not compile'"

What it does:

1. Runs ``pytest benchmarks --benchmark-only --benchmark-autosave --benchmark-storage STORAGE``
   (the extra pytest args are appended; a path among them replaces ``benchmarks``), saving the
   run as ``STORAGE/<machine id>/NNNN_<commit>_<date>.json``. ``--smoke`` runs the tiny
   configs (DDPM_PERF_BENCH_SMOKE=1, 5 rounds) and keeps its runs apart, in ``STORAGE/smoke``:
   smoke and full-size times must never be compared.
2. If a baseline exists, adds ``--benchmark-compare BASELINE
   --benchmark-compare-fail=median:THRESHOLD%``: pytest-benchmark fails the run when a
   benchmark's median time grew by more than THRESHOLD percent (an integer). The baseline
   (``--baseline last-good``, the default) is the newest saved run of this machine id that
   the nightly has not recorded as regressed or failed (its verdicts are kept in
   ``STORAGE/nightly-history.json``), so a regression keeps failing night after night until
   it is fixed or accepted: ``--baseline last`` compares with the newest run whatever its
   verdict (run it once to accept a slowdown). Without a baseline the run becomes the
   baseline; with ``--compare-only`` a missing baseline is an error (exit 2) and nothing runs.
3. Also compares what is robust on a shared machine: each plugin combination's time relative
   to eager fp32 measured in the same run (``speedup_vs_eager``, interleaved). A combination
   whose relative time grew by more than THRESHOLD percent against the baseline run is a
   regression too (``--no-ratio-check`` turns this off; only figures of >= 3 pairs count).
4. Writes REPORT_DIR/report.md (speedups against eager fp32 of the same run, GFLOP/s as a
   fraction of the FLOP limit of the compute dtype measured by benchmarks/test_roofline.py in
   the same run, deviation from fp32 and FD-digits where recorded, change against the
   baseline) and REPORT_DIR/report.png (speedup bars per plugin combination; with the step-compute sweep
   also quality_vs_speed.png, FD-digits against time with the fewer-steps frontier), beside the
   run's benchmarks.json, junit.xml and pytest.log.

Exit status: 0 no regression (or a new baseline), 1 a benchmark failed or pytest could not run
them, 2 usage error (e.g. ``--compare-only`` without a baseline), 3 performance regression.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HISTORY = "nightly-history.json"
SMOKE_ROUNDS = "5"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REGRESSION = 0, 1, 2, 3
BAD = ("regression", "failed")
# pytest-benchmark's line per regression: "\t<name> (<source>) - Field 'median' has failed ..."
REGRESSION_LINE = re.compile(r"^\s+(?P<name>\S.*?) \((?P<source>[^)]*)\) - (?P<why>Field .*)$")
PERCENT_CHECK = re.compile(r"Field '(?P<field>\w+)' has failed PercentageRegressionCheck: (?P<value>[-\d.e+]+) > "
                           r"(?P<limit>[-\d.e+]+)")
GROUPS = {  # test function -> the report's name for it
    "test_forward": "U-Net forward (sampling step)",
    "test_train_step": "training step",
    "test_sampling_quality": "sampling end to end (digits model)",
    "test_group_norm_silu": "group_norm_silu kernel vs eager GroupNorm+SiLU",
    "test_group_norm_silu_compile": "group_norm_silu kernel vs torch.compile",
    "test_int8_conv2d": "int8_conv2d kernel, per conv shape, vs fp32 conv",
    "test_int8_conv2d_model": "int8_conv2d kernel, all convs of a cifar10 forward, vs fp32 conv",
    "test_step_compute_frontier": "step-compute plugins vs fewer DDIM steps (digits model)",
    "test_parallel_ceiling": "2 single-thread processes at once vs 1 (the ceiling of 2 ranks)",
    "test_patch_parallel_step": "patch_parallel, 2 ranks x 1 thread vs 1 process x 1 thread",
    "test_patch_parallel_bytes_4_ranks": "patch_parallel bytes per step, 4 ranks",
    "test_patch_parallel_quality": "patch_parallel quality, 2 ranks (digits model)",
}


def machine_id() -> str:
    try:
        from pytest_benchmark.utils import get_machine_id

        return get_machine_id()
    except ImportError:  # the same formula
        return "-".join((platform.system(), platform.python_implementation(),
                         ".".join(platform.python_version_tuple()[:2]), platform.architecture()[0]))


def saved_runs(storage: Path) -> list[Path]:
    return sorted((storage / machine_id()).glob("[0-9][0-9][0-9][0-9]_*.json"))


def load_history(storage: Path) -> dict:
    path = storage / HISTORY
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"warning: {path} is damaged; ignoring the nightly's earlier verdicts", file=sys.stderr)
    return {"runs": []}


def save_history(storage: Path, history: dict) -> None:
    path = storage / HISTORY
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(history, indent=1) + "\n")
    os.replace(tmp, path)


def choose_baseline(storage: Path, how: str) -> Path | None:
    runs = saved_runs(storage)
    if how == "last":
        return runs[-1] if runs else None
    if how == "last-good":
        bad = {r["file"] for r in load_history(storage)["runs"] if r.get("status") in BAD}
        good = [p for p in runs if p.name not in bad]
        return good[-1] if good else None
    path = Path(how)
    if path.is_file():
        return path.resolve()
    matches = [p for p in runs if p.name.startswith(how)]
    if len(matches) != 1:
        raise SystemExit(usage_error(f"--baseline {how!r} matches {len(matches)} saved runs in "
                                     f"{storage / machine_id()}; give a file, a run number (e.g. 0003), "
                                     "'last' or 'last-good'"))
    return matches[0]


def usage_error(message: str) -> int:
    print(f"nightly: {message}", file=sys.stderr)
    return EXIT_USAGE


def split_extra(extra: list[str]) -> tuple[list[str], list[str]]:
    """(test paths, other args) of the extra pytest args: a path is an argument naming an
    existing file or folder (``path::test`` too), not an option or an option's value."""
    paths, rest = [], []
    for arg in extra:
        path, sep, test = arg.partition("::")
        if not arg.startswith("-") and Path(path).exists():  # relative to the caller's folder
            paths.append(str(Path(path).resolve()) + sep + test)
        elif not arg.startswith("-") and (ROOT / path).exists():
            paths.append(arg)
        else:
            rest.append(arg)
    return paths, rest


# -- running ----------------------------------------------------------------------------------

def run_pytest(cmd: list[str], env: dict, log: Path) -> tuple[int, str]:
    """Run pytest, echoing its output as it comes, and keep a copy in ``log``."""
    print("+ " + shlex.join(cmd), flush=True)
    chunks = []
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc, \
            open(log, "wb") as out:
        # chunks as they come, not lines: pytest's progress dots end no line until a file is done
        while chunk := os.read(proc.stdout.fileno(), 65536):
            if hasattr(sys.stdout, "buffer"):
                sys.stdout.buffer.write(chunk)
            else:  # a text-only stream (e.g. captured in a test)
                sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            out.write(chunk)
            chunks.append(chunk)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def parse_regressions(output: str) -> list[dict]:
    """pytest-benchmark's own verdicts, from the lines under "Performance has regressed:"."""
    found, inside = [], False
    for line in output.splitlines():
        if "Performance has regressed:" in line:
            inside = True
            continue
        if inside:
            m = REGRESSION_LINE.match(line)
            if not m:
                inside = False
                continue
            why = m["why"]
            pct = PERCENT_CHECK.match(why)
            if pct:  # "Field 'median' has failed PercentageRegressionCheck: 722.47 > 10.00"
                why = (f"{pct['field']} time {float(pct['value']):+.1f}% against the baseline "
                       f"(> {float(pct['limit']):.0f}%)")
            found.append({"name": m["name"], "why": why, "check": "median time (pytest-benchmark)"})
    return found


def junit_failures(path: Path) -> list[str]:
    if not path.is_file():
        return []
    failed = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return failed


# -- comparing --------------------------------------------------------------------------------

def by_name(run: dict | None) -> dict[str, dict]:
    return {b["fullname"]: b for b in (run or {}).get("benchmarks", [])}


def ratio_regressions(current: dict, baseline: dict | None, threshold: int) -> list[dict]:
    """Combinations whose time relative to eager (1 / speedup_vs_eager, measured interleaved in
    each run) grew by more than ``threshold`` percent against the baseline run."""
    found = []
    old = by_name(baseline)
    for name, bench in by_name(current).items():
        info, before = bench.get("extra_info", {}), old.get(name, {}).get("extra_info", {})
        if info.get("plugins") in (None, "none") or "speedup_vs_eager" not in info or "speedup_vs_eager" not in before:
            continue
        if min(info.get("pairs", 0), before.get("pairs", 0)) < 3:
            continue
        change = before["speedup_vs_eager"] / info["speedup_vs_eager"] - 1
        if change * 100 > threshold:
            found.append({"name": bench["name"], "check": "time relative to eager fp32 (same-run ratio)",
                          "why": f"speedup vs eager {before['speedup_vs_eager']:.3f}x -> "
                                 f"{info['speedup_vs_eager']:.3f}x "
                                 f"(relative time {change:+.1%} > {threshold}%)"})
    return found


def machine_differences(current: dict, baseline: dict | None) -> list[str]:
    if not baseline:
        return []
    a, b = current.get("machine_info", {}), baseline.get("machine_info", {})
    notes = []
    # The wait policy too: on the Xeon, PASSIVE adds 12-33% to a sampling step (docs/performance.md).
    for key in ("cpu.brand_raw", "torch", "torch_threads", "cpu_capability", "omp_wait_policy", "ddpm_perf_bench_smoke"):
        head, _, sub = key.partition(".")
        va = (a.get(head) or {}).get(sub) if sub else a.get(head)
        vb = (b.get(head) or {}).get(sub) if sub else b.get(head)
        if va != vb:
            notes.append(f"{key}: {vb!r} in the baseline, {va!r} now")
    return notes


# -- the report -------------------------------------------------------------------------------

def flop_limits(run: dict) -> dict[str, tuple[float, str]]:
    """Per compute dtype, the highest compute rate measured by test_roofline in this run."""
    limits: dict[str, tuple[float, str]] = {}
    for bench in run.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("roofline_kind") == "compute" and info.get("roofline_rate"):
            dtype = info["dtype"]
            if info["roofline_rate"] > limits.get(dtype, (0.0, ""))[0]:
                limits[dtype] = (info["roofline_rate"], info["roofline_kernel"])
    return limits


def load_text(run: dict) -> str:
    info = run.get("run_info", {})
    start, end = info.get("load_average_at_start"), info.get("load_average_at_end")
    if not start:
        return "unknown"
    return f"{'/'.join(f'{x:.1f}' for x in start)} at the start, {'/'.join(f'{x:.1f}' for x in end or [])} at the end"


def seconds_text(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def group_of(bench: dict) -> str:
    func = bench["name"].split("[")[0]
    return GROUPS.get(func, func)


def deviation_text(info: dict) -> str:
    if "rel_dev" not in info:
        return "–"
    of = info.get("deviation_of", "output").split(" (")[0]
    text = f"{of}: rel {info['rel_dev']:.1e}, max {info['max_abs_dev']:.1e}"
    if "loss_rel_dev" in info:
        text += f"; loss rel {info['loss_rel_dev']:.1e}"
    if "changed_level_fraction" in info:
        text += f"; {info['changed_level_fraction']:.0%} of 8-bit pixels changed"
    return text


def notes_text(info: dict) -> str:
    notes = []
    if info.get("compile_seconds") is not None:
        notes.append(f"compiled in {info['compile_seconds']:.0f} s")
    if info.get("peak_memory_reduction") is not None and info.get("plugins") != "none":
        notes.append(f"peak tensor memory {-info['peak_memory_reduction']:+.0%}")
    if info.get("rss_peak_memory_reduction") is not None and info.get("plugins") != "none":
        notes.append(f"peak RSS {-info['rss_peak_memory_reduction']:+.0%}, RSS added by the step "
                     f"{-info['rss_step_memory_reduction']:+.0%}")
    if "overhead_pct_paired" in info:
        notes.append(f"engine overhead {info['overhead_pct_paired']:+.2f}% (paired)")
    if "overhead_us_per_step" in info:
        notes.append(f"engine work {info['overhead_us_per_step']:.0f} us/step")
    if "ratio_vs_diffusers_paired" in info:
        notes.append(f"ddpm-perf / diffusers {info['ratio_vs_diffusers_paired']:.3f} (paired)")
    if info.get("injected_slowdown_s"):
        notes.append(f"**injected slowdown {info['injected_slowdown_s']} s per call**")
    if info.get("pairs") is not None and info.get("pairs") < 3 and "speedup_vs_eager" in info:
        notes.append(f"{info['pairs']} pair(s): indicative")
    return "; ".join(notes) or ""


def write_report(report_dir: Path, run: dict, baseline_run: dict | None, baseline: Path | None,
                 saved: Path | None, verdict: str, regressions: list[dict], failures: list[str],
                 differences: list[str], threshold: int, smoke: bool) -> tuple[Path, Path]:
    limits = flop_limits(run)
    old = by_name(baseline_run)
    mi = run.get("machine_info", {})
    lines = [f"# ddpm-perf nightly benchmarks, {run.get('datetime', '')[:16].replace('T', ' ')} UTC"
             + (" (smoke)" if smoke else ""), ""]
    lines += [f"**{verdict}**", ""]
    lines.append(f"- run: `{saved.name if saved else '(not saved)'}`; baseline: "
                 + (f"`{baseline.name}` (fail above +{threshold}% median time, or +{threshold}% time relative to "
                    "eager fp32)" if baseline else "none"))
    lines.append(f"- machine: {(mi.get('cpu') or {}).get('brand_raw', platform.processor())}, torch {mi.get('torch')}, "
                 f"{mi.get('torch_threads')} threads, OMP_WAIT_POLICY={mi.get('omp_wait_policy')}, load average "
                 f"{load_text(run)} (1/5/15 min; other processes share the cores when it is above the threads)")
    commit = run.get("commit_info", {})
    lines.append(f"- commit: {commit.get('id', '?')}{' (dirty)' if commit.get('dirty') else ''}, branch "
                 f"{commit.get('branch', '?')}")
    for note in differences:
        lines.append(f"- **the baseline ran elsewhere**: {note}")
    lines.append("")
    if regressions:
        lines += ["## Regressions", ""]
        lines += [f"- `{r['name']}`: {r['why']} [{r['check']}]" for r in regressions]
        lines.append("")
    if failures:
        lines += ["## Failed benchmarks", ""] + [f"- `{f}`" for f in failures] + [""]

    lines += ["## Speedups against eager fp32 (same run)", "",
              "Speedup: median of the ratios of interleaved pairs (eager time / combination time), quartiles in "
              "parentheses. GFLOP/s: the useful FLOPs of the fp32 network (FlopCounterMode) per second. "
              "Of FLOP limit: GFLOP/s over the best compute rate measured for the compute dtype in this run "
              "(roofline below; a rate measured under the load of its moment, not the hardware's peak: when the "
              "load drops later in the run, or for the backward convolutions of training, a step can beat it). Median time: of one timed call (a forward, a training step, a whole "
              "sampling run). Deviation: from the fp32 output of the same input.", "",
              "| benchmark | plugins | compute dtype | median time | speedup vs eager fp32 | GFLOP/s | of FLOP limit "
              "| deviation from fp32 | FD-digits | vs baseline (median) | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    kernels = []
    for bench in run.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("roofline_kernel"):
            kernels.append(bench)
            continue
        speedup = "–"
        if "speedup_vs_eager" in info:
            lo, hi = info.get("speedup_vs_eager_iqr", [None, None])
            speedup = f"{info['speedup_vs_eager']:.2f}x" + (f" ({lo:.2f}–{hi:.2f})" if lo is not None else "")
        gflops = info.get("gflop_per_s")
        limit = limits.get(info.get("dtype"))
        fraction = f"{gflops / limit[0]:.0%} of {info['dtype']}" if gflops and limit else "–"
        fd = "–"
        if info.get("fd_digits") is not None:
            fd = f"{info['fd_digits']:.3f} (fp32 {info['fd_digits_fp32']:.3f})"
        change = "–"
        if baseline_run is not None:
            prev = old.get(bench["fullname"])
            change = f"{bench['stats']['median'] / prev['stats']['median'] - 1:+.1%}" if prev else "new"
        lines.append(f"| `{bench['name']}` | {info.get('plugins', '–')} | {info.get('dtype', '–')} | "
                     f"{seconds_text(bench['stats']['median'])} | {speedup} | "
                     f"{f'{gflops:.0f}' if gflops else '–'} | {fraction} | {deviation_text(info)} | {fd} | "
                     f"{change} | "
                     f"{notes_text(info)} |")
    lines.append("")

    lines += ["## Roofline (this run)", ""]
    if kernels:
        lines += ["| kernel | dtype | rate (median call) | best call | vs baseline (median) |", "|---|---|---|---|---|"]
        for bench in kernels:
            info = bench["extra_info"]
            prev = old.get(bench["fullname"])
            change = (f"{bench['stats']['median'] / prev['stats']['median'] - 1:+.1%}" if prev else
                      ("new" if baseline_run is not None else "–"))
            lines.append(f"| {info['roofline_label'].rsplit(' (', 1)[0]} | {info['dtype']} | "
                         f"{info['roofline_rate']:.1f} {info['roofline_unit']} | {info['roofline_rate_best']:.1f} | "
                         f"{change} |")
        lines.append("")
        lines.append("FLOP limits used above: " + ", ".join(
            f"{dtype} {rate:.0f} (`{kernel}`)" for dtype, (rate, kernel) in sorted(limits.items())) + ".")
    else:
        lines.append("No roofline benchmark ran (benchmarks/test_roofline.py): no FLOP limits in this run.")
    lines.append("")

    sweep = frontier_sweep(run)
    if sweep:
        lines += quality_vs_speed_lines(sweep) + [""]

    md = report_dir / "report.md"
    md.write_text("\n".join(lines))
    png = report_dir / "report.png"
    plot(run, png, smoke)
    if sweep:
        plot_quality_vs_speed(sweep, report_dir / "quality_vs_speed.png", smoke)
    return md, png


def frontier_sweep(run: dict) -> list[dict]:
    """The configurations of the step-compute sweep (benchmarks/test_step_compute.py), if it ran."""
    for bench in run.get("benchmarks", []):
        configs = bench.get("extra_info", {}).get("configs")
        if configs and all("fd_digits" in c and "relative_time" in c for c in configs):
            return configs
    return []


def quality_vs_speed_lines(configs: list[dict]) -> list[str]:
    lines = ["## Quality versus speed: step-compute plugins against fewer DDIM steps", "",
             "FD-digits (lower is better) against wall time relative to the full-step baseline of the same round. "
             "A plugin configuration beats the fewer-steps frontier when its FD-digits is below the best of fewer steps "
             "of the same weights that take no longer (any faster point, or the curve through the points, at its time). "
             "Plot: quality_vs_speed.png.", "",
             "| configuration | weights | speedup | GFLOP per image (run) | FD-digits | frontier FD at that time "
             "| beats fewer steps |",
             "|---|---|---|---|---|---|---|"]
    for c in configs:
        beats = "–" if c.get("frontier") else ("**yes**" if c.get("beats_fewer_steps_frontier") else "no")
        front = "–" if c.get("frontier") else f"{c['frontier_fd_at_time']:.3f}"
        lines.append(f"| {c['config']} | {c.get('weights', 'embedded')} | {1 / c['relative_time']:.2f}x | "
                     f"{c['flops_per_image_run'] / 1e9:.2f} | {c['fd_digits']:.3f} | {front} | {beats} |")
    return lines


def plot_quality_vs_speed(configs: list[dict], path: Path, smoke: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"embedded": ("o-", "black"), "slimmable": ("o--", "tab:gray")}
    weights = sorted({c.get("weights", "embedded") for c in configs if c.get("frontier")})
    for name in weights:  # one fewer-steps frontier per set of weights
        frontier = sorted((c for c in configs if c.get("frontier") and c.get("weights", "embedded") == name),
                          key=lambda c: c["relative_time"])
        marker, color = styles.get(name, ("o:", "tab:blue"))
        ax.plot([c["relative_time"] for c in frontier], [c["fd_digits"] for c in frontier], marker, color=color,
                label=f"fewer DDIM steps, {name} weights")
        for c in frontier:
            ax.annotate(c["config"].split(" + ")[0], (c["relative_time"], c["fd_digits"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=6, color=color)
    for c in configs:
        if c.get("frontier"):
            continue
        color = "tab:green" if c.get("beats_fewer_steps_frontier") else "tab:red"
        ax.plot(c["relative_time"], c["fd_digits"], "s", color=color)
        label = c["plugins"] if c["config"].startswith(f"DDIM {max(x['steps'] for x in configs)} ") else c["config"]
        ax.annotate(label, (c["relative_time"], c["fd_digits"]), textcoords="offset points", xytext=(4, -9),
                    fontsize=6, color=color)
    ax.plot([], [], "s", color="tab:green", label="plugin: beats fewer steps of its weights")
    ax.plot([], [], "s", color="tab:red", label="plugin: does not")
    ax.set_xlabel("wall time relative to the full-step baseline (same round)")
    ax.set_ylabel("FD-digits (lower is better)")
    ax.set_title("step-compute plugins vs fewer steps" + (" (smoke)" if smoke else ""), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(run: dict, path: Path, smoke: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for bench in run.get("benchmarks", []):
        if "speedup_vs_eager" in bench.get("extra_info", {}):
            groups.setdefault(group_of(bench), []).append(bench)
    if not groups:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no speedup figures in this run", ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    heights = [max(1.2, 0.45 * len(b) + 0.8) for b in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (title, benches) in zip(axes[:, 0], groups.items()):
        labels, values, err = [], [], [[], []]
        for bench in benches:
            info = bench["extra_info"]
            labels.append("eager fp32 (noise)" if info.get("plugins") in (None, "none") else info["plugins"])
            values.append(info["speedup_vs_eager"])
            lo, hi = info.get("speedup_vs_eager_iqr", [values[-1], values[-1]])
            err[0].append(max(values[-1] - lo, 0))
            err[1].append(max(hi - values[-1], 0))
        y = range(len(values))
        colors = ["tab:gray" if label.startswith("eager") else "tab:green" if v >= 1 else "tab:red"
                  for label, v in zip(labels, values)]
        ax.barh(list(y), values, xerr=err, color=colors, alpha=0.8, capsize=3)
        ax.axvline(1.0, color="black", lw=1)
        ax.set_yticks(list(y), labels)
        ax.invert_yaxis()
        right = [v + e for v, e in zip(values, err[1])]
        for i, (v, x) in enumerate(zip(values, right)):
            ax.text(x, i, f"  {v:.2f}x", va="center", ha="left", fontsize=8)
        ax.set_xlim(0, max(max(right) * 1.2, 1.3))
        ax.set_title(title, fontsize=10)
    axes[-1, 0].set_xlabel("speedup vs eager fp32, same run (median of interleaved pairs; bars: quartiles)")
    fig.suptitle(f"ddpm-perf nightly {run.get('datetime', '')[:10]}" + (" (smoke)" if smoke else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python benchmarks/nightly.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Extra pytest arguments go after '--'.")
    parser.add_argument("--threshold", type=int, default=10,
                        help="fail when a median time (or a time relative to eager) grew by more than this many "
                             "percent (an integer: pytest-benchmark accepts no decimals); default 10")
    parser.add_argument("--storage", type=Path, default=ROOT / ".benchmarks",
                        help="pytest-benchmark storage folder (default .benchmarks; --smoke uses STORAGE/smoke)")
    parser.add_argument("--report-dir", type=Path, default=Path("reports"), help="where report.md/.png go")
    parser.add_argument("--smoke", action="store_true", help="tiny configs, 5 rounds (checks the machinery)")
    parser.add_argument("--compare-only", action="store_true",
                        help="require a baseline: without one, say how to make one and exit 2 (nothing runs)")
    parser.add_argument("--baseline", default="last-good",
                        help="last-good (default), last, a saved run's number (0003) or a JSON file")
    parser.add_argument("--no-ratio-check", action="store_true",
                        help="only pytest-benchmark's median-time check, not the relative-to-eager one")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threshold < 0:
        return usage_error(f"--threshold must be a non-negative integer percentage, got {args.threshold}")
    storage = (args.storage / "smoke" if args.smoke else args.storage).resolve()
    report_dir = args.report_dir.resolve()
    storage.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)

    baseline = choose_baseline(storage, args.baseline)
    if baseline is None and args.compare_only:
        again = " --smoke" if args.smoke else ""
        return usage_error(
            f"--compare-only: no baseline to compare with in {storage / machine_id()} (no saved run"
            + (" that has not regressed" if saved_runs(storage) else "") + "). Make one first: "
            f"python benchmarks/nightly.py{again} --storage {args.storage} (a run without a baseline becomes the "
            "baseline), or point --baseline at a saved run JSON.")

    paths, rest = split_extra(extra)
    json_path, junit_path = report_dir / "benchmarks.json", report_dir / "junit.xml"
    for stale in (json_path, junit_path):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *(paths or ["benchmarks"]), "--benchmark-only", "--benchmark-autosave",
           f"--benchmark-storage=file://{storage}", f"--benchmark-json={json_path}", f"--junit-xml={junit_path}"]
    if baseline is not None:
        cmd += [f"--benchmark-compare={baseline}", f"--benchmark-compare-fail=median:{args.threshold}%"]
    cmd += rest
    env = dict(os.environ)
    if args.smoke:
        env["DDPM_PERF_BENCH_SMOKE"] = "1"
        env.setdefault("DDPM_PERF_BENCH_ROUNDS", SMOKE_ROUNDS)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    before = set(saved_runs(storage))
    rc, output = run_pytest(cmd, env, report_dir / "pytest.log")
    new = sorted(set(saved_runs(storage)) - before)
    saved = new[-1] if new else None
    if not json_path.is_file():
        print(f"nightly: pytest exited {rc} without results (see {report_dir / 'pytest.log'})", file=sys.stderr)
        if "is not in the subpath of" in output:
            print("nightly: pytest-benchmark fails to warn that the machine differs from the baseline's when the "
                  "storage is outside the repository; use a --storage inside it, or --baseline another run",
                  file=sys.stderr)
        return EXIT_FAILED if rc != 4 else EXIT_USAGE
    run = json.loads(json_path.read_text())
    baseline_run = json.loads(baseline.read_text()) if baseline is not None else None

    regressions = parse_regressions(output)
    if baseline is not None and not args.no_ratio_check:
        regressions += ratio_regressions(run, baseline_run, args.threshold)
    failures = junit_failures(junit_path)
    if rc not in (0, 1) or (rc == 1 and not regressions and not failures):
        failures.append(f"pytest exited {rc}")
    if not run.get("benchmarks"):
        failures.append("no benchmark ran")
    differences = machine_differences(run, baseline_run)

    if regressions:
        names = sorted({r["name"] for r in regressions})
        verdict = f"REGRESSION: {len(names)} benchmark(s) slower than the baseline by more than {args.threshold}%: " + \
            ", ".join(names)
        status, code = "regression", EXIT_REGRESSION
    elif failures:
        verdict, status, code = f"FAILED: {', '.join(failures)}", "failed", EXIT_FAILED
    elif baseline is None:
        verdict, status, code = "no baseline yet: this run is now the baseline", "baseline", EXIT_OK
    else:
        verdict, status, code = f"no regression against {baseline.name} (threshold {args.threshold}%)", "pass", EXIT_OK
    if failures and status == "regression":
        verdict += f"; also FAILED: {', '.join(failures)}"

    md, png = write_report(report_dir, run, baseline_run, baseline, saved, verdict, regressions, failures,
                           differences, args.threshold, args.smoke)
    if saved is not None:
        history = load_history(storage)
        history["runs"].append({"file": saved.name, "status": status, "baseline": baseline.name if baseline else None,
                                "threshold": args.threshold, "smoke": args.smoke,
                                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                "regressions": [f"{r['name']}: {r['why']}" for r in regressions]})
        save_history(storage, history)

    print()
    for r in regressions:
        print(f"regressed: {r['name']}: {r['why']} [{r['check']}]")
    for note in differences:
        print(f"warning: the baseline ran elsewhere: {note}")
    print(f"nightly: {verdict}")
    print(f"nightly: saved {saved or '(nothing)'}; report {md} and {png}")
    return code


if __name__ == "__main__":
    sys.exit(main())
