"""Shared fixtures: tiny models and checkpoints, so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: the suite runs subprocesses (torchrun ranks, the
# CLI) beside itself on 2 cores, where spinning threads slowed steps up to 8x. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ddpm_perf.diffusion.schedule import ScheduleConfig
from ddpm_perf.model.checkpoint import save_checkpoint
from ddpm_perf.model.config import CONFIGS, UNetConfig
from ddpm_perf.model.unet import UNet

# The digits layout (3 levels, attention at 8x8) at a quarter of the width.
TINY = dataclasses.replace(CONFIGS["digits"], ch=8, num_groups=4, dropout=0.0)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> UNetConfig:
    return TINY


@pytest.fixture
def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    """A sampling checkpoint of the tiny model (random weights)."""
    return save_checkpoint(tmp_path / "tiny.safetensors", TINY, ScheduleConfig(), tiny_model.state_dict())


def assert_user_error(result, *fragments):
    """A click result that failed as a user error: exit 2, one 'ddpm-perf: error:' line naming ``fragments``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm-perf: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
