"""ddpm-perf: a DDPM core (U-Net, diffusion, samplers, trainer) with hook points for speedup plugins."""

__version__ = "0.1.0"
