"""compile: torch.compile the U-Net; compilation time is reported apart from steady-state time."""

from __future__ import annotations

import time

import torch

from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Option, Phase, Plugin

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Compile(Plugin):
    name = "compile"
    description = "torch.compile the U-Net (inductor by default); the first step includes compilation."
    phase = Phase.COMPILE
    options = {
        "mode": Option(str, "default", "torch.compile mode", choices=MODES),
        "fullgraph": Option(bool, False, "fail on any graph break instead of splitting the graph"),
        "dynamic": Option(bool, False, "compile for dynamic shapes (one graph for every batch size)"),
        "backend": Option(str, "inductor", "torch.compile backend (inductor, aot_eager, eager, ...)"),
    }

    @classmethod
    def available(cls):
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        return None

    @hookimpl
    def transform_model(self, model, ctx):
        o = self.opts
        return torch.compile(model, mode=o.mode, fullgraph=o.fullgraph, dynamic=o.dynamic, backend=o.backend)

    @hookimpl
    def wrap_denoiser(self, fn, ctx):
        first = {"pending": True}

        def denoise(x, t, plan):
            if not first["pending"]:
                return fn(x, t, plan)
            start = time.perf_counter()
            eps = fn(x, t, plan)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            first["pending"] = False
            ctx.report.append(f"compile: first step (compilation) took {time.perf_counter() - start:.1f} s; "
                              "the closing timings include it")
            return eps

        return denoise
