"""How the bands' messages travel: through the process group (gloo, NCCL; any machines), or through
shared memory when every rank runs on one machine.

Why shared memory: over gloo every message goes through the TCP loopback and two gloo threads
per rank, and on a machine whose cores are all busy those threads take their time from the
ranks' compute (docs/performance.md, "Where a rank's step goes"). Here a send is one copy into
the receiver's ring buffer and a receive one copy out; nothing runs in the background.

Both wires offer the three calls ``Exchange`` makes, each returning something to ``wait()`` on:
``all_gather`` (which may put ``tensor`` itself in this rank's slot of ``out``), ``isend`` and
``irecv``.
"""

from __future__ import annotations

import collections
import datetime
import mmap
import os
import platform
import socket
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ddpm_perf.distributed import PeerLost
from ddpm_perf.errors import UserError

TRANSPORTS = ("auto", "shared_memory", "process_group")


class ProcessGroupWire:
    name = "process_group"

    def all_gather(self, out: list[Tensor], tensor: Tensor, group=None):
        return dist.all_gather(out, tensor, group=group, async_op=True)

    def isend(self, tensor: Tensor, peer: int, group=None, tag: int = 0):
        return dist.isend(tensor, peer, group=group, tag=tag)

    def irecv(self, buffer: Tensor, peer: int, group=None, tag: int = 0):
        return dist.irecv(buffer, peer, group=group, tag=tag)


# Layout of a rank's shared file: a header line with the writer's pid, then for every other rank
# (the reader) two counters on their own cache lines, then one ring per reader.
_LINE = 64  # bytes: counters on separate cache lines, messages aligned to them
_FRAME = _LINE  # each message starts with a line holding its sequence number and size


def _align(n: int, to: int = _LINE) -> int:
    return (n + to - 1) // to * to


class _Ring:
    """Messages from one writer to one reader, in the order both issue them. ``written`` and
    ``read`` are byte positions that only grow: the writer moves ``written`` after its copy, the
    reader moves ``read`` after its copy. x86-64 keeps each core's stores in order (TSO), so a
    reader that sees ``written`` past a message sees the whole message."""

    def __init__(self, buffer: mmap.mmap, counters_at: int, data_at: int, size: int):
        self.written = np.frombuffer(buffer, np.int64, 1, counters_at)
        self.read = np.frombuffer(buffer, np.int64, 1, counters_at + _LINE)
        self.frame = np.frombuffer(buffer, np.int64, size // 8, data_at)
        self.data = torch.frombuffer(buffer, dtype=torch.uint8, count=size, offset=data_at)
        self.size = size
        self.position = 0  # this side's own position: the end of the last message it moved
        self.sequence = 0

    def place(self, nbytes: int) -> tuple[int, int]:
        """Start and end of the next message: contiguous, so it skips the ring's tail if it would wrap."""
        start = self.position
        need = _FRAME + _align(nbytes)
        if start % self.size + need > self.size:
            start += self.size - start % self.size
        return start, start + need


@dataclass
class _Posted:
    buffer: Tensor  # contiguous, filled when the message lands
    done: bool = False


class _Done:
    """A send over shared memory: complete once the copy is in the ring."""

    def wait(self) -> bool:
        return True


class _Pending:
    """Receives over shared memory: complete once every posted buffer has landed."""

    def __init__(self, wire: SharedMemoryWire, posted: list[_Posted]):
        self.wire, self.posted = wire, posted

    def wait(self) -> bool:
        self.wire.wait_until(lambda: all(p.done for p in self.posted), "data")
        return True


class SharedMemoryWire:
    """One ring buffer per ordered pair of ranks in files under /dev/shm, mapped by both ranks and
    unlinked as soon as every rank has mapped them (so nothing outlives the processes).

    Every rank sends the same layers in the same order with the same shapes, so a reader knows the
    size of each message it will get and posts a buffer for it; receives land in the order they
    were posted. Messages over half a ring go through the process group instead (both sides decide
    alike from the size). A rank waiting for space or data keeps landing what has arrived for it, so
    two ranks that fill each other's rings cannot deadlock."""

    name = "shared_memory"

    def __init__(self, rank: int, world_size: int, ring_bytes: int, timeout: datetime.timedelta,
                 directory: str = "/dev/shm"):
        self.rank, self.world_size, self.ring_bytes = rank, world_size, ring_bytes
        self.timeout = timeout.total_seconds()
        self.process_group = ProcessGroupWire()
        self.peers = [r for r in range(world_size) if r != rank]
        self.outgoing: dict[int, _Ring] = {}
        self.incoming: dict[int, _Ring] = {}
        self.pids: dict[int, int] = {}
        self.posted: dict[int, collections.deque[_Posted]] = {p: collections.deque() for p in self.peers}
        self._connect(directory)

    # -- set-up ---------------------------------------------------------------------------------

    def _file_bytes(self) -> int:
        readers = self.world_size - 1
        return _LINE + 2 * _LINE * readers + self.ring_bytes * readers

    def _slot(self, writer: int, reader: int) -> tuple[int, int]:
        """Offsets of the counters and the ring for ``reader`` in ``writer``'s file."""
        index = reader - (reader > writer)  # the readers, other than the writer, in rank order
        return _LINE + 2 * _LINE * index, _LINE + 2 * _LINE * (self.world_size - 1) + self.ring_bytes * index

    def _connect(self, directory: str) -> None:
        prefix = [os.path.join(directory, f"ddpm-perf-{uuid.uuid4().hex}")] if self.rank == 0 else [None]
        dist.broadcast_object_list(prefix, src=0)
        path, created, error = f"{prefix[0]}-{self.rank}", False, None
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
                try:
                    os.posix_fallocate(fd, 0, self._file_bytes())  # fails now, not with SIGBUS mid-run, if full
                    mine = mmap.mmap(fd, self._file_bytes())
                finally:
                    os.close(fd)
                np.frombuffer(mine, np.int64, 1, 0)[0] = os.getpid()
            except OSError as e:
                error = f"cannot create {path} ({e.strerror})"
            error = _first_error(error)  # a barrier: every rank has its file, or all give up
            if error is None:
                try:
                    for peer in self.peers:
                        fd = os.open(f"{prefix[0]}-{peer}", os.O_RDWR)
                        try:
                            theirs = mmap.mmap(fd, self._file_bytes())
                        finally:
                            os.close(fd)
                        self.pids[peer] = int(np.frombuffer(theirs, np.int64, 1, 0)[0])
                        self.incoming[peer] = _Ring(theirs, *self._slot(peer, self.rank), self.ring_bytes)
                        self.outgoing[peer] = _Ring(mine, *self._slot(self.rank, peer), self.ring_bytes)
                except OSError as e:
                    error = f"cannot map rank {peer}'s ring ({e.strerror}); are the ranks on one machine?"
                error = _first_error(error)  # a barrier: every rank has mapped every file
        finally:
            if created:
                os.unlink(path)  # the mappings stay; nothing is left on disk
        if error:
            raise OSError(error)

    # -- the wire's calls -----------------------------------------------------------------------

    def all_gather(self, out: list[Tensor], tensor: Tensor, group=None):
        if self._too_big(tensor):
            return self.process_group.all_gather(out, tensor, group)
        out[self.rank] = tensor  # not a copy: the exchange only reads it
        posted = [self._post(out[peer], peer) for peer in self.peers]
        for peer in self.peers:
            self._send(tensor, peer)
        return _Pending(self, posted)

    def isend(self, tensor: Tensor, peer: int, group=None, tag: int = 0):
        if self._too_big(tensor):
            return self.process_group.isend(tensor, peer, group, tag)
        self._send(tensor, peer)
        return _Done()

    def irecv(self, buffer: Tensor, peer: int, group=None, tag: int = 0):
        if self._too_big(buffer):
            return self.process_group.irecv(buffer, peer, group, tag)
        return _Pending(self, [self._post(buffer, peer)])

    # -- inside ---------------------------------------------------------------------------------

    def _too_big(self, tensor: Tensor) -> bool:
        return _FRAME + tensor.numel() * tensor.element_size() > self.ring_bytes // 2

    def _post(self, buffer: Tensor, peer: int) -> _Posted:
        assert buffer.is_contiguous()
        posted = _Posted(buffer)
        self.posted[peer].append(posted)
        self.progress()
        return posted

    def _send(self, tensor: Tensor, peer: int) -> None:
        ring = self.outgoing[peer]
        payload = tensor.contiguous().reshape(-1).view(torch.uint8)
        start, end = ring.place(payload.numel())
        self.wait_until(lambda: end - int(ring.read[0]) <= ring.size, f"room in the ring to rank {peer}")
        at = start % ring.size
        ring.frame[at // 8: at // 8 + 2] = (ring.sequence, payload.numel())
        ring.data[at + _FRAME: at + _FRAME + payload.numel()].copy_(payload)
        ring.written[0] = end  # after the data: the reader may take it from here on
        ring.position, ring.sequence = end, ring.sequence + 1

    def progress(self) -> None:
        """Land every posted receive whose message has arrived, in order."""
        for peer, queue in self.posted.items():
            ring = self.incoming[peer]
            while queue:
                buffer = queue[0].buffer
                nbytes = buffer.numel() * buffer.element_size()
                start, end = ring.place(nbytes)
                if int(ring.written[0]) < end:
                    break
                at = start % ring.size
                sequence, sent = (int(v) for v in ring.frame[at // 8: at // 8 + 2])
                if (sequence, sent) != (ring.sequence, nbytes):
                    raise RuntimeError(f"patch_parallel: message {ring.sequence} from rank {peer} has {sent} bytes "
                                       f"(number {sequence}), {nbytes} expected: the ranks' layers differ")
                buffer.reshape(-1).view(torch.uint8).copy_(ring.data[at + _FRAME: at + _FRAME + nbytes])
                ring.read[0] = end  # after the copy: the writer may reuse the space
                ring.position, ring.sequence = end, ring.sequence + 1
                queue.popleft().done = True

    def wait_until(self, ready, what: str) -> None:
        """Spin briefly, then sleep in short naps (ranks may share cores); landing what arrives
        meanwhile. A peer process that has gone, or the timeout, ends the wait with PeerLost."""
        if ready():
            return
        started = checked = time.monotonic()
        spins = 0
        while True:
            self.progress()
            if ready():
                return
            spins += 1
            if spins > 100:
                time.sleep(20e-6)
            now = time.monotonic()
            if now - checked > 0.5:
                checked = now
                for peer, pid in self.pids.items():
                    if not _alive(pid):
                        raise PeerLost(f"rank {peer} (pid {pid}) exited while rank {self.rank} waited for {what}")
                if now - started > self.timeout:
                    raise PeerLost(f"rank {self.rank} waited {self.timeout:.0f} s for {what} over shared memory; "
                                   "timed out")


def _first_error(local: str | None) -> str | None:
    """Every rank's error or None, shared (a barrier): the first one, so that all ranks decide alike."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has exited
    except OSError:
        return False


def one_machine() -> str | None:
    """None if every rank runs on this machine's kernel and CPU kind the wire needs, else why not.
    A collective: every rank must call it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = None
    mine = (socket.gethostname(), boot, platform.machine())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(m[1] is None for m in everyone):
        return "no /proc/sys/kernel/random/boot_id to tell the machines apart"
    if len({m[:2] for m in everyone}) > 1:
        return "the ranks run on more than one machine"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"its ordering argument holds on x86-64 only, not {platform.machine()}"
    return None


Wire = ProcessGroupWire | SharedMemoryWire


def open_wire(transport: str, rank: int, world_size: int, device: torch.device, ring_bytes: int,
              timeout: datetime.timedelta, directory: str = "/dev/shm") -> tuple[Wire, str | None]:
    """The wire ``transport`` asks for, and why shared memory was not taken when ``auto`` chose.
    A collective: every rank must call it."""
    if transport == "process_group":
        return ProcessGroupWire(), None
    why_not = "the tensors live on the GPU" if device.type != "cpu" else one_machine()
    if why_not is None:
        try:
            return SharedMemoryWire(rank, world_size, ring_bytes, timeout, directory), None
        except OSError as e:
            why_not = str(e)
    if transport == "shared_memory":
        raise UserError(f"plugin patch_parallel: transport=shared_memory impossible here: {why_not}; "
                        "use transport=process_group")
    return ProcessGroupWire(), why_not
