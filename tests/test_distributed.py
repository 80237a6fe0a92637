"""Multi-process runs under torchrun with gloo on the CPU (2 processes, 1 thread each)."""

import os
import subprocess
import sys

import numpy as np
import torch

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


def _train(tmp_path, launcher, out, *extra):
    args = ["train", "--config", "digits", "--dropout", "0", "--batch-size", "8", "--warmup", "1",
            "--ema-decay", "0.5", "--checkpoint-every", "2", "--no-progress", *extra]
    if not any(a == "--resume" for a in extra):
        args += ["--out", out]
    result = run([*launcher, "-m", "ddpm_perf", *args], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _weights(path):
    from ddpm_perf.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, with_training=True)
    return {**ckpt.weights, **{k: v for k, v in ckpt.train_tensors.items() if k.startswith("model.")}}


def test_ddp_training_matches_one_process_and_resumes_with_another_world_size(tmp_path):
    """The global batch is split over ranks, so 2 processes follow the 1-process run (up to the
    order of float reductions), and a run can continue with a different number of processes."""
    single = [sys.executable]
    _train(tmp_path, single, "one", "--steps", "4")
    two = _train(tmp_path, TORCHRUN, "two", "--steps", "2")
    assert "2 processes" in two.stdout and two.stdout.count("trained to step 2") == 1
    _train(tmp_path, single, "two", "--steps", "4", "--resume", "two/checkpoint.safetensors")
    a, b = _weights(tmp_path / "one" / "checkpoint.safetensors"), _weights(tmp_path / "two" / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_ddp_global_batch_must_divide(tmp_path):
    result = run([*TORCHRUN, "-m", "ddpm_perf", "train", "--batch-size", "5", "--steps", "1", "--out", "x",
                  "--no-progress"], tmp_path)
    assert result.returncode != 0
    # every rank says it in one line; the traceback that follows is torchrun's own report, not ours
    assert result.stderr.count("is not divisible by the 2 processes") == 2
    assert "/ddpm_perf/" not in result.stderr
