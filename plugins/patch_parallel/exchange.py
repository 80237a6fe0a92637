"""Moving band data between ranks: blocking or one step stale, to all ranks or to the two
neighbours only, with the bytes each rank sends counted by layer kind.

A band layer hands over a ``Message`` each forward: what every rank needs (``to_all``:
all-gathered) and what only the rank above or below needs (``to_up`` / ``to_down``: sent point
to point). It gets back a ``Delivery`` with the other ranks' parts:

* ``wait=True`` (exact steps): the message goes out now and the call blocks; the delivery holds
  this step's data.
* ``wait=False`` (displaced steps, DistriFusion): the call returns at once with the data the
  other ranks sent for this layer at the last step it ran. The fresh message is queued; full
  buckets go out at once, asynchronously (over gloo: collectives on their own process group),
  so they travel while the forward and the next step run on, until a layer needs them.

The bytes move on a wire (wire.py): shared memory between ranks on one machine, else the
process group.

Every rank sends the same layers in the same order with the same shapes (equal bands), so a
receiver knows every size without a handshake.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .wire import Wire

KINDS = ("halo", "norm", "attention", "gather", "output")


@dataclass
class Message:
    layer: int
    kind: str  # one of KINDS, for the accounting
    to_all: Tensor | None = None
    to_up: Tensor | None = None  # for rank - 1
    to_down: Tensor | None = None  # for rank + 1


@dataclass
class Delivery:
    from_all: list[Tensor] | None = None  # indexed by rank (the own slot is this rank's message)
    from_up: Tensor | None = None  # what rank - 1 sent down; None at the top edge
    from_down: Tensor | None = None  # what rank + 1 sent up; None at the bottom edge


@dataclass
class _Flight:
    """One bucket of queued messages on the wire."""

    by_dtype: dict[torch.dtype, list[Message]]  # one flat buffer per dtype and direction
    works: list
    recv_all: dict[torch.dtype, list[Tensor]] = field(default_factory=dict)
    recv_up: dict[torch.dtype, Tensor] = field(default_factory=dict)
    recv_down: dict[torch.dtype, Tensor] = field(default_factory=dict)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, at = [], 0
    for t in like:
        out.append(flat[at:at + t.numel()].view(t.shape))
        at += t.numel()
    return out


class Exchange:
    def __init__(self, rank: int, world_size: int, wire: Wire, bucket_bytes: int = 1 << 20,
                 timeout: datetime.timedelta | None = None):
        self.rank, self.world_size, self.wire = rank, world_size, wire
        self.bucket_bytes = bucket_bytes
        # Asynchronous traffic over the process group gets a group of its own: the blocking
        # collectives of exact layers and of the output gather must not queue behind a bucket.
        self.async_group = dist.new_group(backend=dist.get_backend(), timeout=timeout)
        self.sent: dict[str, int] = defaultdict(int)  # bytes this rank has sent, by kind (KINDS)
        self._queue: list[Message] = []
        self._queued_bytes = 0
        self._in_flight: dict[int, _Flight] = {}  # layer -> the flight carrying its last message
        self._latest: dict[int, Delivery] = {}  # layer -> the last delivery received
        self._tag = 0

    @property
    def up(self) -> int | None:
        return self.rank - 1 if self.rank > 0 else None

    @property
    def down(self) -> int | None:
        return self.rank + 1 if self.rank < self.world_size - 1 else None

    # -- the one call layers make ------------------------------------------------------------

    def send(self, message: Message, wait: bool) -> Delivery:
        if wait:
            flight = self._launch([message], group=None)
            delivery = self._land(flight)[message.layer]
            self._latest[message.layer] = delivery
            return delivery
        stale = self.stale(message.layer)
        self._queue.append(message)
        self._queued_bytes += sum(t.numel() * t.element_size() for t in _parts(message))
        if self._queued_bytes >= self.bucket_bytes:
            self.flush()
        return stale

    def stale(self, layer: int) -> Delivery:
        """What the other ranks last sent for ``layer`` (waiting for it if still on the wire)."""
        flight = self._in_flight.get(layer)
        if flight is not None:
            for landed_layer, delivery in self._land(flight).items():
                # A layer may be on a newer flight already (deep_cache skips layers for some steps,
                # so an old flight can land late): only its newest message counts.
                if self._in_flight.get(landed_layer) is flight:
                    self._latest[landed_layer] = delivery
                    del self._in_flight[landed_layer]
        if layer not in self._latest:
            raise RuntimeError(f"patch_parallel: layer {layer} has no data from an earlier step; "
                               "a displaced step must follow an exact one")
        return self._latest[layer]

    def flush(self) -> None:
        """Put the queued messages on the wire, asynchronously."""
        if not self._queue:
            return
        flight = self._launch(self._queue, group=self.async_group)
        for message in self._queue:
            self._in_flight[message.layer] = flight
        self._queue, self._queued_bytes = [], 0

    def reset(self) -> None:
        """Start a new image batch: land everything still on the wire, forget all stale data."""
        self.flush()
        for flight in {id(f): f for f in self._in_flight.values()}.values():
            self._land(flight)
        self._in_flight.clear()
        self._latest.clear()

    def gather(self, tensor: Tensor, kind: str) -> list[Tensor]:
        """Every rank's ``tensor``, indexed by rank: blocking, outside the layers' messages."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.wire.all_gather(parts, tensor).wait()
        self.count(kind, (self.world_size - 1) * tensor.numel() * tensor.element_size())
        return parts

    def count(self, kind: str, nbytes: int) -> None:
        self.sent[kind] += nbytes

    def _count(self, messages: list[Message], part: str, copies: int) -> None:
        for m in messages:
            t = getattr(m, part)
            if t is not None:
                self.count(m.kind, copies * t.numel() * t.element_size())

    # -- wire ---------------------------------------------------------------------------------

    def _launch(self, messages: list[Message], group) -> _Flight:
        by_dtype: dict[torch.dtype, list[Message]] = defaultdict(list)
        for m in messages:
            by_dtype[_parts(m)[0].dtype].append(m)
        flight = _Flight(by_dtype, [])
        for dtype, ms in by_dtype.items():
            to_all = [m.to_all for m in ms if m.to_all is not None]
            if to_all:
                mine = _flat(to_all)
                flight.recv_all[dtype] = [torch.empty_like(mine) for _ in range(self.world_size)]
                flight.works.append(self.wire.all_gather(flight.recv_all[dtype], mine, group))
                # ring all-gather: each rank's part travels to the world_size - 1 others
                self._count(ms, "to_all", self.world_size - 1)
            # Up-going parts carry tag, down-going tag + 1: the same sequence on every rank.
            self._tag += 2
            up_tag, down_tag = self._tag, self._tag + 1
            to_up = [m.to_up for m in ms if m.to_up is not None]
            to_down = [m.to_down for m in ms if m.to_down is not None]
            flat_up = _flat(to_up) if to_up else None
            flat_down = _flat(to_down) if to_down else None
            # What the rank above sends down has the shape of what I send down, and vice versa.
            for peer, send, send_tag, part, like, recv_tag, received in (
                    (self.up, flat_up, up_tag, "to_up", flat_down, down_tag, flight.recv_up),
                    (self.down, flat_down, down_tag, "to_down", flat_up, up_tag, flight.recv_down)):
                if peer is None:
                    continue
                if send is not None:
                    flight.works.append(self.wire.isend(send, peer, group, send_tag))
                    self._count(ms, part, 1)
                if like is not None:
                    received[dtype] = torch.empty_like(like)
                    flight.works.append(self.wire.irecv(received[dtype], peer, group, recv_tag))
        return flight

    def _land(self, flight: _Flight) -> dict[int, Delivery]:
        for work in flight.works:
            work.wait()
        flight.works = []
        out: dict[int, Delivery] = {}
        for dtype, ms in flight.by_dtype.items():
            all_like = [m.to_all for m in ms if m.to_all is not None]
            per_rank = ([_split(flat, all_like) for flat in flight.recv_all[dtype]]
                        if dtype in flight.recv_all else None)
            up_like = [m.to_down for m in ms if m.to_down is not None]  # the rank above sent its to_down
            down_like = [m.to_up for m in ms if m.to_up is not None]
            from_up = (iter(_split(flight.recv_up[dtype], up_like))
                       if flight.recv_up.get(dtype) is not None else None)
            from_down = (iter(_split(flight.recv_down[dtype], down_like))
                         if flight.recv_down.get(dtype) is not None else None)
            i_all = 0
            for m in ms:
                d = Delivery()
                if m.to_all is not None:
                    d.from_all = [parts[i_all] for parts in per_rank]
                    i_all += 1
                if m.to_down is not None and from_up is not None:
                    d.from_up = next(from_up)
                if m.to_up is not None and from_down is not None:
                    d.from_down = next(from_down)
                out[m.layer] = d
        return out


def _parts(m: Message) -> list[Tensor]:
    return [t for t in (m.to_all, m.to_up, m.to_down) if t is not None]
