"""Compile checks for the CUDA implementations in csrc/cuda/*.cu.

No GPU is needed, only nvcc: each file is compiled once per session (all files in parallel)
with the flags torch's CUDAExtension uses, for sm_90, and the results are checked:

- the compile succeeds (nvcc's output is shown when it does not);
- the host object defines the launch stubs of the expected kernels and the
  TORCH_LIBRARY_IMPL(ddpm_perf, CUDA, ...) registration;
- the sm_90 cubin (kept with nvcc --keep) defines the expected kernels as device entry points,
  and ptxas compiled each of them for sm_90;
- the int8 convolution multiplies uint8 activations by int8 weights with the mixed-sign dp4a.

Nothing here runs a kernel: their numerics are checked against ddpm_perf/ops/reference.py only
on a machine with a GPU.

On a CPU build of torch, cpp_extension does not resolve CUDA_HOME, so include_paths("cuda")
raises; the torch include dirs suffice (nvcc adds its own toolkit include dir). A CPU wheel
also lacks the generated c10/cuda/impl/cuda_cmake_macros.h (it only sets Windows DLL export
macros), so -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE is passed when that file is missing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")
NM = shutil.which("nm")
TORCH_INCLUDE = Path(torch.__file__).resolve().parent / "include"
ARCH = "sm_90"
COMPILE_TIMEOUT_S = 1200

# What each file must contain: kernel names (as `nm -C` prints them, without arguments) and the
# ops its TORCH_LIBRARY_IMPL registers.
_NS = "ddpm_perf::(anonymous namespace)::"
EXPECTED = {
    "group_norm_silu.cu": {
        "kernels": [f"{_NS}group_norm_silu_forward_kernel<{t}, {o or t}, {cl}>"
                    for t in ("float", "c10::Half", "c10::BFloat16") for o in ("", "unsigned char")
                    for cl in ("false", "true")]
        + [f"{_NS}group_norm_silu_backward_kernel<{t}, {cl}>"
           for t in ("float", "c10::Half", "c10::BFloat16") for cl in ("false", "true")]
        + [f"{_NS}group_norm_param_grad_kernel"],
        "ops": ["group_norm_silu", "group_norm_silu_quantized", "group_norm_silu_backward"],
    },
    "int8_conv2d.cu": {
        "kernels": [f"{_NS}int8_pack_weight_kernel"]
        + [f"{_NS}quantize_activation_kernel<{t}>" for t in ("float", "c10::Half", "c10::BFloat16", "unsigned char")]
        + [f"{_NS}int8_conv2d_dp4a_kernel<{t}>" for t in ("float", "c10::Half", "c10::BFloat16")],
        "ops": ["int8_pack_weight", "int8_conv2d"],
    },
}

# The tests that compile (the `builds` fixture) are slow and skip without nvcc; the source checks
# run everywhere.
compiles = pytest.mark.slow


def _include_dirs() -> list[str]:
    """torch's include dirs for a CUDA extension (its signature changed across torch versions)."""
    params = inspect.signature(cpp_extension.include_paths).parameters
    try:
        if "device_type" in params:
            dirs = cpp_extension.include_paths(device_type="cuda")
        else:  # older torch: include_paths(cuda=True)
            dirs = cpp_extension.include_paths(cuda=True)
    except OSError:  # CPU torch: CUDA_HOME unresolved; nvcc finds its own headers
        dirs = cpp_extension.include_paths()
    python_include = sysconfig.get_path("include", scheme="posix_prefix")
    return [*dirs, python_include]


def nvcc_command(source: Path, obj: Path, keep_dir: Path) -> list[str]:
    """nvcc with the flags torch's CUDAExtension (setup.py) passes, for sm_90, keeping the PTX and
    cubin, with ptxas reporting each entry function it compiles."""
    common = getattr(cpp_extension, "COMMON_NVCC_FLAGS", None) or [
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    cmd = [NVCC, f"-arch={ARCH}", "-std=c++17", "-O3", "-c", str(source), "-o", str(obj),
           "-Xcompiler", "-fPIC", "-Xptxas", "-v", "--keep", "--keep-dir", str(keep_dir), *common,
           "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if not (TORCH_INCLUDE / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU wheel: see the module docstring
    for include in _include_dirs():
        cmd += ["-isystem", include]
    return cmd


@dataclasses.dataclass
class Build:
    source: Path
    command: list[str]
    returncode: int
    output: str  # nvcc's stdout + stderr (ptxas -v reports go to stderr)
    obj: Path
    keep_dir: Path
    seconds: float

    def failure_report(self) -> str:
        return (f"nvcc failed ({self.returncode}) on {self.source.name} after {self.seconds:.0f} s\n"
                f"command: {' '.join(self.command)}\n{self.output}")

    def require_success(self) -> None:
        if self.returncode != 0:
            pytest.fail(self.failure_report(), pytrace=False)

    def kept(self, suffix: str) -> Path:
        path = self.keep_dir / f"{self.source.stem}{suffix}"
        assert path.exists(), f"nvcc --keep left no {path.name} in {self.keep_dir}: {sorted(os.listdir(self.keep_dir))}"
        return path


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Build]:
    """Every csrc/cuda/*.cu compiled once for the module, all at once (each takes ~1 min)."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compile-checked")
    if not (TORCH_INCLUDE / "c10" / "cuda" / "CUDAStream.h").exists():
        pytest.skip("this torch ships no c10/cuda headers to compile the CUDA sources against")
    jobs = []
    for source in SOURCES:
        work = tmp_path_factory.mktemp(f"nvcc_{source.stem}")
        keep_dir = work / "keep"
        keep_dir.mkdir()
        jobs.append((source, work, keep_dir))
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs) or 1) as pool:
        results = dict(pool.map(lambda job: (job[0].name, _compile(*job)), jobs))
    for build in results.values():
        print(f"nvcc {build.source.name}: {build.seconds:.1f} s (exit {build.returncode})")
    return results


def _compile(source: Path, work: Path, keep_dir: Path) -> Build:
    obj = work / f"{source.stem}.o"
    cmd = nvcc_command(source, obj, keep_dir)
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work,
                              timeout=COMPILE_TIMEOUT_S)
        returncode, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as timeout:
        partial = timeout.output or ""
        if isinstance(partial, bytes):  # TimeoutExpired may carry bytes even with text=True
            partial = partial.decode(errors="replace")
        returncode, output = -1, f"(timed out after {COMPILE_TIMEOUT_S} s)\n{partial}"
    return Build(source, cmd, returncode, output, obj, keep_dir, time.monotonic() - start)


def _nm(path: Path) -> str:
    if NM is None:
        pytest.skip("nm (binutils) is not on PATH")
    return subprocess.run([NM, "-C", str(path)], capture_output=True, text=True, check=True).stdout


def _defined_functions(nm_output: str) -> set[str]:
    """Names of the text symbols (T/t/W/w) in `nm -C` output, with their argument lists removed."""
    names = set()
    for line in nm_output.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[1] in "TtWw":
            names.add(_strip_signature(parts[2]))
    return names


def _strip_signature(name: str) -> str:
    """`void ns::k<float>(float const*) [clone .cold]` -> `ns::k<float>` (the argument list dropped)."""
    name = re.sub(r"( \[clone [^\]]*\])+$", "", name)
    if name.startswith("void "):
        name = name[len("void "):]
    if name.endswith(")"):  # drop the trailing (balanced) argument list
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                return name[:i]
    return name


def test_every_source_has_expectations():
    assert SOURCES, "no csrc/cuda/*.cu found"
    missing = [s.name for s in SOURCES if s.name not in EXPECTED]
    assert not missing, f"add the kernels of {missing} to EXPECTED in {Path(__file__).name}"


@pytest.mark.parametrize("name", [s.name for s in SOURCES])
def test_source_conventions(name):
    """No torch/extension.h (pytorch/extension-cpp#112); every launch on the current stream,
    checked with C10_CUDA_KERNEL_LAUNCH_CHECK."""
    text = (ROOT / "csrc" / "cuda" / name).read_text()
    assert "<torch/extension.h>" not in text
    assert "at::cuda::getCurrentCUDAStream()" in text
    launches = re.findall(r"<<<([^>]*)>>>", text)
    assert launches, "no kernel launch found"
    for config in launches:
        assert config.split(",")[-1].strip() == "stream", f"kernel launched off the current stream: <<<{config}>>>"
    assert text.count("C10_CUDA_KERNEL_LAUNCH_CHECK()") >= 1
    for op in EXPECTED[name]["ops"]:
        assert f'm.impl("{op}"' in text, f"{op} is not registered in {name}"


@compiles
@pytest.mark.parametrize("name", [s.name for s in SOURCES])
def test_compiles_for_sm90(builds, name):
    build = builds[name]
    build.require_success()
    assert build.obj.exists() and build.obj.stat().st_size > 0


@compiles
@pytest.mark.parametrize("name", [s.name for s in SOURCES])
def test_host_object_has_kernels_and_registration(builds, name):
    build = builds[name]
    build.require_success()
    nm_output = _nm(build.obj)
    defined = _defined_functions(nm_output)
    missing = [k for k in EXPECTED[name]["kernels"] if k not in defined]
    assert not missing, f"{name}: no host launch stub for {missing}"
    assert "TORCH_LIBRARY_IMPL_static_init_ddpm_perf_CUDA" in nm_output, "no TORCH_LIBRARY_IMPL(ddpm_perf, CUDA, m)"


@compiles
@pytest.mark.parametrize("name", [s.name for s in SOURCES])
def test_sm90_cubin_has_kernels(builds, name):
    build = builds[name]
    build.require_success()
    defined = _defined_functions(_nm(build.kept(f".{ARCH}.cubin")))
    missing = [k for k in EXPECTED[name]["kernels"] if k not in defined]
    assert not missing, f"{name}: the {ARCH} cubin lacks {missing}"
    entries = re.findall(rf"Compiling entry function '([^']+)' for '{ARCH}'", build.output)
    assert len(entries) == len(EXPECTED[name]["kernels"]), (
        f"ptxas compiled {len(entries)} entry functions for {ARCH}, expected {len(EXPECTED[name]['kernels'])}:\n"
        + build.output)


@compiles
def test_int8_conv2d_uses_mixed_sign_dp4a(builds):
    """uint8 activations x int8 weights: dp4a.u32.s32 (a unsigned, b signed), never the
    both-signed or both-unsigned forms, which would misread one operand."""
    build = builds["int8_conv2d.cu"]
    build.require_success()
    ptx = build.kept(".ptx").read_text()
    assert f".target {ARCH}" in ptx
    assert "dp4a.u32.s32" in ptx
    assert "dp4a.s32.s32" not in ptx and "dp4a.u32.u32" not in ptx
