"""Packaging. Top-level folders other than the core are installed under the core's name:
plugins/ as ddpm_perf_plugins (a bare 'plugins' package would collide with other projects)."""

from setuptools import setup

PLUGINS = {
    "channels_last": "ddpm_perf_plugins.channels_last:ChannelsLast",
    "amp": "ddpm_perf_plugins.amp:Amp",
    "tf32": "ddpm_perf_plugins.tf32:TF32",
    "compile": "ddpm_perf_plugins.compile:Compile",
    "checkpoint": "ddpm_perf_plugins.checkpoint:Checkpoint",
    "cuda_graphs": "ddpm_perf_plugins.cuda_graphs:CudaGraphs",
    "deep_cache": "ddpm_perf_plugins.deep_cache:DeepCache",
    "early_exit": "ddpm_perf_plugins.early_exit:EarlyExit",
}

setup(
    name="ddpm-perf",
    version="0.1.0",
    description="Fast DDPM sampling and training on CPU and GPU, with pluggable speedups",
    python_requires=">=3.10",
    packages=["ddpm_perf", "ddpm_perf.model", "ddpm_perf.diffusion", "ddpm_perf.data", "ddpm_perf.metrics",
              "ddpm_perf_plugins"],
    package_dir={"ddpm_perf": "ddpm_perf", "ddpm_perf_plugins": "plugins"},
    package_data={"ddpm_perf": ["assets/*.safetensors"]},
    install_requires=[
        "torch>=2.4",  # install the build you want first (the Makefile pins the CPU build)
        "numpy", "click>=8", "pluggy>=1.3", "safetensors>=0.4", "tqdm", "pillow",
        "scikit-learn",  # the digits data set
        "scipy",  # sqrtm of the Frechet distance
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis", "diffusers>=0.30", "matplotlib", "scipy"],
    },
    entry_points={
        "console_scripts": ["ddpm-perf = ddpm_perf.cli:main"],
        "ddpm_perf.plugins": [f"{name} = {target}" for name, target in PLUGINS.items()],
    },
)
