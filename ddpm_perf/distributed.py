"""torch.distributed set-up for runs launched with torchrun (gloo on CPU, NCCL on GPUs).

Launch as ``torchrun --nproc_per_node N -m ddpm_perf sample ...``; on several machines add
``--nnodes M --rdzv_id JOB --rdzv_backend c10d --rdzv_endpoint HOST:PORT`` (torchrun options).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import PeerFailure, UserError

# A rank that dies must not leave the others waiting forever on a collective.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("DDPM_PERF_DIST_TIMEOUT_MIN", "30")))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group if torchrun started us; returns this rank's info and device."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DEFAULT_TIMEOUT)
    return info, device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[DistInfo, torch.device]]:
    """``init`` on entry; on exit ``shutdown``, waiting for the other ranks only if the run completed."""
    info, device = init(device)
    try:
        yield info, device
    except BaseException as error:
        shutdown(completed=False)
        if info.enabled and is_peer_failure(error):
            reason = str(error).strip().splitlines()[0][:300]
            raise PeerFailure(f"rank {info.rank} of {info.world_size}: another rank died or stopped answering "
                              f"({reason}); that rank's output says why") from error
        raise
    shutdown()


class PeerLost(RuntimeError):
    """Another rank went away while this one waited on it outside torch.distributed (a plugin's own
    transport, such as shared memory between ranks on one machine)."""


def is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another rank went away (gloo: closed connection; any: timeout)."""
    if isinstance(error, (dist.DistError, PeerLost)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("connection closed by peer", "connection reset by peer", "timed out", "broken pipe"))


def shard(indices: list[int], info: DistInfo) -> list[int]:
    """This rank's share of the samples: every world_size-th one, so the shares differ by one at most."""
    return indices[info.rank::info.world_size]


def gather_to_main(local: torch.Tensor, indices: list[int], num: int, info: DistInfo) -> torch.Tensor | None:
    """Collect every rank's samples on rank 0, in sample order; other ranks get None."""
    if not info.enabled:
        return local
    parts: list | None = [None] * info.world_size if info.is_main else None
    dist.gather_object((indices, local.cpu()), parts, dst=0)
    if not info.is_main:
        return None
    out = torch.empty((num, *local.shape[1:]), dtype=local.dtype)
    for part_indices, part in parts:
        out[part_indices] = part
    return out


def check_same_everywhere(value: str, what: str, info: DistInfo) -> None:
    """Fail on every rank if ranks disagree on ``value`` (options, checkpoint fingerprint)."""
    if not info.enabled:
        return
    values: list = [None] * info.world_size
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise UserError(f"ranks disagree on {what}: {values}; launch every rank with the same arguments")


def shutdown(completed: bool = True) -> None:
    """Leave the process group. After a completed run, wait for every rank first (rank 0 may
    still be writing) so that no rank tears down its connections under another's feet; after a
    failure, leave at once (the others fail on their next collective)."""
    if dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()
