"""Multi-process runs under torchrun with gloo on the CPU (2 processes, 1 thread each)."""

import os
import subprocess
import sys

import numpy as np
import pytest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_data_parallel_sampling_equals_one_process(tiny_checkpoint, tmp_path):
    args = ["sample", "--checkpoint", str(tiny_checkpoint), "--num-images", "5", "--batch-size", "2",
            "--steps", "3", "--eta", "1", "--no-progress"]
    two = run([*TORCHRUN, "-m", "ddpm_perf", *args, "--out", "two.npz"], tmp_path)
    assert two.returncode == 0, two.stderr
    assert "rank 0 of 2" in two.stdout and two.stdout.count("wrote 5 images") == 1  # rank 0 writes, alone
    one = run([sys.executable, "-m", "ddpm_perf", *args, "--out", "one.npz"], tmp_path)
    assert one.returncode == 0, one.stderr
    a, b = np.load(tmp_path / "two.npz")["images"], np.load(tmp_path / "one.npz")["images"]
    assert a.shape == (5, 16, 16, 1)
    np.testing.assert_array_equal(a, b)
