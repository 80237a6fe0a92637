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
        """Time the first call (compilation) apart from the steady state that follows."""
        timing = {"first": None, "steady": 0.0, "calls": 0, "line": len(ctx.report)}
        ctx.report.append("compile: not run")
        on_gpu = ctx.device.type == "cuda"  # no per-step sync: GPU steady state is not timed here

        def denoise(x, t, plan):
            start = time.perf_counter()
            eps = fn(x, t, plan)
            if timing["first"] is None:
                if on_gpu:
                    torch.cuda.synchronize(x.device)
                timing["first"] = time.perf_counter() - start
            elif not on_gpu:
                timing["steady"] += time.perf_counter() - start
                timing["calls"] += 1
            line = f"compile: first step {timing['first']:.1f} s (includes compilation)"
            if timing["calls"]:
                line += f"; then {timing['steady'] / timing['calls'] * 1e3:.1f} ms/step over {timing['calls']} steps"
            ctx.report[timing["line"]] = line
            return eps

        return denoise
