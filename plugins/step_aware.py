"""step_aware: DDSM (Yang et al., ICLR 2024) — one slimmable U-Net, a narrower slice of it at the
steps that matter less.

The U-Net is made slimmable by changing the class of its layers in place (same parameters, same
state-dict keys, the U-Net's own forward): every Conv2d and Linear runs on the first ``w·C`` of
its output channels and on the active channels of its input; the time-embedding MLP is slimmed
too, but the sinusoidal input of the time MLP, the image input of ``conv_in`` and the output of
``conv_out`` never are. An up ResBlock's input is ``cat[h, skip]``: its norm, first conv and
shortcut take the first ``w·C_h`` channels of the h segment and the first ``w·C_skip`` of the skip
segment (DDSM slices ``[:in]`` of the concatenation, which only lines up for models trained
slimmable from scratch; per-segment slicing lets a full-width checkpoint be fine-tuned).

Width 1.0 is the unmodified network (the layers call their original forward). The width of a
forward comes from ``StepPlan.width`` (sampling: ``plan_step`` sets it from the schedule) or
from the sandwich rule (training). Train with ``ddpm-perf train --plugins step_aware [--init
CKPT]``; the trained widths are recorded in the checkpoint, and sampling refuses checkpoints
without them. ``ddpm-perf search step-aware`` writes the schedule, by default next to the
checkpoint as ``<checkpoint>.step_aware.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.io import atomic_path
from ddpm_perf.model.unet import AttnBlock, Downsample, NormAct, ResBlock, StepPlan, UNet, Upsample
from ddpm_perf.plugins import Option, Phase, Plugin

FORMAT = "ddpm-perf-step-aware/1"
SCHEDULE_SUFFIX = ".step_aware.json"
DEFAULT_WIDTHS = "1:0.75:0.5:0.25"  # ":" because "," separates plugin options


# -- the slimmable layers ---------------------------------------------------------------------

class WidthState:
    """The width all slim layers of one model run at. ``forced`` (training) overrides the plan."""

    def __init__(self) -> None:
        self.width = 1.0
        self.forced: float | None = None

    @contextlib.contextmanager
    def force(self, width: float) -> Iterator[None]:
        self.forced = width
        try:
            yield
        finally:
            self.forced = None


def active(channels: int, width: float) -> int:
    """Channels a layer of ``channels`` uses at ``width`` (exact: widths are validated against the model)."""
    return round(channels * width)


def slice_segments(t: Tensor, dim: int, segments: Sequence[int], width: float) -> Tensor:
    """The active channels of each segment of ``t`` along ``dim``, concatenated."""
    if len(segments) == 1:
        return t.narrow(dim, 0, active(segments[0], width))
    parts, start = [], 0
    for size in segments:
        parts.append(t.narrow(dim, start, active(size, width)))
        start += size
    return torch.cat(parts, dim)


class _Slim:
    """What the slim layers share: set by ``make_slimmable``.

    slim_state: the model's WidthState; slim_in: the input channels' segments (None: the input is
    never sliced); slim_out: whether the output channels are sliced."""

    slim_state: WidthState
    slim_in: tuple[int, ...] | None
    slim_out: bool

    def _slim_params(self, weight: Tensor, bias: Tensor | None, width: float) -> tuple[Tensor, Tensor | None]:
        if self.slim_out:
            n = active(weight.shape[0], width)
            weight, bias = weight[:n], None if bias is None else bias[:n]
        if self.slim_in is not None:
            weight = slice_segments(weight, 1, self.slim_in, width)
        return weight, bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", slim_in={self.slim_in}, slim_out={self.slim_out}"


class SlimConv2d(_Slim, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        width = self.slim_state.width
        if width == 1.0:
            return super().forward(x)
        return self._conv_forward(x, *self._slim_params(self.weight, self.bias, width))


class SlimLinear(_Slim, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        width = self.slim_state.width
        if width == 1.0:
            return super().forward(x)
        return F.linear(x, *self._slim_params(self.weight, self.bias, width))


class SlimNormAct(_Slim, NormAct):
    """GroupNorm at width w: ``G·w`` groups of the full model's group size ``C/G``.

    Why proportional groups (and not DDSM's fixed G groups with sliced affine parameters): the
    sliced network is then exactly the plain U-Net of width w (ch·w channels, G·w groups), and for
    every norm whose channels are not a concatenation — and for concatenations whose segments
    fall on group boundaries — the active groups are precisely the full model's first G·w groups,
    normalised over the same channels as in the pretrained model, so a full-width checkpoint
    fine-tunes from a close start. Fixed G groups would shrink groups to single channels at
    w = 0.25 on small models (instance-norm-like statistics the pretrained model never saw)."""

    def forward(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
        width = self.slim_state.width
        if width == 1.0:
            return super().forward(x, shift)
        if shift is not None:
            x = x + shift[:, :, None, None]
        weight = slice_segments(self.weight, 0, self.slim_in, width)
        bias = slice_segments(self.bias, 0, self.slim_in, width)
        y = F.group_norm(x, active(self.num_groups, width), weight, bias, self.eps)
        return F.silu(y) if self.silu else y


class _SlimOtherNorm(SlimNormAct):
    """Slim version of a NormAct subclass another plugin installed (fused_norm's FusedNormAct):
    that class's own forward, run on a view of the parameters at this width."""

    _norm_forward: Callable

    def forward(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
        width = self.slim_state.width
        if width == 1.0:
            return self._norm_forward(self, x, shift)
        sliced = SimpleNamespace(weight=slice_segments(self.weight, 0, self.slim_in, width),
                                 bias=slice_segments(self.bias, 0, self.slim_in, width),
                                 num_groups=active(self.num_groups, width), eps=self.eps, silu=self.silu,
                                 quantize_output=self.quantize_output)
        return self._norm_forward(sliced, x, shift)


SLIM_CLASSES = {nn.Conv2d: SlimConv2d, nn.Linear: SlimLinear, NormAct: SlimNormAct}


def slim_class(module: nn.Module) -> type | None:
    """The slim class for a layer; a NormAct subclass another plugin installed (fused_norm's
    FusedNormAct) gets a slim subclass of its own that keeps its forward."""
    base = type(module)
    if base in SLIM_CLASSES:
        return SLIM_CLASSES[base]
    if isinstance(module, NormAct) and not isinstance(module, _Slim):
        if base not in _SLIM_NORMS:
            _SLIM_NORMS[base] = type(f"Slim{base.__name__}", (_SlimOtherNorm, base),
                                     {"_norm_forward": staticmethod(base.forward)})
        return _SLIM_NORMS[base]
    return None


_SLIM_NORMS: dict[type, type] = {}


def check_widths(widths: Sequence[float], num_groups: int, what: str) -> tuple[float, ...]:
    """Widths sorted from 1.0 down; each must give whole groups (w·G an integer) on this model."""
    widths = tuple(sorted({float(w) for w in widths}, reverse=True))
    if not widths or widths[0] != 1.0:
        raise UserError(f"plugin step_aware: {what} must include 1 (the full model), got {list(widths)}")
    for w in widths:
        if not 0 < w <= 1 or abs(w * num_groups - round(w * num_groups)) > 1e-9:
            raise UserError(f"plugin step_aware: width {w} in {what} must be in (0, 1] and a multiple of "
                            f"1/{num_groups} (the model's {num_groups} norm groups must stay whole)")
    return widths


def make_slimmable(model: UNet, widths: Sequence[float]) -> WidthState:
    """Make every layer of ``model`` slimmable in place; returns the state that sets its width."""
    check_widths(widths, model.config.num_groups, "widths")
    state = WidthState()

    def slim(module: nn.Module, where: str, segments: tuple[int, ...] | None, slim_out: bool = True) -> None:
        cls = slim_class(module)
        if cls is None:
            raise UserError(f"plugin step_aware: {where} is a {type(module).__name__}, not a plain Conv2d, "
                            "Linear or NormAct; list step_aware before plugins that replace layers")
        module.__class__ = cls  # same object and parameters: state-dict keys and optimizer stay valid
        module.slim_state, module.slim_in, module.slim_out = state, segments, slim_out

    emb = model.time_embed[2].out_features
    slim(model.time_embed[0], "time_embed.0", None)  # its input is the fixed sinusoidal embedding
    slim(model.time_embed[2], "time_embed.2", (emb,))
    slim(model.conv_in, "conv_in", None)  # the image is never sliced
    channels = model.conv_in.out_channels
    stack = [channels]
    for unit in model.units:
        block, name = model.blocks[unit.name], f"blocks.{unit.name}"
        segments = (channels, stack.pop()) if unit.pop else (channels,)
        if isinstance(block, ResBlock):
            out = block.conv1.out_channels
            slim(block.norm1, f"{name}.norm1", segments)
            slim(block.conv1, f"{name}.conv1", segments)
            slim(block.temb_proj, f"{name}.temb_proj", (emb,))
            slim(block.norm2, f"{name}.norm2", (out,))
            slim(block.conv2, f"{name}.conv2", (out,))
            if isinstance(block.shortcut, nn.Conv2d):
                slim(block.shortcut, f"{name}.shortcut", segments)
            channels = out
        elif unit.pop:
            raise UserError(f"plugin step_aware: {name} takes a skip but is a {type(block).__name__}, not a ResBlock")
        elif isinstance(block, AttnBlock):
            slim(block.norm, f"{name}.norm", segments)
            for proj in ("q", "k", "v", "proj_out"):
                slim(getattr(block, proj), f"{name}.{proj}", segments)
        elif isinstance(block, (Downsample, Upsample)):
            slim(block.conv, f"{name}.conv", segments)
        else:
            raise UserError(f"plugin step_aware: unit {unit.name} is a {type(block).__name__} it cannot slim")
        if unit.push:
            stack.append(channels)
    slim(model.norm_out, "norm_out", (channels,))
    slim(model.conv_out, "conv_out", (channels,), slim_out=False)  # the predicted noise keeps its channels
    missed = [n for n, m in model.named_modules() if type(m) in SLIM_CLASSES or slim_class(m) is not None]
    if missed:  # a layer the walk above does not know would silently stay full width
        raise UserError(f"plugin step_aware: layers it cannot place: {', '.join(missed[:3])}")

    def set_width(module, args, kwargs):
        plan = args[2] if len(args) > 2 else kwargs.get("plan")
        state.width = state.forced if state.forced is not None else (plan.width if plan is not None else 1.0)

    model.register_forward_pre_hook(set_width, with_kwargs=True)
    return state


def flops_per_width(model: nn.Module, widths: Sequence[float]) -> dict[float, int]:
    """FLOPs of one batch-1 forward at each width (FlopCounterMode: convolutions, matmuls, attention)."""
    c = model.config
    param = next(model.parameters())
    x = torch.zeros((1, c.in_channels, c.image_size, c.image_size), dtype=param.dtype, device=param.device)
    t = torch.zeros((1,), dtype=torch.long, device=param.device)
    flops = {}
    with torch.no_grad():
        for w in widths:
            with FlopCounterMode(display=False) as counter:
                model(x, t, StepPlan(width=w))
            flops[w] = counter.get_total_flops()
    return flops


def fingerprint(model: nn.Module) -> str:
    """A short hash of the weights: which checkpoint a schedule was searched for."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def trained_widths(path: str | Path) -> tuple[float, ...] | None:
    """The widths a checkpoint was sandwich-trained for (its train metadata), or None."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        widths = json.loads(meta.get("train", "{}")).get("plugins", {}).get("step_aware", {}).get("widths")
    except (json.JSONDecodeError, AttributeError):
        return None
    return tuple(float(w) for w in widths) if widths else None


# -- schedules --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    t_start: int  # inclusive
    t_stop: int  # exclusive
    width: float


@dataclass
class Schedule:
    """Width per timestep as contiguous segments covering [0, num_train_timesteps)."""

    segments: list[Segment]
    widths: tuple[float, ...]  # the widths the model was trained for
    fingerprint: str
    num_train_timesteps: int
    search: dict | None = None  # how it was found (sampler, steps, timesteps, FD, FLOPs)

    def width_at(self, t: int) -> float:
        for seg in self.segments:
            if seg.t_start <= t < seg.t_stop:
                return seg.width
        raise IndexError(t)

    @classmethod
    def from_genome(cls, genes: Sequence[float], timesteps: Sequence[int], num_train_timesteps: int,
                    widths: Sequence[float], fingerprint: str) -> "Schedule":
        """Segment k (0 = nearest the data) holds the k-th of ``len(genes)`` contiguous groups of the
        sampler's steps; its range reaches up to the next group's lowest timestep."""
        ascending = sorted(timesteps)
        bounds = [ascending[len(ascending) * k // len(genes)] for k in range(len(genes))]
        if len(set(bounds)) < len(bounds):
            raise UserError(f"step_aware: {len(genes)} segments need at least as many sampler steps "
                            f"(got {len(timesteps)})")
        bounds = [0] + bounds[1:] + [num_train_timesteps]
        segments = [Segment(bounds[k], bounds[k + 1], float(w)) for k, w in enumerate(genes)]
        return cls(segments, tuple(widths), fingerprint, num_train_timesteps)

    def to_json(self) -> str:
        text = json.dumps({
            "format": FORMAT, "fingerprint": self.fingerprint, "widths": list(self.widths),
            "num_train_timesteps": self.num_train_timesteps,
            "segments": [[s.t_start, s.t_stop, s.width] for s in self.segments],
            "search": self.search,
        }, indent=1)
        # lists of numbers on one line each: a segment per line, the timesteps on one line
        return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"plugin step_aware: schedule {path} does not exist; make one with "
                            "'ddpm-perf search step-aware' or give step_aware(width=W) for a fixed width")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, not {FORMAT!r}")
            segments = [Segment(int(a), int(b), float(w)) for a, b, w in d["segments"]]
            return cls(segments, tuple(float(w) for w in d["widths"]), str(d["fingerprint"]),
                       int(d["num_train_timesteps"]), d.get("search"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"plugin step_aware: schedule {path} is not a step_aware schedule ({e}); "
                            "re-create it with 'ddpm-perf search step-aware'") from None

    def check(self, path: str | Path, model_fingerprint: str, trained: Sequence[float], num_train_timesteps: int) -> None:
        """Refuse a schedule made for other weights, widths or timesteps, or one with gaps."""
        where = f"plugin step_aware: schedule {path}"
        if self.fingerprint != model_fingerprint:
            raise UserError(f"{where} was searched for other weights (fingerprint {self.fingerprint}, this "
                            f"checkpoint {model_fingerprint}); run 'ddpm-perf search step-aware' for it")
        untrained = sorted({s.width for s in self.segments} - set(trained), reverse=True)
        if untrained or set(self.widths) != set(trained):
            raise UserError(f"{where} uses widths {untrained or list(self.widths)} but the model was trained for "
                            f"{list(trained)}; search a schedule for this model")
        if self.num_train_timesteps != num_train_timesteps:
            raise UserError(f"{where} covers {self.num_train_timesteps} timesteps, the model has "
                            f"{num_train_timesteps}; search a schedule for this model")
        edges = [0] + [s.t_stop for s in self.segments]
        if [s.t_start for s in self.segments] != edges[:-1] or edges[-1] != num_train_timesteps or any(
                s.t_stop <= s.t_start for s in self.segments):
            raise UserError(f"{where}: its segments do not cover timesteps 0..{num_train_timesteps - 1} "
                            "contiguously; re-create it with 'ddpm-perf search step-aware'")


# -- the plugin -------------------------------------------------------------------------------

class StepAware(Plugin):
    name = "step_aware"
    shipped_model = "digits_slim.safetensors"  # the embedded model is not slimmable
    description = "DDSM: a slimmable U-Net that runs a narrower slice at the steps that matter less."
    phase = Phase.REWRITE
    options = {
        "schedule": Option(str, "", "width schedule JSON (default: <checkpoint>.step_aware.json, "
                                    "written by 'ddpm-perf search step-aware')"),
        "width": Option(float, 0.0, "run this width at every step instead of a schedule (0: use the schedule)"),
        "widths": Option(str, DEFAULT_WIDTHS, "training: the widths to train, ':'-separated (1 included)"),
        "middle": Option(int, 1, "training: random middle widths per step besides the largest and smallest"),
    }
    # deep_cache: a cached feature has the width of its full step; int8 replaces the convolutions
    # this plugin slims; cuda_graphs would replay one width. fused_norm stacks when listed first.
    conflicts = ("cuda_graphs", "deep_cache", "int8")

    def __init__(self, **values):
        super().__init__(**values)
        try:
            self._widths = [float(w) for w in str(self.opts.widths).split(":") if w.strip()]
        except ValueError:
            raise UserError(f"plugin step_aware: widths={self.opts.widths!r} must be numbers like "
                            f"{DEFAULT_WIDTHS}") from None
        if self.opts.middle < 0:
            raise UserError(f"plugin step_aware: middle={self.opts.middle} must be >= 0")
        self.state: WidthState | None = None
        self.model: UNet | None = None
        self.trained: tuple[float, ...] = ()
        self.flops: dict[float, int] = {}
        self.schedule: Schedule | None = None
        self.fingerprint = ""

    # -- setup --

    @hookimpl
    def configure(self, ctx):
        groups = ctx.model_config.num_groups
        if ctx.mode == "train":
            self.trained = check_widths(self._widths, groups, "widths")
            ctx.checkpoint_meta["step_aware"] = {"widths": list(self.trained)}
            return
        if self.opts.widths != DEFAULT_WIDTHS:
            raise UserError("plugin step_aware: widths= is a training option; sampling uses the widths "
                            "recorded in the checkpoint")
        if ctx.checkpoint is None:
            raise UserError("plugin step_aware: needs a checkpoint file (it records the trained widths)")
        path = Path(ctx.checkpoint)
        widths = trained_widths(path)
        if widths is None:
            raise UserError(f"plugin step_aware: checkpoint {path} was not trained slimmable (no step_aware "
                            f"widths in its metadata); fine-tune it: ddpm-perf train --plugins step_aware "
                            f"--init {path}")
        self.trained = check_widths(widths, groups, f"the widths of {path}")
        if self.opts.width and self.opts.width not in self.trained:
            raise UserError(f"plugin step_aware: width={self.opts.width} is not one the model was trained for "
                            f"({', '.join(map(str, self.trained))})")

    @hookimpl
    def transform_model(self, model, ctx):
        if not isinstance(model, UNet):
            raise UserError(f"plugin step_aware: the model is already wrapped ({type(model).__name__}); "
                            "list step_aware before the other rewrite plugins")
        if ctx.mode == "sample":
            self.fingerprint = fingerprint(model)
        self.state = make_slimmable(model, self.trained)
        self.model = model
        if ctx.mode == "sample":
            self.flops = flops_per_width(model, self.trained)
        return model

    def _check_still_slim(self, model: nn.Module) -> None:
        """A plugin that ran after this one may have replaced slim layers with full-width ones."""
        replaced = [n for n, m in model.named_modules()
                    if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm)) and not isinstance(m, _Slim)]
        if replaced:
            raise UserError(f"plugin step_aware: a later plugin replaced slimmable layers ({replaced[0]}, ...); "
                            "list fused_norm before step_aware")

    @hookimpl
    def calibrate(self, engine, ctx):
        self._check_still_slim(self.model)
        if self.opts.width:
            self.schedule = Schedule([Segment(0, ctx.diffusion.num_timesteps, self.opts.width)], self.trained,
                                     self.fingerprint, ctx.diffusion.num_timesteps)
            source = f"fixed width {self.opts.width}"
        else:
            path = Path(self.opts.schedule or str(ctx.checkpoint) + SCHEDULE_SUFFIX)
            schedule = Schedule.load(path)
            schedule.check(path, self.fingerprint, self.trained, ctx.diffusion.num_timesteps)
            self.schedule = schedule
            source = f"schedule {path}"
            searched = schedule.search or {}
            if searched.get("timesteps") and searched["timesteps"] != list(ctx.sampler.timesteps):
                source += (f" (searched on {searched.get('sampler')} x{searched.get('steps')}, not on this "
                           "sampler's timesteps)")
        ctx.report.append(self.describe(ctx.sampler.timesteps) + f"; {source}")

    def describe(self, timesteps: Sequence[int]) -> str:
        widths = [self.schedule.width_at(t) for t in timesteps]
        counts = ", ".join(f"{w:g}x{widths.count(w)}" for w in sorted(set(widths), reverse=True))
        fraction = self.flops_fraction(widths)
        return (f"step_aware: widths {counts} over {len(widths)} steps; {1 - fraction:.0%} fewer FLOPs than "
                f"the full-width model ({fraction * self.flops[1.0] * len(widths) / 1e9:.3f} vs "
                f"{self.flops[1.0] * len(widths) / 1e9:.3f} GFLOP per image)")

    def flops_fraction(self, widths: Sequence[float]) -> float:
        """FLOPs of a run at these per-step widths over the full-width run's."""
        return sum(self.flops[w] for w in widths) / (self.flops[1.0] * len(widths))

    # -- per step --

    @hookimpl
    def plan_step(self, step, t, plan, ctx):
        plan.width = self.schedule.width_at(t)

    # -- training: the sandwich rule --

    @hookimpl
    def wrap_train_step(self, fn, ctx):
        self._check_still_slim(self.model)
        largest, smallest, middle = self.trained[0], self.trained[-1], list(self.trained[1:-1])
        num_timesteps = ctx.diffusion.num_timesteps

        def sandwich(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
            """Loss of the largest width, the smallest and ``middle`` random ones on the same images;
            each width but the first gets its own timesteps and noise (DDSM). Drawn from torch's
            global RNG, which the trainer checkpoints: --resume stays exact."""
            widths = [largest] + ([smallest] if smallest != largest else [])
            if middle:
                widths += [middle[i] for i in torch.randint(len(middle), (self.opts.middle,)).tolist()]
            losses = []
            for i, width in enumerate(widths):
                if i:
                    t = torch.randint(num_timesteps, t.shape, device=t.device)
                    noise = torch.randn(noise.shape, device=noise.device, dtype=noise.dtype)
                with self.state.force(width):
                    losses.append(fn(x0, t, noise))
            # the mean keeps the loss (and the gradient scale clipping sees) comparable to one width's
            return torch.stack(losses).mean()

        return sandwich

    # -- the schedule search --

    @classmethod
    def default_search_checkpoint(cls) -> Path:
        path = cls.shipped_model_path()
        if not path.is_file():
            raise UserError("search: give --checkpoint, a model trained with 'ddpm-perf train --plugins step_aware'")
        return path

    @classmethod
    def search(cls, checkpoint: str | Path, sampler_name: str, steps: int, segments: int = 10,
               population: int = 8, generations: int = 4, images: int = 256, batch_size: int = 128,
               budget: float | None = 0.6, penalty: float = 0.0, seed: int = 1, out: str | Path | None = None,
               device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> Schedule:
        """Evolutionary search of a width per segment of the sampler's steps (``ddpm-perf search step-aware``)."""
        from ddpm_perf.diffusion.samplers import make_sampler
        from ddpm_perf.diffusion.schedule import Diffusion
        from ddpm_perf.engine import SamplingEngine
        from ddpm_perf.metrics.digits_classifier import fd_digits
        from ddpm_perf.model.checkpoint import load_checkpoint
        from ddpm_perf.plugins import PluginHost

        if segments < 1 or population < 2 or generations < 0 or images < 2:
            raise UserError("search: --segments >= 1, --population >= 2, --generations >= 0 and --images >= 2")
        if budget is not None and not 0 < budget <= 1:
            raise UserError(f"search: --budget {budget} must be a fraction of the full model's FLOPs in (0, 1]")
        if budget is None and penalty <= 0:
            raise UserError("search: give a FLOPs --budget, a --penalty > 0, or both")
        ckpt = load_checkpoint(checkpoint)
        c = ckpt.model_config
        if (c.in_channels, c.image_size) != (1, 16):
            raise UserError(f"search: the fitness is FD-digits, for 16x16 one-channel models; {checkpoint} is "
                            f"{c.in_channels}x{c.image_size}x{c.image_size}")
        sampler = make_sampler(sampler_name, Diffusion(ckpt.schedule_config), steps)
        plugin = cls(width=1.0)
        engine = SamplingEngine(ckpt, sampler, PluginHost([plugin]), device, batch_size)
        widths, timesteps = plugin.trained, list(sampler.timesteps)
        T = sampler.diffusion.num_timesteps
        schedules = {}

        def schedule_of(genome: tuple[int, ...]) -> Schedule:
            if genome not in schedules:
                schedules[genome] = Schedule.from_genome([widths[g] for g in genome], timesteps, T, widths,
                                                         plugin.fingerprint)
            return schedules[genome]

        def cost(genome: tuple[int, ...]) -> float:
            s = schedule_of(genome)
            return plugin.flops_fraction([s.width_at(t) for t in timesteps])

        rng = random.Random(seed)

        def repair(genome: list[int]) -> tuple[int, ...]:
            """Narrow random segments until the genome fits the budget."""
            while budget is not None and cost(tuple(genome)) > budget + 1e-9:
                wider = [k for k, g in enumerate(genome) if g < len(widths) - 1]
                if not wider:
                    break
                genome[rng.choice(wider)] += 1
            return tuple(genome)

        fds: dict[tuple[int, ...], float] = {}

        def fd_of(genome: tuple[int, ...]) -> float:
            if genome not in fds:
                plugin.schedule = schedule_of(genome)
                fds[genome] = float(fd_digits(engine.sample(images, seed=seed)))
            return fds[genome]

        def fitness(genome: tuple[int, ...]) -> float:
            over = 0.0 if budget is None else max(0.0, cost(genome) - budget)
            return fd_of(genome) + penalty * cost(genome) + 1e3 * over

        start = time.perf_counter()
        full = (0,) * segments
        fd_full = fd_of(full)
        log(f"search: full width: FD-digits {fd_full:.3f} ({images} images, {sampler_name} x{steps}); "
            f"widths {', '.join(map(str, widths))}, {segments} segments, budget "
            f"{'none' if budget is None else f'{budget:.0%} of the FLOPs'}, penalty {penalty}")
        # the uniform genomes and "full width near the data, narrower above" ramps, then random ones
        seeds = [(g,) * segments for g in range(len(widths))]
        seeds += [tuple(0 if k < cut else g for k in range(segments))
                  for g in range(1, len(widths)) for cut in (segments // 4, segments // 2)]
        pop: list[tuple[int, ...]] = []
        for genome in seeds + [tuple(rng.randrange(len(widths)) for _ in range(segments))
                               for _ in range(population)]:
            genome = repair(list(genome))
            if genome not in pop:
                pop.append(genome)
            if len(pop) == population:
                break
        pop.sort(key=fitness)
        for gen in range(1, generations + 1):
            children: list[tuple[int, ...]] = pop[:2]  # elitism
            tries = 0
            while len(children) < population and tries < 50 * population:
                tries += 1
                a, b = (min(rng.sample(pop, 2), key=fitness) for _ in range(2))
                cut = rng.randrange(1, segments) if segments > 1 else 0
                child = list(a[:cut] + b[cut:])
                for k in range(segments):
                    if rng.random() < 1 / segments:
                        child[k] = rng.choice([g for g in range(len(widths)) if g != child[k]] or [child[k]])
                child = repair(child)
                if child not in children:
                    children.append(child)
            pop = sorted(children, key=fitness)
            best = pop[0]
            log(f"search: generation {gen}/{generations}: best FD-digits {fd_of(best):.3f} at "
                f"{cost(best):.0%} of the FLOPs ({len(fds)} schedules evaluated, "
                f"{time.perf_counter() - start:.0f} s)")
        best = pop[0]
        if budget is not None and cost(best) > budget + 1e-9:
            raise UserError(f"search: no schedule fits {budget:.0%} of the FLOPs with widths {list(widths)}")
        schedule = schedule_of(best)
        schedule.search = {
            "sampler": sampler_name, "steps": steps, "timesteps": timesteps, "segments": segments,
            "images": images, "seed": seed, "budget": budget, "penalty": penalty,
            "population": population, "generations": generations, "evaluations": len(fds),
            "fd_digits": fd_of(best), "fd_digits_full_width": fd_full, "flops_fraction": cost(best),
            "checkpoint": str(checkpoint),
        }
        out = Path(out) if out else Path(str(checkpoint) + SCHEDULE_SUFFIX)
        schedule.save(out)
        log(f"wrote {out}: FD-digits {fd_of(best):.3f} (full width {fd_full:.3f}), {1 - cost(best):.0%} fewer "
            f"FLOPs than full width on {sampler_name} x{steps}; widths by segment (t from 0) "
            f"{' '.join(f'{widths[g]:g}' for g in best)}; {len(fds)} schedules in "
            f"{time.perf_counter() - start:.0f} s")
        return schedule
