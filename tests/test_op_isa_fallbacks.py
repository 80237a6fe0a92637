"""The CPU kernels' fallback paths: the op tests again with DDPM_PERF_ISA capping the instruction
set (AVX-512 VNNI without AMX, AVX-512 without VNNI, AVX2, portable C++), each in a fresh process (the choice is made once)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_perf import ops

pytestmark = pytest.mark.skipif(ops.extension_status() != "loaded", reason=f"ddpm_perf._C: {ops.extension_status()}")

TESTS = Path(__file__).parent


@pytest.mark.parametrize("isa", ["avx512-vnni", "avx512", "avx2", "scalar"])
def test_op_tests_pass_on_the_fallback_path(isa):
    env = {**os.environ, "DDPM_PERF_ISA": isa}
    probe = subprocess.run([sys.executable, "-c", "import ddpm_perf.ops, torch; print(torch.ops.ddpm_perf.cpu_isa())"],
                           env=env, capture_output=True, text=True, check=True)
    if probe.stdout.strip() != isa:
        pytest.skip(f"this CPU has no {isa} path (it offers {probe.stdout.strip()})")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             str(TESTS / "test_op_int8_conv2d.py"), str(TESTS / "test_op_group_norm_silu.py"),
                             str(TESTS / "test_op_dropout.py")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
