"""The DDPM U-Net of Ho et al. (2020), with addressable blocks and a per-step plan.

The network is a flat, ordered program of *units* (ResBlocks, attention blocks, down- and
upsamplers) held in ``UNet.blocks``, a ModuleDict keyed by unit name::

    down{L}_res{j}  down{L}_attn{j}  down{L}_downsample      L = resolution level, 0 = full size
    mid_res0  mid_attn  mid_res1
    up{L}_res{j}    up{L}_attn{j}    up{L}_upsample

Skip wiring is explicit: a down-path unit with ``push`` stores its output on the skip stack; an
up-path unit with ``pop`` concatenates the top of the stack to its input. Plugins change the
network without copying this forward:

* replace or wrap a unit: ``model.blocks[name] = Wrapper(model.blocks[name])``;
* skip units this step: ``plan.skip`` (a ResBlock keeps its shortcut, attention is identity);
* cache the deep path: ``plan.cache_branch`` / ``plan.cached`` / ``plan.captured`` (the
  partial forward of DeepCache, see ``StepPlan``);
* anything else a layer wrapper needs per step (width, patch bands) it reads from its plugin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import native_attention
from .config import UNetConfig


@dataclass
class StepPlan:
    """What the U-Net runs this step. Built fresh by the engine each step, edited by plugins.

    cache_branch: skip index d (0 = the output of conv_in, 1 = the first down unit's, ...)
      at which the deep path is cut. With ``cached`` None the full network runs and the input
      of the up unit that pops skip d (before concatenation) is stored in ``captured``; with
      ``cached`` set, only conv_in and the down units up to skip d run, and the up path resumes
      from ``cached``.
    """

    width: float = 1.0
    skip: frozenset[str] = frozenset()
    cache_branch: int | None = None
    cached: Tensor | None = None
    captured: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    name: str
    push: bool = False  # down path: push output onto the skip stack
    pop: bool = False  # up path: concatenate a popped skip to the input


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of Ho et al.: [sin, cos] with frequencies 10000^(-i/(half-1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class NormAct(nn.GroupNorm):
    """GroupNorm, optionally preceded by a per-channel shift and followed by SiLU.

    One module for the pattern the U-Net repeats (``silu(group_norm(x + shift))``), so a kernel
    plugin can swap it for a fused op by replacing modules; the parameters keep GroupNorm's
    names (``weight``, ``bias``), so checkpoints are unaffected.

    A subclass whose kernel can write its output as uint8 codes sets ``writes_uint8``; a plugin
    that runs the norm's consumers in int8 (the blocks' ``norm_consumers``) may then set
    ``quantize_output`` to their input's (scale, zero_point), and the norm may return the codes
    instead of its float output (for an fp32 input only: the consumers then return fp32, as
    they would have from the float output). The consumers must take either.
    """

    writes_uint8 = False
    quantize_output: tuple[float, int] | None = None

    def __init__(self, num_groups: int, num_channels: int, eps: float, silu: bool):
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu

    def forward(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
        if shift is not None:
            x = x + shift[:, :, None, None]
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.silu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", silu={self.silu}"


class ResBlock(nn.Module):
    # Each norm's output goes to these layers alone (norm2's through dropout, the identity in eval
    # mode), so it may hand them quantised codes (NormAct.writes_uint8). A subclass that routes a
    # norm's output anywhere else must say so here.
    norm_consumers = {"norm1": ("conv1",), "norm2": ("conv2",)}

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = NormAct(groups, in_ch, eps, silu=True)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(emb_ch, out_ch)
        self.norm2 = NormAct(groups, out_ch, eps, silu=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.dropout(self.norm2(h, shift=self.temb_proj(F.silu(emb)))))
        return self.shortcut(x) + h

    def skip(self, x: Tensor) -> Tensor:
        return self.shortcut(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    norm_consumers = {"norm": ("q", "k", "v")}  # the normalised tokens go to the projections alone

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.norm = NormAct(groups, ch, eps, silu=False)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        out = self.proj_out(native_attention(self.q(tokens), self.k(tokens), self.v(tokens)))
        return x + out.transpose(1, 2).reshape(b, c, height, width)

    def skip(self, x: Tensor) -> Tensor:
        return x


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF "SAME" padding of the original


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    norm_consumers = {"norm_out": ("conv_out",)}  # as ResBlock's

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_ch = 4 * c.ch
        self.time_embed = nn.Sequential(nn.Linear(c.ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)

        blocks: dict[str, nn.Module] = {}
        units: list[Unit] = []

        def add(name: str, module: nn.Module, push: bool = False, pop: bool = False) -> None:
            blocks[name] = module
            units.append(Unit(name, push, pop))

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, emb_ch, c.dropout, c.num_groups, c.norm_eps)

        skip_channels = [c.ch]
        ch, size = c.ch, c.image_size
        for level, mult in enumerate(c.ch_mult):
            has_attn = size in c.attn_resolutions
            for j in range(c.num_res_blocks):
                add(f"down{level}_res{j}", res(ch, c.ch * mult), push=not has_attn)
                ch = c.ch * mult
                if has_attn:
                    add(f"down{level}_attn{j}", AttnBlock(ch, c.num_groups, c.norm_eps), push=True)
                skip_channels.append(ch)
            if level != c.num_levels - 1:
                add(f"down{level}_downsample", Downsample(ch), push=True)
                skip_channels.append(ch)
                size //= 2

        add("mid_res0", res(ch, ch))
        add("mid_attn", AttnBlock(ch, c.num_groups, c.norm_eps))
        add("mid_res1", res(ch, ch))

        for level in reversed(range(c.num_levels)):
            has_attn = size in c.attn_resolutions
            for j in range(c.num_res_blocks + 1):
                add(f"up{level}_res{j}", res(ch + skip_channels.pop(), c.ch * c.ch_mult[level]), pop=True)
                ch = c.ch * c.ch_mult[level]
                if has_attn:
                    add(f"up{level}_attn{j}", AttnBlock(ch, c.num_groups, c.norm_eps))
            if level != 0:
                add(f"up{level}_upsample", Upsample(ch))
                size *= 2
        assert not skip_channels

        self.blocks = nn.ModuleDict(blocks)
        self.units: tuple[Unit, ...] = tuple(units)
        self.norm_out = NormAct(c.num_groups, ch, c.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)
        self._branch_points = self._find_branch_points()

    # -- structure -------------------------------------------------------------------------

    def _find_branch_points(self) -> list[tuple[int, int]]:
        """For each skip index d: (units to run on the down path, index of the up unit popping d)."""
        down_end, depth = {0: 0}, 0
        for i, unit in enumerate(self.units):
            if unit.push:
                depth += 1
                down_end[depth] = i + 1
        up_start, stack = {}, depth
        for i, unit in enumerate(self.units):
            if unit.pop:
                up_start[stack] = i
                stack -= 1
        return [(down_end[d], up_start[d]) for d in range(depth + 1)]

    @property
    def num_branches(self) -> int:
        """Number of valid ``StepPlan.cache_branch`` values (0 .. num_branches-1)."""
        return len(self._branch_points)

    # -- forward ---------------------------------------------------------------------------

    def embed_time(self, t: Tensor, batch: int) -> Tensor:
        if t.ndim == 0:
            t = t.expand(batch)
        # in the dtype of the embedding weights (bf16 under amp(weights=true))
        return self.time_embed(timestep_embedding(t, self.config.ch).to(self.time_embed[0].weight.dtype))

    def forward(self, x: Tensor, t: Tensor, plan: StepPlan | None = None) -> Tensor:
        """Predict the noise eps(x, t). ``t`` is a scalar or a (B,) tensor of timesteps."""
        emb = self.embed_time(t, x.shape[0])
        h = self.conv_in(x)
        skips = [h]
        if plan is None:
            h = self._run(0, len(self.units), h, emb, skips, frozenset())
        elif plan.cache_branch is None:
            h = self._run(0, len(self.units), h, emb, skips, plan.skip)
        else:
            down_end, up_start = self._branch_points[plan.cache_branch]
            if plan.cached is None:
                h = self._run(0, up_start, h, emb, skips, plan.skip)
                plan.captured = h
            else:
                self._run(0, down_end, h, emb, skips, plan.skip)
                h = plan.cached
            h = self._run(up_start, len(self.units), h, emb, skips, plan.skip)
        return self.conv_out(self.norm_out(h))

    def _run(self, start: int, stop: int, h: Tensor, emb: Tensor, skips: list[Tensor],
             skip: frozenset[str]) -> Tensor:
        for unit in self.units[start:stop]:
            block = self.blocks[unit.name]
            if unit.pop:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block.skip(h) if unit.name in skip else block(h, emb)
            if unit.push:
                skips.append(h)
        return h


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
