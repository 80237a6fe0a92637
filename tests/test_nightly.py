"""The nightly benchmark run (benchmarks/nightly.py) catches a regression: three smoke runs of two
tiny forward benchmarks into one temporary storage — a baseline, a run with a slowdown injected
into one benchmark (DDPM_PERF_BENCH_INJECT_SLOWDOWN, read by benchmarks/conftest.py), and a
clean run, which passes against the last run that did not regress."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NIGHTLY = ROOT / "benchmarks" / "nightly.py"
# eager and channels_last forwards of the digits U-Net (~20-60 ms a call on the 2-core machines)
SELECTION = ["--", "benchmarks/test_plugins.py", "-k", "eager or channels_last and not amp", "-q"]
SLOW = "test_forward[channels_last]"
# Injected: 0.25 s a call, 4-12x the call; the threshold (100%) is far above the noise of a median of 5.
INJECT = "0.25"


def nightly(storage: Path, report: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_PERF_BENCH_")}
    return subprocess.run([sys.executable, str(NIGHTLY), "--smoke", "--storage", str(storage), "--report-dir",
                           str(report), *args], cwd=ROOT, env={**clean, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})},
                          capture_output=True, text=True, timeout=300)


def said(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_nightly_catches_an_injected_slowdown(tmp_path):
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("matplotlib")
    storage = tmp_path / "storage"

    first = nightly(storage, tmp_path / "r1", "--threshold", "100", *SELECTION)
    assert first.returncode == 0, said(first)
    assert "no baseline yet: this run is now the baseline" in first.stdout, said(first)
    report = (tmp_path / "r1" / "report.md").read_text()
    assert f"`{SLOW}`" in report and "`test_forward[eager]`" in report and "speedup vs eager fp32" in report
    assert (tmp_path / "r1" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    slowed = nightly(storage, tmp_path / "r2", "--threshold", "100", *SELECTION,
                     env={"DDPM_PERF_BENCH_INJECT_SLOWDOWN": INJECT, "DDPM_PERF_BENCH_INJECT_INTO": SLOW})
    assert slowed.returncode == 3, said(slowed)
    regressed = [line for line in slowed.stdout.splitlines() if line.startswith("regressed: ")]
    assert regressed and all(SLOW in line for line in regressed), said(slowed)  # the slowed one, only it
    assert any("median time" in line for line in regressed), said(slowed)  # pytest-benchmark's own check
    verdict = [line for line in slowed.stdout.splitlines() if line.startswith("nightly: REGRESSION: 1 benchmark(s)")]
    assert verdict and SLOW in verdict[0], said(slowed)
    report = (tmp_path / "r2" / "report.md").read_text()
    assert "## Regressions" in report and f"- `{SLOW}`" in report and "injected slowdown" in report

    again = nightly(storage, tmp_path / "r3", "--threshold", "100", *SELECTION)
    assert again.returncode == 0, said(again)
    history = json.loads((storage / "smoke" / "nightly-history.json").read_text())["runs"]
    assert [r["status"] for r in history] == ["baseline", "regression", "pass"]
    # compared with the last run that did not regress (the first), not with the slowed one
    assert history[2]["baseline"] == history[0]["file"] and history[0]["file"] in again.stdout, said(again)


def test_compare_only_without_a_baseline_says_how_to_make_one(tmp_path):
    result = nightly(tmp_path / "empty", tmp_path / "r", "--compare-only")
    assert result.returncode == 2, said(result)
    assert "no baseline" in result.stderr and "python benchmarks/nightly.py --smoke" in result.stderr, said(result)
    assert not (tmp_path / "r" / "report.md").exists()  # nothing ran


def test_the_report_shows_quality_against_the_fewer_steps_frontier(tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util

    spec = importlib.util.spec_from_file_location("nightly", NIGHTLY)
    nightly_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nightly_mod)

    def config(name, plugins, time, fd, frontier_fd=None, weights="embedded"):
        c = dict(config=name, plugins=plugins, frontier=frontier_fd is None, relative_time=time, fd_digits=fd,
                 flops_per_image_run=1e9 * time, steps=int(name.split()[1]), weights=weights)
        if frontier_fd is not None:
            c.update(frontier_fd_at_time=frontier_fd, beats_fewer_steps_frontier=fd < frontier_fd)
        return c

    configs = [config("DDIM 10", "none", 0.2, 1.5), config("DDIM 50", "none", 1.0, 1.0),
               config("DDIM 50 + a", "a", 0.5, 1.1, frontier_fd=1.3125), config("DDIM 50 + b", "b", 0.5, 1.4, 1.3125),
               config("DDIM 10 + c", "c", 0.2, 0.9, weights="other"), config("DDIM 50 + c", "c", 1.0, 0.8, weights="other"),
               config("DDIM 10 + d", "d", 0.1, 1.0, frontier_fd=0.9, weights="other")]
    run = {"benchmarks": [{"extra_info": {"configs": configs}}]}
    assert nightly_mod.frontier_sweep(run) == configs
    table = "\n".join(nightly_mod.quality_vs_speed_lines(configs))
    assert "| DDIM 50 + a | embedded | 2.00x | 0.50 | 1.100 | 1.312 | **yes** |" in table
    assert "| DDIM 50 + b | embedded | 2.00x | 0.50 | 1.400 | 1.312 | no |" in table
    assert "| DDIM 10 + d | other | 10.00x | 0.10 | 1.000 | 0.900 | no |" in table
    nightly_mod.plot_quality_vs_speed(configs, tmp_path / "q.png", smoke=True)
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert nightly_mod.frontier_sweep({"benchmarks": [{"extra_info": {}}]}) == []


def test_a_baseline_from_another_cpu_or_wait_policy_is_flagged():
    """The project's machines differ (an AMD EPYC, an Intel Xeon with AMX), and so does a run under
    another OpenMP wait policy: the report says so beside any comparison."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nightly", NIGHTLY)
    nightly_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nightly_mod)
    info = {"cpu": {"brand_raw": "AMD EPYC"}, "torch": "2.13.0", "omp_wait_policy": "PASSIVE"}
    same = nightly_mod.machine_differences({"machine_info": info}, {"machine_info": info})
    other = nightly_mod.machine_differences(
        {"machine_info": {**info, "cpu": {"brand_raw": "Intel(R) Xeon(R) Processor"}, "omp_wait_policy": "ACTIVE"}},
        {"machine_info": info})
    assert same == []
    assert other == ["cpu.brand_raw: 'AMD EPYC' in the baseline, 'Intel(R) Xeon(R) Processor' now",
                     "omp_wait_policy: 'PASSIVE' in the baseline, 'ACTIVE' now"]
