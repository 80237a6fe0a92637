"""checkpoint: activation (gradient) checkpointing of ResBlocks and attention in training."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.model.unet import AttnBlock, ResBlock
from ddpm_perf.plugins import Option, Phase, Plugin


class CheckpointedUnit(nn.Module):
    """Runs a unit without keeping its activations; they are recomputed in the backward pass."""

    def __init__(self, unit: nn.Module):
        super().__init__()
        self.unit = unit

    def forward(self, h, emb):
        if torch.is_grad_enabled():
            return checkpoint(self.unit, h, emb, use_reentrant=False)
        return self.unit(h, emb)

    def skip(self, h):
        return self.unit.skip(h)


def _level(name: str) -> str:
    """'down2_res1' -> '2', 'mid_attn' -> 'mid'."""
    head = name.split("_")[0]
    return "mid" if head == "mid" else head.lstrip("downup")


class Checkpoint(Plugin):
    name = "checkpoint"
    description = "Training: recompute ResBlock/attention activations in backward instead of storing them."
    phase = Phase.REWRITE
    options = {
        "levels": Option(str, "all", "resolution levels to checkpoint: 'all' or e.g. '0+1+mid' (0 = full size)"),
    }

    def _wanted(self, ctx) -> set[str] | None:
        if self.opts.levels == "all":
            return None
        wanted = set(self.opts.levels.split("+"))
        known = {str(i) for i in range(ctx.model_config.num_levels)} | {"mid"}
        if not wanted <= known:
            raise UserError(f"plugin checkpoint: levels={self.opts.levels!r}: each level must be one of "
                            f"{', '.join(sorted(known))}, joined with '+', or 'all'")
        return wanted

    @hookimpl
    def configure(self, ctx):
        self._wanted(ctx)  # validate before any work
        if ctx.mode != "train":
            ctx.report.append("checkpoint: no effect when sampling (there is no backward pass)")

    @hookimpl
    def transform_model(self, model, ctx):
        if ctx.mode != "train":
            return model
        wanted = self._wanted(ctx)
        for name, unit in list(model.blocks.items()):
            if isinstance(unit, (ResBlock, AttnBlock)) and (wanted is None or _level(name) in wanted):
                model.blocks[name] = CheckpointedUnit(unit)
        return model
