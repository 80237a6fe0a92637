"""The benchmark suites (benchmarks/, outside testpaths) must keep running: run them in their
smoke mode (digits-size U-Net, 2 steps, no timing statistics) in a subprocess. Every file of
benchmarks/ must pass at least one benchmark; the only skips allowed are the torch.compile
ones (minutes of compilation: skipped in smoke runs by design)."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmarks_run_in_smoke_mode(tmp_path):
    pytest.importorskip("pytest_benchmark")
    env = {**os.environ, "DDPM_PERF_BENCH_SMOKE": "1"}
    env.pop("DDPM_PERF_BENCH_INJECT_SLOWDOWN", None)
    from ddpm_perf.model.checkpoint import default_checkpoint

    if not default_checkpoint().is_file() and "DDPM_PERF_BENCH_QUALITY_CHECKPOINT" not in env:
        # no embedded digits model yet: run the quality suite's machinery on random weights
        import torch

        from ddpm_perf.diffusion.schedule import ScheduleConfig
        from ddpm_perf.model.checkpoint import save_checkpoint
        from ddpm_perf.model.config import CONFIGS
        from ddpm_perf.model.unet import UNet

        torch.manual_seed(0)
        env["DDPM_PERF_BENCH_QUALITY_CHECKPOINT"] = str(save_checkpoint(
            tmp_path / "digits_random.safetensors", CONFIGS["digits"], ScheduleConfig(),
            UNet(CONFIGS["digits"]).state_dict()))
    junit = tmp_path / "junit.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "benchmarks", "--benchmark-disable", "-p", "no:cacheprovider",
         "-rs", f"--junit-xml={junit}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # the run's summary of ratios names the tiny config: the smoke mode was on
    assert "(digits, batch 8, DDIM 2)" in result.stdout, result.stdout[-4000:]

    passed: dict[str, int] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        skipped = case.find("skipped")
        if skipped is not None:
            assert "compile" in case.get("name", ""), f"{module}::{case.get('name')} skipped: {skipped.get('message')}"
        else:
            passed[module] = passed.get(module, 0) + 1
    files = {p.stem for p in (ROOT / "benchmarks").glob("test_*.py")}
    assert files <= set(passed), f"no benchmark passed in {sorted(files - set(passed))}"
