"""The command line: outputs, and every user error as one line, exit 2, nothing written."""

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpm_perf.cli import main
from ddpm_perf.model.checkpoint import default_checkpoint, load_checkpoint

from conftest import assert_user_error


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sample(ckpt, out, *extra):
    return run("sample", "--checkpoint", ckpt, "--steps", 3, "--num", 3, "--batch-size", 2, "--no-progress",
               "--out", out, *extra)


def test_sample_writes_a_grid_an_npz_and_a_folder(tiny_checkpoint, tmp_path):
    result = sample(tiny_checkpoint, tmp_path / "grid.png")
    assert result.exit_code == 0, result.output
    assert "wrote 3 images" in result.output and "images/s" in result.output and "peak" in result.output
    assert Image.open(tmp_path / "grid.png").size == (2 * 18 + 2, 2 * 18 + 2)

    assert sample(tiny_checkpoint, tmp_path / "a.npz").exit_code == 0
    images = np.load(tmp_path / "a.npz")["images"]
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8

    assert sample(tiny_checkpoint, tmp_path / "each").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    # the folder holds the same images as the array
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "each" / "000001.png")), images[1, ..., 0])


@pytest.mark.parametrize("args", [["--sampler", "ddpm"], ["--sampler", "dpmpp"],
                                  ["--sampler", "ddpm", "--variance", "fixed_small", "--no-clip-sample"],
                                  ["--sampler", "ddim", "--eta", "1", "--spacing", "trailing"]])
def test_other_samplers_run(tiny_checkpoint, tmp_path, args):
    result = sample(tiny_checkpoint, tmp_path / "x.png", *args)
    assert result.exit_code == 0, result.output


def test_channels_last_gives_the_same_images(tiny_checkpoint, tmp_path):
    assert sample(tiny_checkpoint, tmp_path / "a.npz").exit_code == 0
    result = sample(tiny_checkpoint, tmp_path / "b.npz", "--plugins", "channels_last")
    assert result.exit_code == 0 and "plugins: channels_last" in result.output
    a, b = np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # rounding at a uint8 boundary at most


@pytest.mark.parametrize("args,fragments", [
    (["--plugins", "warp_drive"], ["unknown plugin 'warp_drive'", "channels_last"]),
    (["--plugins", "channels_last(speed=9)"], ["unknown option 'speed'"]),
    (["--plugins", "channels_last(("], ["nested parentheses"]),
    (["--plugins", "channels_last,channels_last"], ["given twice"]),
    (["--num", "0"], ["--num must be positive"]),
    (["--steps", "-1"], ["--steps must be positive"]),
    (["--batch-size", "0"], ["--batch-size must be positive"]),
    (["--device", "cuda"], ["--device cuda", "--device cpu"]),
    (["--device", "tpu9"], ["--device"]),
    (["--sampler", "ddpm", "--eta", "0.5"], ["--eta applies to the ddim sampler only"]),
    (["--sampler", "ddim", "--variance", "fixed_small"], ["--variance applies to the ddpm sampler only"]),
    (["--sampler", "dpmpp", "--steps", "1000"], ["repeats timesteps"]),
    (["--sampler", "ddpm", "--spacing", "trailing"], ["leading spacing only"]),
])
def test_bad_sample_options(tiny_checkpoint, tmp_path, args, fragments):
    out = tmp_path / "x.png"
    assert_user_error(sample(tiny_checkpoint, out, *args), *fragments)
    assert not out.exists()


def test_bad_checkpoints(tmp_path, tiny_checkpoint):
    out = tmp_path / "x.png"
    assert_user_error(sample(tmp_path / "missing.safetensors", out), "does not exist")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:500])
    assert_user_error(sample(truncated, out), "truncated or not a safetensors")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    assert_user_error(sample(notes, out), "truncated or not a safetensors")
    assert not out.exists()


def test_out_folder_must_exist(tiny_checkpoint, tmp_path):
    assert_user_error(sample(tiny_checkpoint, tmp_path / "no" / "such" / "x.png"), "does not exist")
    assert_user_error(sample(tiny_checkpoint, tmp_path / "x.jpg"), "FILE.png")


def test_nan_during_sampling_is_reported_with_its_step(tmp_path, tiny_config):
    import torch

    from ddpm_perf.diffusion.schedule import ScheduleConfig
    from ddpm_perf.model.checkpoint import save_checkpoint
    from ddpm_perf.model.unet import UNet

    state = UNet(tiny_config).state_dict()
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("inf"))
    ckpt = save_checkpoint(tmp_path / "inf.safetensors", tiny_config, ScheduleConfig(), state)
    out = tmp_path / "x.png"
    assert_user_error(sample(ckpt, out), "NaN or Inf at step 1/3")
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ddpm_perf", "--debug", "sample", "--checkpoint",
                             tmp_path / "missing.safetensors", "--out", tmp_path / "x.png"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "does not exist" in result.stderr
    plain = subprocess.run([sys.executable, "-m", "ddpm_perf", "sample", "--checkpoint",
                            tmp_path / "missing.safetensors", "--out", tmp_path / "x.png"],
                           capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr


def test_train_errors(tmp_path):
    assert_user_error(run("train", "--config", "nope", "--out", tmp_path / "r"), "unknown model config")
    assert_user_error(run("train", "--config", "cifar10", "--data", "cifar10", "--out", tmp_path / "r"),
                      "cifar-10-python.tar.gz")
    assert_user_error(run("train", "--resume", tmp_path / "none.safetensors"), "does not exist")
    assert_user_error(run("train", "--data", "folder", "--out", tmp_path / "r"), "needs its folder: pass --data-dir")
    assert_user_error(run("train", "--steps", "0"), "--steps must be positive")
    assert_user_error(run("train", "--distill", "1", "--out", tmp_path / "r"), "--distill needs --init")
    assert_user_error(run("train", "--distill", "2", "--out", tmp_path / "r"), "--distill must be in [0, 1]")
    assert not (tmp_path / "r").exists()


def test_train_then_resume_then_sample_from_the_run(tmp_path):
    out = tmp_path / "run"
    common = ["--batch-size", 4, "--checkpoint-every", 2, "--no-progress"]
    result = run("train", "--config", "digits", "--out", out, "--steps", 2, "--warmup", 1, "--plugins",
                 "channels_last", *common)
    assert result.exit_code == 0, result.output
    assert "trained to step 2" in result.output
    result = run("train", "--resume", out / "checkpoint.safetensors", "--steps", 3, "--no-progress")
    assert result.exit_code == 0 and "trained to step 3 (1 steps" in result.output
    assert load_checkpoint(out / "checkpoint.safetensors").trained_with == "channels_last"  # the run's plugins
    assert run("convert", out / "checkpoint.safetensors", tmp_path / "slim.safetensors", "--dtype",
               "float16").exit_code == 0
    assert (tmp_path / "slim.safetensors").stat().st_size < (out / "checkpoint.safetensors").stat().st_size / 4
    assert sample(tmp_path / "slim.safetensors", tmp_path / "s.png").exit_code == 0


def test_plugins_and_info_commands():
    result = run("plugins")
    assert result.exit_code == 0 and "channels_last" in result.output and "phase=layout" in result.output
    result = run("info")
    assert result.exit_code == 0 and "torch" in result.output and "cpu features" in result.output


@pytest.mark.skipif(not default_checkpoint().exists(), reason="embedded model not built yet")
def test_default_model_samples_out_of_the_box(tmp_path):
    result = run("sample", "--num", 4, "--steps", 5, "--no-progress", "--out", tmp_path / "d.png")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["sample", "train", "plugins", "info", "convert"])
def test_help_everywhere(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output
