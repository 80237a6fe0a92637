"""int8: convolutions as ``ddpm_perf::int8_conv2d`` (int8 weights, uint8 activations, int32 sums).

Weights: symmetric int8 per output channel, packed once for the kernel. Activations: one static
affine uint8 range per layer, calibrated over a short DDIM trajectory that covers the timestep
range (min/max or a percentile of each layer's input). The calibration is saved next to the
checkpoint (``<checkpoint>.int8.json``) and reused; it records a fingerprint of the weights, and
a file made for other weights is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_perf import ops
from ddpm_perf.diffusion.samplers import make_sampler
from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.io import atomic_path
from ddpm_perf.model.unet import AttnBlock, StepPlan
from ddpm_perf.ops.reference import quantize_weight
from ddpm_perf.plugins import Option, Phase, Plugin

FORMAT = "ddpm-perf-int8/1"
MAX_OBSERVED = 1 << 20  # elements per call a percentile is taken over (a random subset beyond that)


class Int8Conv2d(nn.Module):
    """A Conv2d with int8 weights; ``observe`` records input ranges, ``set_range`` fixes them."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1, 1) or not isinstance(conv.padding, tuple):
            raise ValueError("int8: only dense, undilated convolutions with numeric padding")
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self._quantize_weight(conv.weight, conv.bias)

    def _quantize_weight(self, weight: Tensor, bias: Tensor | None) -> None:
        self.float_weight = weight.detach()  # kept until calibration ends, for the observe pass
        self.register_buffer("float_bias", None if bias is None else bias.detach().float(), persistent=False)
        weight_q, scale = quantize_weight(weight if weight.dim() == 4 else weight[:, :, None, None])
        self.register_buffer("packed_weight", ops.int8_pack_weight(weight_q), persistent=False)
        self.register_buffer("weight_colsum", weight_q.flatten(1).sum(1, dtype=torch.int32), persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.x_scale: float | None = None
        self.x_zero_point = 0
        self.observing: str | None = None  # None, "minmax" or a percentile as text
        self.lo, self.hi = float("inf"), float("-inf")

    def _float(self, x: Tensor) -> Tensor:
        bias = None if self.float_bias is None else self.float_bias.to(x.dtype)
        return F.conv2d(x, self.float_weight.to(x.dtype), bias, self.stride, self.padding)

    def _int8(self, x: Tensor) -> Tensor:
        # x float, or uint8 codes from a norm (NormAct.quantize_output) whose input was fp32: the
        # output is then fp32 too, as it would have been from the norm's float output
        return ops.int8_conv2d(x, self.packed_weight, self.weight_colsum, self.weight_scale, self.float_bias,
                               self.x_scale, self.x_zero_point, self.kernel_size, self.stride, self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.x_scale is None:
            if self.observing is None:
                raise RuntimeError("int8: layer used before calibration")
            self._observe(x)
            return self._float(x)
        return self._int8(x)

    def _observe(self, x: Tensor) -> None:
        flat = x.detach().float().flatten()
        if self.observing == "minmax":
            lo, hi = flat.min().item(), flat.max().item()
        else:
            if flat.numel() > MAX_OBSERVED:
                flat = flat[torch.randint(flat.numel(), (MAX_OBSERVED,), generator=torch.Generator().manual_seed(0))]
            q = float(self.observing) / 100
            lo, hi = torch.quantile(flat, torch.tensor([1 - q, q])).tolist()
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def set_range(self, lo: float, hi: float) -> None:
        """Affine uint8 covering [lo, hi] and zero (padding must be exact)."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        self.x_scale = max(hi - lo, 1e-8) / 255
        self.x_zero_point = int(min(255, max(0, round(-lo / self.x_scale))))
        self.observing, self.float_weight = None, None

    def extra_repr(self) -> str:
        return (f"{self.weight_scale.numel()}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, x_scale={self.x_scale}, x_zero_point={self.x_zero_point}")


class Int8Linear(Int8Conv2d):
    """A Linear with int8 weights: the int8 convolution with a 1x1 kernel over the tokens,
    each token a 1x1 image (so any (..., features) input works, contiguous in both layouts)."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.kernel_size, self.stride, self.padding = (1, 1), (1, 1), (0, 0)
        self._quantize_weight(linear.weight, linear.bias)
        self.out_dtype = out_dtype  # None: the input's

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y if self.out_dtype is None else y.to(self.out_dtype)

    def _float(self, x: Tensor) -> Tensor:
        bias = None if self.float_bias is None else self.float_bias.to(x.dtype)
        return F.linear(x, self.float_weight.to(x.dtype), bias)

    def _int8(self, x: Tensor) -> Tensor:
        lead, features = x.shape[:-1], x.shape[-1]
        pixels = x.reshape(-1, features, 1, 1)
        return super()._int8(pixels).reshape(*lead, -1)


def fingerprint(layers: dict[str, nn.Module]) -> str:
    """A short hash of the layers' names and weights: which checkpoint a calibration belongs to."""
    h = hashlib.sha256()
    for name, layer in layers.items():
        h.update(name.encode())
        for t in (layer.weight, layer.bias):
            if t is not None:
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Int8(Plugin):
    name = "int8"
    description = "int8 convolutions (VNNI on CPU, dp4a on CUDA) with activation ranges calibrated and saved."
    phase = Phase.REWRITE
    ops = ("int8_conv2d",)
    options = {
        "method": Option(str, "percentile", "activation range: min/max or a percentile of each layer's input",
                         choices=("minmax", "percentile")),
        "percentile": Option(float, 99.99, "percentile for method=percentile"),
        "keep_float": Option(str, "first_last", "convolutions left in float", choices=("first_last", "none")),
        "attention": Option(bool, True, "also the attention blocks' q/k/v/out projections"),
        "attention_dtype": Option(str, "bfloat16", "what the int8 q/k/v projections hand to the attention: bf16 "
                                  "(on the CPU two bf16 matmuls around an fp32 softmax, ~3x fp32 SDPA) or their "
                                  "input's dtype", choices=("bfloat16", "input")),
        "steps": Option(int, 8, "DDIM steps of the calibration trajectory (spread over the timestep range)"),
        "batch": Option(int, 8, "images in the calibration trajectory"),
        "calibration": Option(str, "", "calibration file (default: <checkpoint>.int8.json)"),
        "recalibrate": Option(bool, False, "calibrate again and overwrite the file"),
        "norm_codes": Option(bool, True, "norms whose kernel can (fused_norm) hand their int8 consumers uint8 "
                             "codes instead of float values"),
    }

    @hookimpl
    def configure(self, ctx):
        if ctx.mode != "sample":
            raise UserError("plugin int8: sampling only (the int8 kernel has no backward); drop it from train")
        if not 50 < self.opts.percentile <= 100:
            raise UserError(f"plugin int8: percentile={self.opts.percentile} must be in (50, 100]")
        if self.opts.steps < 1 or self.opts.batch < 1:
            raise UserError("plugin int8: steps and batch must be positive")

    @hookimpl
    def transform_model(self, model: nn.Module, ctx):
        layers = {name: m for name, m in model.named_modules() if type(m) is nn.Conv2d}
        projections = {name: m for name, m in model.named_modules()
                       if type(m) is nn.Linear and isinstance(model.get_submodule(name.rpartition(".")[0]), AttnBlock)}
        self.fingerprint = fingerprint({**layers, **projections})  # whatever the options: the weights
        skipped = {"conv_in", "conv_out"} if self.opts.keep_float == "first_last" else set()
        if self.opts.attention:
            layers.update(projections)
        self.layers: dict[str, Int8Conv2d] = {}
        for name, module in layers.items():
            if name in skipped:
                continue
            parent, _, child = name.rpartition(".")
            if isinstance(module, nn.Conv2d):
                layer = Int8Conv2d(module)
            else:  # rounding q, k and v to bf16 adds less error than their int8 inputs already carry
                to_attention = child in ("q", "k", "v") and self.opts.attention_dtype == "bfloat16"
                layer = Int8Linear(module, torch.bfloat16 if to_attention else None)
            setattr(model.get_submodule(parent), child, layer)
            self.layers[name] = layer
        # The int8 op reads and writes NHWC: keep the whole network NHWC (the float convs' weights
        # and the input, see wrap_denoiser), or every layer boundary would pay a layout copy.
        model = model.to(memory_format=torch.channels_last)
        self.model = model  # calibrated eagerly, before any later wrapper (compile) sees it
        convs = sum(isinstance(m, nn.Conv2d) for m in layers.values())
        ctx.report.append(f"int8: {sum(type(m) is Int8Conv2d for m in self.layers.values())} of {convs} "
                          f"convolutions and {sum(type(m) is Int8Linear for m in self.layers.values())} attention "
                          f"projections in int8, kernel {ops.backends(ctx.device.type)['int8_conv2d']}")
        return model

    @hookimpl
    def wrap_denoiser(self, fn, ctx):
        def denoise(x, t, plan):
            return fn(x.contiguous(memory_format=torch.channels_last), t, plan)

        return denoise

    # -- calibration --

    def _settings(self) -> dict:
        o = self.opts
        return {"method": o.method, "percentile": o.percentile if o.method == "percentile" else None,
                "steps": o.steps, "batch": o.batch, "keep_float": o.keep_float, "attention": o.attention}

    def _path(self, ctx) -> Path | None:
        if self.opts.calibration:
            return Path(self.opts.calibration)
        return Path(ctx.checkpoint + ".int8.json") if ctx.checkpoint else None

    @hookimpl
    def calibrate(self, engine, ctx):
        self._pair_norms(enable=False)  # the observers must see float inputs
        path = self._path(ctx)
        saved = None if self.opts.recalibrate or path is None or not path.exists() else self._load(path)
        if saved is not None and saved["settings"] == self._settings():
            ranges = saved["layers"]
            ctx.report.append(f"int8: calibration loaded from {path}")
        else:
            ranges = self._observe(engine, ctx)
            why = ("settings changed" if saved is not None else "asked" if self.opts.recalibrate
                   else "no calibration yet")
            where = (" (in-memory checkpoint: not saved)" if path is None
                     else f", saved to {path}" if self._save(path, ranges, ctx) else "")
            ctx.report.append(f"int8: calibrated ({why}) over {self.opts.steps} DDIM steps x {self.opts.batch} "
                              f"images{where}")
        missing = sorted(set(self.layers) - set(ranges))
        if missing:
            raise UserError(f"plugin int8: calibration {path} has no range for {missing[0]}; "
                            "recalibrate with int8(recalibrate=true)")
        for name, layer in self.layers.items():
            layer.set_range(*ranges[name])
        if self.opts.norm_codes:
            paired = self._pair_norms(enable=True)
            if paired:
                ctx.report.append(f"int8: {paired} norms hand their consumers uint8 codes (for fp32 activations)")

    def _pair_norms(self, enable: bool) -> int:
        """Have each norm that can write uint8 (NormAct.writes_uint8) quantise its output for its
        consumers (a block's ``norm_consumers``) when all of them are this plugin's int8 layers with
        one input range; the consumers then skip their own quantisation. Returns how many."""
        int8_layers = {id(layer) for layer in self.layers.values()}
        paired = 0
        for block in self.model.modules():
            for norm_name, consumer_names in getattr(block, "norm_consumers", {}).items():
                norm = getattr(block, norm_name, None)
                if not getattr(norm, "writes_uint8", False):
                    continue
                norm.quantize_output = None
                consumers = [getattr(block, name, None) for name in consumer_names]
                ranges = {(c.x_scale, c.x_zero_point) for c in consumers if id(c) in int8_layers}
                if enable and not block.training and len(ranges) == 1 and all(id(c) in int8_layers for c in consumers):
                    norm.quantize_output = ranges.pop()
                    paired += 1
        return paired

    def _load(self, path: Path) -> dict:
        try:
            saved = json.loads(path.read_text())
            fmt, print_ = saved["format"], saved["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"plugin int8: {path} is not a calibration file ({e}); delete it or pass "
                            "int8(recalibrate=true)") from None
        if fmt != FORMAT:
            raise UserError(f"plugin int8: {path} has format {fmt!r}, expected {FORMAT!r}; "
                            "recalibrate with int8(recalibrate=true)")
        if print_ != self.fingerprint:
            raise UserError(f"plugin int8: {path} was calibrated for other weights (fingerprint {print_}, this "
                            f"checkpoint {self.fingerprint}); recalibrate with int8(recalibrate=true) or pass "
                            "int8(calibration=<file>)")
        return saved

    def _save(self, path: Path, ranges: dict, ctx) -> bool:
        data = {"format": FORMAT, "fingerprint": self.fingerprint, "checkpoint": ctx.checkpoint,
                "settings": self._settings(), "layers": ranges}
        try:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(data, indent=1))
        except OSError as e:  # e.g. a checkpoint in a read-only site-packages: run on, say so
            ctx.report.append(f"int8: could not save the calibration to {path} ({e.strerror}); "
                              "pass int8(calibration=<writable file>) to keep it")
            return False
        return True

    @torch.inference_mode()
    def _observe(self, engine, ctx) -> dict[str, list[float]]:
        """Run a DDIM trajectory from noise with every layer recording its input range."""
        mode = "minmax" if self.opts.method == "minmax" else str(self.opts.percentile)
        for layer in self.layers.values():
            layer.observing, layer.lo, layer.hi = mode, float("inf"), float("-inf")
        sampler = make_sampler("ddim", ctx.diffusion, self.opts.steps)
        g = torch.Generator().manual_seed(12345)  # fixed: the same calibration every time
        x = torch.randn((self.opts.batch, *ctx.image_shape), generator=g).to(ctx.device)
        x = x.contiguous(memory_format=torch.channels_last)
        # in the precision the model will run in: amp(weights=true) has left bf16 weights behind
        low = {p.dtype for p in self.model.parameters()} & {torch.bfloat16, torch.float16}
        autocast = torch.autocast(ctx.device.type, dtype=low.pop(), enabled=True) if low else torch.autocast(
            ctx.device.type, enabled=False)
        sampler.reset()
        with autocast:
            for i, t in enumerate(sampler.timesteps):
                t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
                eps = self.model(x, t_batch, StepPlan()).float()
                x = sampler.step(i, eps, x, None)
        return {name: [layer.lo, layer.hi] for name, layer in self.layers.items()}
