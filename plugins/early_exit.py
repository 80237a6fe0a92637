"""early_exit: ASE-style time-dependent block skipping (Moon et al., ICML 2024) for the conv U-Net.

Near pure noise (large t) units are skipped, fewer as t falls; near t = 0 the whole network runs.
Which units go first: ``order=shallow`` (the default) those of the full-resolution level inwards,
``order=deep`` the middle block and the ResBlocks/attention of the lowest-resolution levels (ASE's
DiT recipe: deep blocks first). On a small conv U-Net the deep units are cheap, so only the
shallow order saves much (docs/performance.md, "early_exit"). A skipped ResBlock
keeps its 1x1 shortcut where channels change, attention becomes the identity, and every skip
concatenation stays (StepPlan.skip). Skipping changes the function, so fine-tune with the same
schedule: ``ddpm-perf train --plugins early_exit --init CKPT ...`` trains every sample with the
units its timestep would skip (the batch is split by schedule bucket). The defaults are the
schedule of the fine-tuned digits model this plugin ships, which it samples when no checkpoint
is given.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ddpm_perf.errors import RunWarning, UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.model.unet import StepPlan
from ddpm_perf.plugins import Option, Phase, Plugin, parse_spec, split_spec


def skip_candidates(unit_names: list[str], num_levels: int, levels: int, order: str = "deep") -> list[str]:
    """Skippable units in the order a growing skip takes them.

    ``deep``: the middle block, then the ResBlocks/attention of the ``levels`` lowest-resolution
    levels, alternating down and up path from the middle outwards (ASE's DiT analogue: the deep
    blocks go first). ``shallow``: the ``levels`` highest-resolution levels from the image inwards,
    alternating the up path's last units and the down path's first; the middle never."""
    def units(prefix: str) -> list[str]:
        return [n for n in unit_names if n.startswith(prefix) and not n.endswith("sample")]

    if order == "shallow":
        out = []
        for level in range(levels):
            down, up = units(f"down{level}_"), units(f"up{level}_")[::-1]
            for i in range(max(len(down), len(up))):
                out += up[i:i + 1] + down[i:i + 1]
        return out
    out = ["mid_attn", "mid_res1", "mid_res0"]
    for level in reversed(range(num_levels - levels, num_levels)):
        down, up = units(f"down{level}_")[::-1], units(f"up{level}_")
        for i in range(max(len(down), len(up))):
            out += down[i:i + 1] + up[i:i + 1]
    return out


def _schedule_part(spec: str) -> str:
    """A plugin's spec without ``tune``, which changes how it was trained, not what it skips."""
    [(name, opts)] = parse_spec(spec)
    return f"{name}({','.join(f'{k}={v}' for k, v in opts.items() if k != 'tune')})" if opts else name


class TimeGroupedSkip(nn.Module):
    """Training: runs each sample with the units its timestep skips (one forward per bucket)."""

    def __init__(self, model: nn.Module, plugin: "EarlyExit"):
        super().__init__()
        self.model, self.plugin = model, plugin

    def forward(self, x: torch.Tensor, t: torch.Tensor, plan: StepPlan | None = None) -> torch.Tensor:
        if self.plugin.opts.tune == "random":  # torch's global RNG: the trainer checkpoints it
            buckets = torch.randint(self.plugin.opts.buckets, t.shape, device=t.device)
        else:
            buckets = self.plugin.bucket_of(t)
        out = torch.empty_like(x)
        for k in buckets.unique().tolist():
            mine = (buckets == k).nonzero().squeeze(1)
            out[mine] = self.model(x[mine], t[mine], StepPlan(skip=self.plugin.skips[k]))
        return out


class EarlyExit(Plugin):
    name = "early_exit"
    shipped_model = "digits_early_exit.safetensors"  # fine-tuned for the default schedule
    description = "ASE early exit: skip U-Net units on a time schedule, more near pure noise."
    phase = Phase.REWRITE
    options = {
        "levels": Option(int, 2, "levels whose units may be skipped: the highest-resolution ones (order=shallow) "
                                  "or the lowest-resolution ones and the middle (order=deep)"),
        "max_skip": Option(float, 0.7, "fraction of those units skipped in the noisiest bucket"),
        "buckets": Option(int, 5, "equal timestep ranges; the least noisy runs the whole network"),
        "order": Option(str, "shallow", "which units a growing skip takes first: shallow (the image's resolution "
                                        "inwards) or deep (the middle outwards)", choices=("shallow", "deep")),
        "tune": Option(str, "schedule", "training: each sample skips what its timestep's bucket skips (schedule) "
                                        "or what a random bucket skips, at any timestep (random: LayerDrop-like)",
                       choices=("schedule", "random")),
    }
    conflicts = ("cuda_graphs",)

    def __init__(self, **values):
        super().__init__(**values)
        o = self.opts
        if o.levels < 0 or not 0 <= o.max_skip <= 1 or o.buckets < 2:
            raise UserError("plugin early_exit: needs levels >= 0, max_skip in [0, 1] and buckets >= 2")
        self.skips: list[frozenset[str]] = []
        self._num_timesteps = 1000

    def bucket_of(self, t):
        return t * self.opts.buckets // self._num_timesteps

    @hookimpl
    def configure(self, ctx):
        c = ctx.model_config
        if self.opts.levels > c.num_levels:
            raise UserError(f"plugin early_exit: levels={self.opts.levels} exceeds the model's {c.num_levels}")
        self._num_timesteps = ctx.diffusion.num_timesteps
        tuned_with, mine = [_schedule_part(p) for p in split_spec(ctx.trained_with)], _schedule_part(self.spec)
        if ctx.mode == "sample" and mine not in tuned_with:
            trained = next((p for p in tuned_with if p.startswith(f"{self.name}(")), None)
            why = (f"the weights were fine-tuned with {trained}" if trained else
                   f"the weights were trained with {ctx.trained_with}, not early_exit" if ctx.trained_with else
                   "the checkpoint records no fine-tuning with early_exit")
            warnings.warn(f"plugin {mine}: {why}; skipping units then changes what the network computes. "
                          f"Fine-tune first: ddpm-perf train --plugins '{mine}' --init CKPT ...", RunWarning,
                          stacklevel=2)

    @hookimpl
    def transform_model(self, model, ctx):
        o = self.opts
        candidates = skip_candidates(list(model.blocks), model.config.num_levels, o.levels, o.order)
        self.skips = [frozenset(candidates[:round(o.max_skip * len(candidates) * k / (o.buckets - 1))])
                      for k in range(o.buckets)]
        if ctx.mode == "train":
            return TimeGroupedSkip(model, self)
        if ctx.sampler is not None:
            steps = ctx.sampler.timesteps
            skipped = sum(len(self.skips[self.bucket_of(t)]) for t in steps) / len(steps)
            ctx.report.append(f"early_exit: {skipped:.1f} of {len(model.blocks)} units skipped per step on "
                              f"average (up to {len(self.skips[-1])} near t=T)")
        return model

    @hookimpl
    def plan_step(self, step, t, plan, ctx):
        plan.skip = plan.skip | self.skips[self.bucket_of(t)]
