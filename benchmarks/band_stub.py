"""A rank's share of a patch_parallel step without the wire (docs/performance.md, "Where a rank's
step goes, without the wire" and "Two ranks slow each other down"). A plain script, not a
benchmark test:

    python benchmarks/band_stub.py [--checkpoint CKPT] [--batch 1] [--prepack]
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/band_stub.py --prepack

Each band model gets a stub exchange: every layer gets its own band's data back at once, so
nothing waits and nothing is copied between processes. In one process it times, interleaved,
the whole image, the plain U-Net on a band of the image's rows, and the band models of ranks 0
and 1 (the band layers' own cost). Under torchrun each rank times only its own band model, all
ranks starting every forward together (a barrier), as the real ranks run in step: against the
one-process figure, that is what running side by side costs, with no exchange at all.
One thread per process; OMP_WAIT_POLICY is set to PASSIVE unless already set.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ddpm_perf import memory  # noqa: E402
from ddpm_perf.model.checkpoint import load_checkpoint  # noqa: E402
from ddpm_perf.model.config import CONFIGS  # noqa: E402
from ddpm_perf.model.unet import UNet  # noqa: E402
from ddpm_perf_plugins.patch_parallel import split_into_bands  # noqa: E402
from ddpm_perf_plugins.patch_parallel.exchange import Delivery, Message  # noqa: E402
from ddpm_perf_plugins.patch_parallel.layers import Bands  # noqa: E402
from ddpm_perf_plugins.prepack import Prepack  # noqa: E402


class StubExchange:
    """What Exchange gives a band layer, with this rank's own data standing in for the others'."""

    sent: dict[str, int] = {}

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.up = rank - 1 if rank > 0 else None
        self.down = rank + 1 if rank < world_size - 1 else None

    def send(self, message: Message, wait: bool) -> Delivery:
        own = message.to_all
        return Delivery(from_all=None if own is None else [own] * self.world_size,
                        from_up=message.to_down if self.up is not None else None,
                        from_down=message.to_up if self.down is not None else None)

    def flush(self) -> None:
        pass

    def count(self, kind: str, nbytes: int) -> None:
        pass


def band_model(whole: UNet, rank: int, world_size: int) -> UNet:
    # a displaced step: every layer takes the stale path, as in the steady state
    return split_into_bands(copy.deepcopy(whole), Bands(StubExchange(rank, world_size), "displaced", 0, 0.3, step=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="default: the celeba64 config with random weights")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--bands", type=int, default=2, help="bands the image is split into (one process)")
    parser.add_argument("--prepack", action="store_true",
                        help="prepack every model (like for like with --plugins prepack)")
    args = parser.parse_args()
    memory.keep_freed_memory()  # as the CLI does
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, args.bands)

    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        config, weights = checkpoint.model_config, checkpoint.weights
    else:
        torch.manual_seed(0)
        config = CONFIGS["celeba64"]
        weights = UNet(config).state_dict()
    whole = UNet(config).eval()
    whole.load_state_dict(weights)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, config.in_channels, config.image_size, config.image_size, generator=gen)
    t = torch.full((args.batch,), 500)

    if distributed:
        models = {f"rank {rank} band": (band_model(whole, rank, world), x)}
    else:
        rows = config.image_size // world
        models = {"whole image": (whole, x),
                  f"plain U-Net on {rows} rows": (copy.deepcopy(whole), x[:, :, :rows].contiguous()),
                  **{f"rank {r} band": (band_model(whole, r, world), x) for r in (0, world - 1)}}
    if args.prepack:
        ctx = SimpleNamespace(device=torch.device("cpu"), report=[])
        for model, _ in models.values():
            Prepack().transform_model(model, ctx)

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model, inp in models.values():
            model(inp, t)  # packs weights, sizes buffers
        for _ in range(args.rounds):
            for name, (model, inp) in models.items():
                if distributed:
                    dist.barrier()
                start = time.perf_counter()
                model(inp, t)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    if distributed:
        print(f"{world} processes in step, {rank=}: {next(iter(medians))} {next(iter(medians.values())):.1f} ms "
              f"(median of {args.rounds})")
    else:
        base = medians["whole image"]
        print(", ".join(f"{name} {ms:.1f} ms ({base / ms:.2f}x)" for name, ms in medians.items()))


if __name__ == "__main__":
    main()
