"""The example third-party plugin (examples/ddpm-perf-step-stats), installed as a user would.

The module fixture pip-installs a copy of the example into this environment (a copy, so the
build's build/ and *.egg-info stay out of the source tree), and uninstalls it afterwards; the
CLI runs as a subprocess, so entry points are discovered exactly as in real use.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import torch

from ddpm_perf.diffusion.schedule import ScheduleConfig
from ddpm_perf.model.checkpoint import save_checkpoint
from ddpm_perf.model.config import CONFIGS
from ddpm_perf.model.unet import UNet

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddpm-perf-step-stats"
DIST = "ddpm-perf-step-stats"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def listed_plugins(cwd: Path) -> dict[str, dict]:
    result = run("-m", "ddpm_perf", "plugins", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("example_plugin")


@pytest.fixture(scope="module")
def installed(workdir):
    """Install the example; on teardown uninstall it and check that it is gone from the listing."""
    try:  # already installed (e.g. `pip install -e` from its README): put it back afterwards
        previous = json.loads(md.distribution(DIST).read_text("direct_url.json") or "null")
    except md.PackageNotFoundError:
        previous = None
    source = workdir / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = run("-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(source), cwd=workdir)
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    try:
        yield source
    finally:
        result = run("-m", "pip", "uninstall", "-y", "-q", DIST, cwd=workdir)
        assert result.returncode == 0, f"pip uninstall failed:\n{result.stderr}"
        assert "step_stats" not in listed_plugins(workdir), "step_stats is still listed after uninstalling"
        if previous and previous.get("url", "").startswith("file://"):
            editable = ["-e"] if previous.get("dir_info", {}).get("editable") else []
            run("-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", *editable,
                url2pathname(urlparse(previous["url"]).path), cwd=workdir)


@pytest.fixture(scope="module")
def tiny_checkpoint(workdir) -> Path:
    """A small random-weight digits model: the embedded checkpoint may not exist yet."""
    config = dataclasses.replace(CONFIGS["digits"], ch=16, num_groups=8)
    torch.manual_seed(0)
    path = workdir / "tiny.safetensors"
    save_checkpoint(path, config, ScheduleConfig(), UNet(config).state_dict())
    return path


def sample(cwd: Path, checkpoint: Path, spec: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("-m", "ddpm_perf", "sample", "--checkpoint", str(checkpoint), "--plugins", spec,
               "--steps", "5", "--num", "2", "--out", str(out), "--no-progress", *extra, cwd=cwd)


def test_listed_with_its_distribution(installed, workdir):
    row = listed_plugins(workdir).get("step_stats")
    assert row is not None, "step_stats is not listed by 'ddpm-perf plugins'"
    assert (row["distribution"], row["version"]) == (DIST, "0.1.0")
    assert row["status"] == "available"
    assert row["phase"] == "runtime"
    assert set(row["options"]) == {"every", "file"}

    text = run("-m", "ddpm_perf", "plugins", cwd=workdir)
    assert text.returncode == 0, text.stderr
    assert "step_stats  (ddpm-perf-step-stats 0.1.0)  phase=runtime  available" in text.stdout


def test_sample_prints_report_line(installed, workdir, tiny_checkpoint):
    out = workdir / "x.png"
    result = sample(workdir, tiny_checkpoint, "step_stats(every=5)", out)
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    lines = result.stdout.splitlines()
    report = [line for line in lines if line.startswith("step_stats: ")]
    assert len(report) == 1, result.stdout
    assert report[0].startswith("step_stats: 2 images, 1 batch(es) x 5 steps; x mean/std ")
    assert "plugins: step_stats" in lines[-1]


def test_sample_writes_csv_over_batches(installed, workdir, tiny_checkpoint):
    out, table = workdir / "y.npz", workdir / "stats.csv"
    result = sample(workdir, tiny_checkpoint, f"step_stats(every=2,file={table})", out, "--num", "3",
                    "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    report = [line for line in result.stdout.splitlines() if line.startswith("step_stats: ")]
    assert len(report) == 1 and report[0].startswith("step_stats: 3 images, 2 batch(es) x 5 steps;"), report
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    # every=2 over 5 steps: steps 0, 2 and the last, 4; for each of the two batches.
    assert [(int(r["batch"]), int(r["step"]), int(r["samples"])) for r in rows] == [
        (0, 0, 2), (0, 2, 2), (0, 4, 2), (1, 0, 1), (1, 2, 1), (1, 4, 1)]
    assert all(float(r["x_std"]) >= 0 and float(r["eps_std"]) > 0 for r in rows)
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp file


@pytest.mark.parametrize("spec, message", [
    ("step_stats(every=x)", "plugin step_stats: option every='x' is not a valid int"),
    ("step_stats(every=0)", "plugin step_stats: option every=0 must be a positive int"),
    ("step_stats(evry=3)", "plugin step_stats: unknown option 'evry'; options: every, file"),
])
def test_bad_option_is_one_line_error(installed, workdir, tiny_checkpoint, spec, message):
    out = workdir / "bad.png"
    result = sample(workdir, tiny_checkpoint, spec, out)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"ddpm-perf: error: {message}"]
    assert not out.exists()
