"""The benchmark suites (benchmarks/, outside testpaths) must keep running: run them in their
smoke mode (digits-size U-Net, 2 steps, no timing statistics) in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmarks_run_in_smoke_mode():
    pytest.importorskip("pytest_benchmark")
    env = {**os.environ, "DDPM_PERF_BENCH_SMOKE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "benchmarks", "--benchmark-disable", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # the run's summary of ratios names the tiny config: the smoke mode was on
    assert "(digits, batch 8, DDIM 2)" in result.stdout, result.stdout[-4000:]
