"""keep_freed_memory: the heap keeps freed activations, so a step stops faulting its memory back in."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ddpm_perf import memory

FAULTS_PER_FORWARD = textwrap.dedent("""
    import resource, sys, torch
    from ddpm_perf import memory
    from ddpm_perf.model.config import CONFIGS
    from ddpm_perf.model.unet import UNet
    if sys.argv[1] == "keep":
        assert memory.keep_freed_memory().startswith("freed memory kept")
    torch.set_num_threads(1)
    model = UNet(CONFIGS["cifar10"]).eval()
    x, t = torch.randn(8, 3, 32, 32), torch.full((8,), 500)
    with torch.inference_mode():
        model(x, t)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(2):
            model(x, t)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 2)
""")


def faults_per_forward(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_FORWARD, mode], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "DDPM_PERF_KEEP_FREED_MEMORY": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_kept_memory_removes_most_page_faults_of_a_forward():
    """cifar10 U-Net, batch 8: glibc's default faults ~14,000 pages back in per forward (measured
    13,600-15,500); with the memory kept, 300-2,200."""
    default, kept = faults_per_forward("default"), faults_per_forward("keep")
    assert default > 5000, default
    assert kept * 4 < default, (kept, default)


def test_it_can_be_turned_off_and_says_why(monkeypatch):
    monkeypatch.setenv("DDPM_PERF_KEEP_FREED_MEMORY", "0")
    assert memory._apply() == "off (DDPM_PERF_KEEP_FREED_MEMORY=0)"
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("DDPM_PERF_KEEP_FREED_MEMORY")
    assert memory._apply().startswith("not applied: the allocator of darwin")
