"""patch_parallel: each image split into row bands, one per torchrun process.

Every rank holds the full x_t and runs the U-Net on its band; the bands' noise predictions are
all-gathered after each step, so every rank takes the same sampler step with the same noise
(the engine's seed convention) and rank 0 writes the images. Modes:

* ``sync``: exact. Halo rows from the neighbours for every k x k conv, GroupNorm statistics from
  all ranks, attention over every band's keys and values; equal to one process.
* ``displaced`` (DistriFusion, Li et al., CVPR 2024): after ``warmup`` exact steps, each layer
  uses the other bands' data from the previous step (halos, corrected GroupNorm statistics,
  keys and values), all-gathered asynchronously in buckets while the network runs on.
* ``pcpp`` (partially conditioned patch parallelism, Zhang et al., 2024): as displaced, but
  attention sees only its own band and the ``portion`` of each neighbour's positions nearest to
  it, and halos and keys/values go point to point to the two neighbours only.

In every mode ``whole_at=R`` runs the levels of at most R rows on the whole image on every rank,
exact and with nothing exchanged inside them (one all-gather on the way down into them). Ranks on
one machine exchange through shared memory (``transport``, wire.py).

Launch: ``torchrun --standalone --nproc_per_node N -m ddpm_perf sample --plugins patch_parallel``.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from ddpm_perf.distributed import DEFAULT_TIMEOUT
from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.model.config import UNetConfig
from ddpm_perf.model.unet import AttnBlock, Downsample, NormAct, UNet, Upsample
from ddpm_perf.plugins import Option, Phase, Plugin

from .exchange import KINDS, Exchange
from .layers import (BandAttention, BandDownsample, BandInput, Bands, BandNorm, BandUpsample, ChannelSplitConv,
                     HaloConv2d, WholeRows)
from .wire import TRANSPORTS, open_wire


# A shared-memory ring holds messages of up to half its size, so two buckets; at the default
# bucket, 4 ranks need 12 rings (48 MiB), less than Docker's default /dev/shm of 64 MiB.
RING_BUCKETS = 4

# Layers that work on a band as they are: pointwise in space (1x1 convs are checked apart).
ROW_LOCAL = (nn.Linear, nn.SiLU, nn.Dropout, nn.Identity)


def unit_rows(name: str, config: UNetConfig) -> tuple[int, int]:
    """Rows of the input and the output of the U-Net unit ``name`` (down<L>_*, mid_*, up<L>_*)."""
    level = config.num_levels - 1 if name.startswith("mid_") else int(re.match(r"(?:down|up)(\d+)_", name)[1])
    rows = config.image_size >> level
    return rows, rows // 2 if name.endswith("_downsample") else rows * 2 if name.endswith("_upsample") else rows


def split_into_bands(model: UNet, bands: Bands, whole_at: int = 0, share_whole: bool = False) -> UNet:
    """Replace, in place, every layer that looks across rows by its band version. Any other
    layer must be known to work on a band as it is; an unknown one (another plugin's) is refused
    rather than silently computed on the band alone.

    Units whose input and output have at most ``whole_at`` rows run on the whole image on every
    rank, as they are: the Downsample into them all-gathers the bands' rows (``WholeRows``), and
    the Upsample out of them cuts this rank's band again (``BandUpsample``). With ``share_whole``
    the ranks share out those units' convolutions by output channels (``ChannelSplitConv``)."""
    layer = iter(range(1 << 30))  # ids in module order: the same on every rank

    def whole_level(name: str, child: nn.Module) -> nn.Module | None:
        """None to split ``child`` as usual; itself to leave it whole; else its transition layer."""
        rows_in, rows_out = unit_rows(name, model.config)
        if rows_in > whole_at and rows_out > whole_at:
            return None
        if rows_in <= whole_at and rows_out <= whole_at:
            return child
        if type(child) is Downsample:
            return WholeRows(BandDownsample(child, bands, next(layer)), bands, next(layer))
        if type(child) is Upsample:
            return BandUpsample(child, bands)
        raise UserError(f"plugin patch_parallel: cannot change resolution in {name} ({type(child).__name__})")

    def rewrite(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            whole = whole_level(name, child) if whole_at and parent is model.blocks else None
            if whole is not None:
                if whole is not child:
                    setattr(parent, name, whole)
                elif share_whole:
                    share_convs(child)
                continue
            if parent is model and name == "conv_in":
                new = BandInput(child, bands)
            elif type(child) is AttnBlock:
                rewrite(child)
                new = BandAttention(child, bands, next(layer))
            elif type(child) is Downsample:
                new = BandDownsample(child, bands, next(layer))
            elif type(child) is NormAct:
                new = BandNorm(child, bands, next(layer))
            elif type(child) is nn.Conv2d and child.kernel_size != (1, 1):
                pad = child.padding[0]
                if child.stride[0] != 1 or child.padding_mode != "zeros" or isinstance(pad, str):
                    raise UserError(f"plugin patch_parallel: cannot split conv {name} ({child})")
                new = HaloConv2d(child, bands, next(layer), top=pad, bottom=pad, pad_width=child.padding[1])
            elif type(child) is nn.Conv2d or isinstance(child, ROW_LOCAL):
                continue
            elif next(child.children(), None) is None or isinstance(child, (nn.Conv2d, nn.GroupNorm)):
                raise UserError(f"plugin patch_parallel: cannot split {type(child).__name__} layers (another "
                                "plugin's?); drop that plugin or list it after patch_parallel")
            else:
                rewrite(child)
                continue
            setattr(parent, name, new)

    def share_convs(unit: nn.Module) -> None:
        for name, child in unit.named_children():
            if type(child) is nn.Conv2d:
                if child.out_channels % bands.world_size:
                    raise UserError(f"plugin patch_parallel: share_whole: {child.out_channels} channels of {name} "
                                    f"do not divide among {bands.world_size} ranks")
                setattr(unit, name, ChannelSplitConv(child, bands, next(layer)))
            else:
                share_convs(child)

    rewrite(model)
    return model


def check_geometry(config: UNetConfig, world: int, whole_at: int = 0) -> None:
    """Every rank needs a whole band at every resolution split into bands, down to the lowest."""
    if whole_at >= config.image_size:
        raise UserError(f"plugin patch_parallel: whole_at={whole_at} leaves nothing of the {config.image_size}px "
                        f"model to split; use less than {config.image_size}")
    lowest = min(rows for rows in (config.image_size >> level for level in range(config.num_levels)) if rows > whole_at)
    factor = config.image_size // lowest
    split = " split" if factor < config.downsample_factor else ""  # levels below run whole
    if world > lowest:
        raise UserError(f"plugin patch_parallel: {world} ranks but the {config.image_size}px model's lowest{split} "
                        f"resolution has {lowest} rows; use at most {lowest} ranks")
    if lowest % world:
        raise UserError(f"plugin patch_parallel: image height {config.image_size} must be divisible by ranks x "
                        f"2^downsamplings{split} = {world} x {factor}; use a number of ranks dividing {lowest}")


class PatchParallel(Plugin):
    name = "patch_parallel"
    description = "Split each image into row bands over torchrun processes (exact, DistriFusion or PCPP)."
    phase = Phase.REWRITE
    options = {
        "mode": Option(str, "displaced", "sync: exact; displaced: DistriFusion; pcpp: neighbours only",
                       choices=("sync", "displaced", "pcpp")),
        "warmup": Option(int, 4, "displaced, pcpp: steps 0..warmup are exact"),
        "portion": Option(float, 0.3, "pcpp: fraction of each neighbour's positions that attention sees"),
        "bucket_mib": Option(float, 1.0, "displaced, pcpp: data queued before an asynchronous send"),
        "transport": Option(str, "auto", "shared_memory: ranks on one machine (CPU); process_group: gloo or "
                            "NCCL; auto: shared memory where it can", choices=TRANSPORTS),
        "whole_at": Option(int, 0, "levels of at most this many rows run on the whole image on every rank "
                           "(0: every level split)"),
        "share_whole": Option(bool, False, "whole_at levels: each rank computes its share of every conv's output "
                              "channels, all-gathered after it (exact)"),
    }
    # Each of these replaces the norm, attention or conv layers with its own (that see the whole image,
    # or a slice of the channels), or compiles or captures the step with its collectives inside.
    conflicts = ("fused_norm", "fused_attention", "int8", "step_aware", "compile", "cuda_graphs")

    def __init__(self, **values):
        super().__init__(**values)
        o = self.opts
        if o.warmup < 0:
            raise UserError(f"plugin patch_parallel: warmup={o.warmup} must be at least 0 (step 0 is always exact)")
        if not 0 <= o.portion <= 1:
            raise UserError(f"plugin patch_parallel: portion={o.portion} must be in [0, 1]")
        if o.whole_at < 0:
            raise UserError(f"plugin patch_parallel: whole_at={o.whole_at} must be at least 0")
        if o.share_whole and not o.whole_at:
            raise UserError("plugin patch_parallel: share_whole shares out the whole_at levels' convolutions; "
                            "give whole_at too, e.g. patch_parallel(whole_at=8,share_whole=true)")
        if o.bucket_mib <= 0:
            raise UserError(f"plugin patch_parallel: bucket_mib={o.bucket_mib} must be positive")
        self.bands: Bands | None = None
        self.why_not_shared: str | None = None  # transport=auto took the process group, for this reason
        self.steps = 0  # model evaluations since the counters were reset

    @classmethod
    def available(cls) -> str | None:
        return None if dist.is_available() else "this torch has no torch.distributed"

    @hookimpl
    def configure(self, ctx):
        if ctx.mode != "sample":
            raise UserError("plugin patch_parallel: sampling only; train data-parallel with torchrun instead")
        if not dist.is_initialized() or dist.get_world_size() < 2:
            raise UserError("plugin patch_parallel: run it on 2 or more processes: torchrun --standalone "
                            "--nproc_per_node 2 -m ddpm_perf sample --plugins patch_parallel ...")
        check_geometry(ctx.model_config, dist.get_world_size(), self.opts.whole_at)
        ctx.data_parallel = False  # every rank works on every image

    @hookimpl
    def transform_model(self, model, ctx):
        o = self.opts
        rank, world = dist.get_rank(), dist.get_world_size()
        bucket = int(o.bucket_mib * 2**20)
        wire, self.why_not_shared = open_wire(o.transport, rank, world, ctx.device, RING_BUCKETS * bucket,
                                              DEFAULT_TIMEOUT)
        exchange = Exchange(rank, world, wire, bucket, DEFAULT_TIMEOUT)
        self.bands = Bands(exchange, o.mode, o.warmup, o.portion)
        return split_into_bands(model, self.bands, o.whole_at, o.share_whole)

    @hookimpl
    def wrap_denoiser(self, fn, ctx):
        exchange = self.bands.exchange

        def denoise(x, t, plan):
            band = fn(x, t, plan).contiguous()
            exchange.flush()  # the rest of this step's displaced data goes out now
            return torch.cat(exchange.gather(band, "output"), 2)

        return denoise

    @hookimpl
    def plan_step(self, step, t, plan, ctx):
        self.bands.step = step
        if step == 0:  # a new batch: nothing stale carries over
            self.bands.exchange.reset()

    @hookimpl
    def after_step(self, step, state, ctx):
        self.steps += 1
        if step == len(ctx.sampler.timesteps) - 1:
            self.bands.exchange.reset()  # no sends left on the wire between batches
            per_step = self.bytes_per_step()
            wire = self.bands.exchange.wire.name.replace("_", " ")
            if self.why_not_shared:
                wire += f" (not shared memory: {self.why_not_shared})"
            line = ("patch_parallel: " + f"{self.opts.mode} on {self.bands.world_size} ranks over {wire}, "
                    "sent per step per rank "
                    "(mean over ranks): " + ", ".join(f"{k} {v / 2**10:.1f} KiB" for k, v in per_step.items())
                    + f"; total {sum(per_step.values()) / 2**20:.2f} MiB")
            ctx.report[:] = [r for r in ctx.report if not r.startswith("patch_parallel:")] + [line]

    def bytes_per_step(self) -> dict[str, float]:
        """Bytes sent per model evaluation per rank, by layer kind, averaged over the ranks (a collective)."""
        sent = torch.tensor([float(self.bands.exchange.sent.get(k, 0)) for k in KINDS], dtype=torch.float64)
        dist.all_reduce(sent)
        return {k: v / self.bands.world_size / max(self.steps, 1) for k, v in zip(KINDS, sent.tolist())}

