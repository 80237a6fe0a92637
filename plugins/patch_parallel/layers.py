"""The U-Net's layers on a row band: each wraps the original module and keeps its weights.

Only layers that look across rows need the other bands: k x k convolutions (halo rows),
GroupNorm (statistics over the whole image) and self-attention (keys and values of every
position). 1x1 convolutions, linear layers, SiLU, nearest upsampling, the time embedding and
the skip concatenations work on a band as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_perf.model.attention import native_attention
from ddpm_perf.model.unet import AttnBlock, NormAct

from .exchange import Exchange, Message


@dataclass
class Bands:
    """What every band layer shares: who this rank is and what kind of step runs now."""

    exchange: Exchange
    mode: str  # sync | displaced | pcpp
    warmup: int  # steps 0..warmup are exact in displaced and pcpp
    portion: float  # pcpp: fraction of each neighbour's tokens attended
    step: int = 0

    @property
    def rank(self) -> int:
        return self.exchange.rank

    @property
    def world_size(self) -> int:
        return self.exchange.world_size

    @property
    def exact(self) -> bool:
        return self.mode == "sync" or self.step <= self.warmup


def band_conv(conv: nn.Conv2d, pad_width: int) -> nn.Conv2d:
    """``conv`` without its vertical padding (rows of the image or of the other bands stand in for
    it), sharing its parameters: a plain nn.Conv2d, so that plugins acting on convolutions later in
    the order (prepack) act on the bands' convolutions too."""
    band = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, (0, pad_width),
                     conv.dilation, conv.groups, conv.bias is not None, device="meta")
    band.weight, band.bias = conv.weight, conv.bias
    return band


class BandInput(nn.Module):
    """The first conv: cuts its band, with the rows its kernel needs, from the full input."""

    def __init__(self, conv: nn.Conv2d, bands: Bands):
        super().__init__()
        self.conv, self.bands, self.pad = band_conv(conv, conv.padding[1]), bands, conv.padding[0]

    def forward(self, x: Tensor) -> Tensor:
        height, pad = x.shape[2], self.pad
        rows = height // self.bands.world_size
        lo, hi = self.bands.rank * rows - pad, (self.bands.rank + 1) * rows + pad
        return self.conv(F.pad(x[:, :, max(lo, 0):min(hi, height)], (0, 0, max(-lo, 0), max(hi - height, 0))))


class HaloConv2d(nn.Module):
    """A k x k conv on a band: ``top`` rows from the band above and ``bottom`` rows from the band
    below (zeros at the image's edges) replace the conv's own vertical zero padding."""

    def __init__(self, conv: nn.Conv2d, bands: Bands, layer: int, top: int, bottom: int, pad_width: int):
        super().__init__()
        self.conv, self.bands, self.layer = band_conv(conv, pad_width), bands, layer
        self.top, self.bottom = top, bottom

    def forward(self, x: Tensor) -> Tensor:
        b = self.bands
        first, last = x[:, :, :self.bottom], x[:, :, x.shape[2] - self.top:]
        if b.mode == "displaced" and b.world_size == 2 and self.top == self.bottom:
            # One neighbour: each rank all-gathers only the rows the other needs (the same shape on
            # both ranks): the same data for half the bytes, and gloo's copies cost the step time.
            theirs = b.exchange.send(Message(self.layer, "halo", to_all=last if b.rank == 0 else first),
                                     wait=b.exact).from_all[1 - b.rank]
            above, below = (None, theirs) if b.rank == 0 else (theirs, None)
        elif b.mode == "displaced":  # DistriFusion: both boundaries of every layer to every rank
            delivery = b.exchange.send(Message(self.layer, "halo", to_all=torch.cat([first, last], 2)), wait=b.exact)
            above = delivery.from_all[b.rank - 1][:, :, self.bottom:] if b.rank > 0 else None
            below = delivery.from_all[b.rank + 1][:, :, :self.bottom] if b.rank < b.world_size - 1 else None
        else:  # to the two neighbours only
            message = Message(self.layer, "halo", to_up=first if self.bottom else None,
                              to_down=last if self.top else None)
            delivery = b.exchange.send(message, wait=b.exact)
            above, below = delivery.from_up, delivery.from_down
        return self.conv(_stack_rows(above, x, below, self.top, self.bottom))


def _stack_rows(above: Tensor | None, x: Tensor, below: Tensor | None, top: int, bottom: int) -> Tensor:
    """``top`` rows of ``above``, x, ``bottom`` rows of ``below`` (zeros where None), in x's memory
    format. The received rows are NCHW: a plain cat of them with a channels_last x (oneDNN's
    convolutions return channels_last) comes out NCHW, ~8x slower to make, and the next conv
    converts it back."""
    batch, channels, height, width = x.shape
    layout = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    out = torch.empty((batch, channels, top + height + bottom, width), dtype=x.dtype, device=x.device,
                      memory_format=layout)
    out[:, :, top:top + height] = x
    for rows, part in ((above, out[:, :, :top]), (below, out[:, :, top + height:])):
        if rows is not None:
            part.copy_(rows)
        else:
            part.zero_()
    return out


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class BandDownsample(nn.Module):
    """The U-Net's Downsample (TF "SAME": one zero row and column after, then a stride-2 conv):
    on a band, the row after is the first row of the band below."""

    def __init__(self, down: nn.Module, bands: Bands, layer: int):
        super().__init__()
        self.conv = HaloConv2d(down.conv, bands, layer, top=0, bottom=1, pad_width=0)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.pad(x, (0, 1)))


class WholeRows(nn.Module):
    """Where the U-Net enters the levels every rank runs on the whole image: ``inner`` (the
    Downsample into them) on the band, then every band's rows, all-gathered now (blocking)."""

    def __init__(self, inner: nn.Module, bands: Bands, layer: int):
        super().__init__()
        self.inner, self.bands, self.layer = inner, bands, layer

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return _gather_whole(self.bands, self.layer, self.inner(x, emb), dim=2)


def _gather_whole(bands: Bands, layer: int, mine: Tensor, dim: int) -> Tensor:
    """Every rank's ``mine``, all-gathered now (blocking) and concatenated along ``dim`` in
    ``mine``'s memory format (the received parts arrive NCHW)."""
    parts = list(bands.exchange.send(Message(layer, "gather", to_all=mine), wait=True).from_all)
    parts[bands.rank] = mine
    layout = torch.channels_last if _is_channels_last(mine) else torch.contiguous_format
    return torch.cat(parts, dim).contiguous(memory_format=layout)


class ChannelSplitConv(nn.Module):
    """A conv of the whole-image levels (``whole_at``) shared out by output channels: this rank
    computes its 1/world of them, from weights sliced once, and all-gathers the rest (blocking,
    so exact). At batch 1 those levels' convs are bound by reading their weights, which every
    rank would otherwise read in full."""

    def __init__(self, conv: nn.Conv2d, bands: Bands, layer: int):
        super().__init__()
        share = conv.out_channels // bands.world_size
        first = bands.rank * share
        self.conv = nn.Conv2d(conv.in_channels, share, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                              conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        self.conv.weight = nn.Parameter(conv.weight.detach()[first:first + share].clone(), conv.weight.requires_grad)
        if conv.bias is not None:
            self.conv.bias = nn.Parameter(conv.bias.detach()[first:first + share].clone(), conv.bias.requires_grad)
        self.bands, self.layer = bands, layer

    def forward(self, x: Tensor) -> Tensor:
        return _gather_whole(self.bands, self.layer, self.conv(x), dim=1)


class BandUpsample(nn.Module):
    """Where the U-Net leaves the whole-image levels: the whole image upsampled (nearest), then its
    conv on this band, with the rows above and below it at hand: nothing is exchanged."""

    def __init__(self, up: nn.Module, bands: Bands):
        super().__init__()
        self.cut = BandInput(up.conv, bands)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.cut(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# Up to this many (sample, group) pairs BandNorm combines the statistics in a Python loop (a few
# calls, cheap from cold caches); above it, in fp64 tensor ops (the loop costs ~1 us a pair).
LOOP_GROUPS = 128


class BandNorm(nn.Module):
    """NormAct with the statistics of the whole image: each rank sends its per-(sample, group)
    mean and 1/std, and ``global_moments`` combines what the ranks sent.

    It runs ~60 times a step, each time after convolutions that have evicted the caches, where a
    torch or numpy call on a tiny array costs 5-10 us, not 1. So the (batch, groups) arithmetic,
    a few dozen numbers at batch 1, runs as one Python loop over floats (in tensor ops for large
    batches), and the per-channel scale and offset come from it in one torch call."""

    def __init__(self, norm: NormAct, bands: Bands, layer: int):
        super().__init__()
        self.norm, self.bands, self.layer = norm, bands, layer
        self._params: tuple[tuple, Tensor, Tensor] | None = None

    def forward(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
        n, b = self.norm, self.bands
        if shift is not None:
            x = x + shift[:, :, None, None]
        batch, channels = x.shape[:2]
        local = _group_moments(x, n.num_groups)  # (2, B, G) fp32: mean, 1/std
        delivery = b.exchange.send(Message(self.layer, "norm", to_all=local), wait=b.exact)
        sent = torch.stack(delivery.from_all).view(b.world_size, 2, -1)
        if batch * n.num_groups <= LOOP_GROUPS:
            mean, var = global_moments(sent.tolist(), local.view(2, -1).tolist(), b.rank)
            inv_std = [1.0 / math.sqrt(v + n.eps) for v in var]
            per_group = torch.tensor([inv_std, [-m * s for m, s in zip(mean, inv_std)]])
        else:
            mean, var = global_moments_batched(sent, local.view(2, -1), b.rank)
            inv_std = (var + n.eps).rsqrt()
            per_group = torch.stack([inv_std, -mean * inv_std]).float()
        # [scale; offset] = [0; bias] + [1/std; -mean/std] * weight, per (sample, channel)
        per_group = per_group.view(2, batch, n.num_groups, 1)
        base, weight = self._base_weight()
        scale, offset = torch.addcmul(base, per_group, weight).to(x.dtype).view(2, batch, channels, 1, 1)
        y = torch.addcmul(offset, x, scale)
        return F.silu(y, inplace=True) if n.silu else y

    def _base_weight(self) -> tuple[Tensor, Tensor]:
        """[0; bias] as (2, 1, G, C/G) and the weight as (G, C/G), fp32, made again only if they change."""
        n = self.norm
        key = (n.weight.data_ptr(), n.weight._version, n.bias.data_ptr(), n.bias._version)
        if self._params is None or self._params[0] != key:
            weight = n.weight.detach().float().view(n.num_groups, -1)
            base = torch.stack([torch.zeros_like(weight), n.bias.detach().float().view(n.num_groups, -1)])[:, None]
            self._params = (key, base, weight)
        return self._params[1], self._params[2]


def global_moments(ranks: list, own: list, rank: int) -> tuple[list[float], list[float]]:
    """The whole image's per-(sample, group) mean and variance from every band's, as lists.

    ``ranks[r]`` holds the means and the 1/stds rank r sent, ``own`` this rank's now (2 lists of
    B * G floats). DistriFusion's corrected asynchronous GroupNorm: the mean of the bands' means
    and second moments (the bands are equal in size), with what this rank sent replaced by its
    own now (in an exact step they are the same, so the correction is zero). Where the variance
    comes out negative (stale moments), the own band's variance stands in. Python floats are fp64.
    """
    world = len(ranks)
    sent_means, sent_rstds = ranks[rank]
    mean, var = [], []
    for i, (own_mean, own_rstd) in enumerate(zip(*own)):
        means = second = 0.0
        for band_means, band_rstds in ranks:
            m = band_means[i]
            means += m
            second += _variance(band_rstds[i]) + m * m
        own_var = _variance(own_rstd)
        mu = means / world + own_mean - sent_means[i]
        v = (second / world + own_var + own_mean * own_mean
             - (_variance(sent_rstds[i]) + sent_means[i] * sent_means[i]) - mu * mu)
        mean.append(mu)
        var.append(v if v >= 0 else own_var)
    return mean, var


def global_moments_batched(ranks: Tensor, own: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``global_moments`` on tensors ((world, 2, B * G) and (2, B * G) fp32; fp64 out), for
    batches whose groups are too many for a Python loop."""
    ranks, own = ranks.double(), own.double()
    means, own_var = ranks[:, 0], own[1].pow(-2)  # 1/std = inf gives 0, 1/std = 0 inf
    seconds = ranks[:, 1].pow(-2) + means * means
    mean = means.mean(0) + own[0] - means[rank]
    variance = seconds.mean(0) + own_var + own[0] * own[0] - seconds[rank] - mean * mean
    return mean, torch.where(variance >= 0, variance, own_var)


def _variance(rstd: float) -> float:
    """1/rstd^2: 0 for a constant group (rstd = inf); inf, not an exception, where it overflowed
    (rstd = 0), so that the engine's finite check reports it."""
    return 1.0 / (rstd * rstd) if rstd else math.inf


def _group_moments(x: Tensor, groups: int) -> Tensor:
    """(2, B, G): per-(sample, group) mean and 1/std (of the biased variance) in fp32. ATen's
    GroupNorm kernel computes them vectorised, ~20x faster here than torch.var_mean's Welford
    loop; with eps = 0 its rstd is exactly 1 / sqrt(var). (It also writes a normalised output
    we do not use.)"""
    batch, channels, height, width = x.shape
    _, mean, rstd = torch.ops.aten.native_group_norm(x if x.dtype == torch.float32 else x.float(), None, None,
                                                     batch, channels, height * width, groups, 0.0)
    return torch.stack([mean, rstd])


class BandAttention(nn.Module):
    """Self-attention whose queries are this band's positions and whose keys and values come
    from every band (sync, displaced: the other bands' from the last step) or, in pcpp, from this
    band and the ``portion`` of each neighbour's positions nearest to it."""

    def __init__(self, block: AttnBlock, bands: Bands, layer: int):
        super().__init__()
        self.block, self.bands, self.layer = block, bands, layer

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        a = self.block
        batch, channels, height, width = x.shape
        tokens = a.norm(x).flatten(2).transpose(1, 2)  # (B, hW, C)
        keys_values = self._context(torch.cat([a.k(tokens), a.v(tokens)], 2))
        k, v = keys_values.split(channels, dim=2)
        out = native_attention(a.q(tokens), k, v)
        return x + a.proj_out(out).transpose(1, 2).reshape(batch, channels, height, width)

    def skip(self, x: Tensor) -> Tensor:
        return x

    def _context(self, kv: Tensor) -> Tensor:
        b = self.bands
        if b.exact or b.mode != "pcpp":
            delivery = b.exchange.send(Message(self.layer, "attention", to_all=kv), wait=b.exact)
            parts = list(delivery.from_all)
            parts[b.rank] = kv  # the own band is always fresh
            return torch.cat(parts, 1)
        near = int(b.portion * kv.shape[1])
        if near == 0:
            return kv
        delivery = b.exchange.send(Message(self.layer, "attention", to_up=kv[:, :near], to_down=kv[:, -near:]),
                                   wait=False)
        above, below = delivery.from_up, delivery.from_down
        if delivery.from_all is not None:  # the first displaced step: the last exact step sent everything
            above = delivery.from_all[b.rank - 1][:, -near:] if b.rank > 0 else None
            below = delivery.from_all[b.rank + 1][:, :near] if b.rank < b.world_size - 1 else None
        return torch.cat([p for p in (above, kv, below) if p is not None], 1)
