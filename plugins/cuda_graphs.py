"""cuda_graphs: capture one denoiser step as a CUDA graph and replay it every step."""

from __future__ import annotations

import torch

from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Option, Phase, Plugin


class CudaGraphs(Plugin):
    name = "cuda_graphs"
    description = "Capture the denoiser step as a CUDA graph and replay it (removes per-kernel launch cost)."
    phase = Phase.RUNTIME
    options = {"warmup": Option(int, 3, "eager steps on a side stream before capture")}
    # A graph replays one fixed computation: plans that change the network per step cannot be captured.
    conflicts = ("deep_cache", "early_exit", "step_aware")

    @classmethod
    def available(cls):
        if not torch.cuda.is_available():
            return "needs a CUDA device (torch.cuda.is_available() is False here)"
        return None

    @hookimpl
    def configure(self, ctx):
        if ctx.device.type != "cuda":
            raise UserError("plugin cuda_graphs: needs --device cuda")
        if ctx.mode == "train":
            raise UserError("plugin cuda_graphs: sampling only")

    @hookimpl
    def wrap_denoiser(self, fn, ctx):
        graphs: dict[tuple, tuple] = {}  # per input shape: (graph, static x, static t, static eps)

        def denoise(x, t, plan):
            key = (tuple(x.shape), x.dtype)
            if key not in graphs:
                static_x, static_t = x.clone(), t.clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(self.opts.warmup):
                        fn(static_x, static_t, plan)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_eps = fn(static_x, static_t, plan)
                graphs[key] = (graph, static_x, static_t, static_eps)
            graph, static_x, static_t, static_eps = graphs[key]
            static_x.copy_(x)
            static_t.copy_(t)
            graph.replay()
            return static_eps.clone()

        return denoise
