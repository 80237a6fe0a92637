"""Packaging. Top-level folders other than the core are installed under the core's name:
plugins/ as ddpm_perf_plugins and triton_kernels/ as ddpm_perf_triton (bare 'plugins' or
'triton_kernels' packages would collide with other projects).

The C++ operator library ddpm_perf._C (csrc/) is built with torch.utils.cpp_extension and ninja:
a CppExtension, or a CUDAExtension with csrc/cuda/*.cu when torch has CUDA and nvcc is found.
It is optional: without a compiler (or with DDPM_PERF_NO_EXTENSION=1) the package installs and
runs on the reference implementations, and `ddpm-perf info` says why. Install with
`pip install --no-build-isolation` so the extension is built against the torch it runs with.
"""

import glob
import os
import sys

from setuptools import setup

PLUGINS = {
    "channels_last": "ddpm_perf_plugins.channels_last:ChannelsLast",
    "amp": "ddpm_perf_plugins.amp:Amp",
    "tf32": "ddpm_perf_plugins.tf32:TF32",
    "prepack": "ddpm_perf_plugins.prepack:Prepack",
    "compile": "ddpm_perf_plugins.compile:Compile",
    "checkpoint": "ddpm_perf_plugins.checkpoint:Checkpoint",
    "cuda_graphs": "ddpm_perf_plugins.cuda_graphs:CudaGraphs",
    "deep_cache": "ddpm_perf_plugins.deep_cache:DeepCache",
    "early_exit": "ddpm_perf_plugins.early_exit:EarlyExit",
    "fused_norm": "ddpm_perf_plugins.fused_norm:FusedNorm",
    "int8": "ddpm_perf_plugins.int8:Int8",
    "fused_attention": "ddpm_perf_plugins.fused_attention:FusedAttention",
    "fused_dropout": "ddpm_perf_plugins.fused_dropout:FusedDropout",
    "patch_parallel": "ddpm_perf_plugins.patch_parallel:PatchParallel",
    "step_aware": "ddpm_perf_plugins.step_aware:StepAware",
}


def extension_build():
    """(ext_modules, cmdclass) for ddpm_perf._C, or ([], {}) with a note when it cannot be built."""
    if os.environ.get("DDPM_PERF_NO_EXTENSION") == "1":
        print("ddpm-perf: DDPM_PERF_NO_EXTENSION=1, not building ddpm_perf._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("ddpm-perf: torch is not importable at build time (install it first and use "
              "--no-build-isolation); ddpm_perf._C not built", file=sys.stderr)
        return [], {}

    debug = os.environ.get("DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp", f'-DDDPM_PERF_TORCH_VERSION="{torch.__version__}"']
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    use_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("DDPM_PERF_NO_CUDA") != "1"
    if use_cuda:
        ext = CUDAExtension("ddpm_perf._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("ddpm_perf._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves the package usable on the reference ops instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler missing or broken: say so, install anyway
                print(f"ddpm-perf: WARNING: ddpm_perf._C was not built ({error}); "
                      "the ops fall back to their reference implementations", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = extension_build()

setup(
    name="ddpm-perf",
    version="0.1.0",
    description="Fast DDPM sampling and training on CPU and GPU, with pluggable speedups",
    python_requires=">=3.10",
    packages=["ddpm_perf", "ddpm_perf.model", "ddpm_perf.diffusion", "ddpm_perf.data", "ddpm_perf.metrics",
              "ddpm_perf.ops", "ddpm_perf_plugins", "ddpm_perf_plugins.patch_parallel", "ddpm_perf_triton"],
    package_dir={"ddpm_perf": "ddpm_perf", "ddpm_perf_plugins": "plugins", "ddpm_perf_triton": "triton_kernels"},
    package_data={"ddpm_perf": ["assets/*.safetensors", "assets/*.int8.json"],
                  "ddpm_perf_plugins": ["assets/*.safetensors", "assets/*.step_aware.json"]},  # the plugins' models
    install_requires=[
        "torch>=2.4",  # install the build you want first (the Makefile pins the CPU build)
        "numpy", "click>=8", "pluggy>=1.3", "safetensors>=0.4", "tqdm", "pillow",
        "scikit-learn",  # the digits data set
        "scipy",  # sqrtm of the Frechet distance
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis", "diffusers>=0.30", "matplotlib", "scipy",
                 "expecttest",  # torch.library.opcheck imports it
                 "triton>=3.2; platform_system == 'Linux'"],  # the Triton kernels' tests run in its interpreter
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={
        "console_scripts": ["ddpm-perf = ddpm_perf.cli:main"],
        "ddpm_perf.plugins": [f"{name} = {target}" for name, target in PLUGINS.items()],
    },
)
