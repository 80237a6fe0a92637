"""The trainer: AdamW with warm-up, gradient clipping, EMA, atomic checkpoints, exact resume.

Every random draw of a step (batch indices, flips, timesteps, noise) comes from one generator
whose state is checkpointed with the global torch RNG (dropout), the optimizer and the EMA,
so ``--resume`` gives the same losses as an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .data import load_dataset
from .distributed import DistInfo
from .diffusion.samplers import DDIMSampler
from .diffusion.schedule import Diffusion, ScheduleConfig
from .engine import SamplingEngine
from .errors import RunWarning, UserError
from .hooks import RunContext
from .io import save_images, to_uint8
from .model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .model.config import UNetConfig
from .model.unet import UNet
from .plugins import PluginHost

CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    weight_decay: float = 0.0
    hflip: bool = False  # random horizontal flips (CIFAR-10, faces); never for digits
    seed: int = 0
    checkpoint_every: int = 1000
    sample_every: int = 0  # 0: never
    distill: float = 0.0  # weight of the teacher's prediction in the target (0: the noise alone)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or self.grad_clip < 0 or not 0 <= self.ema_decay < 1:
            raise UserError("--lr must be > 0, --warmup and --grad-clip >= 0, --ema-decay in [0, 1)")
        if not 0 <= self.distill <= 1:
            raise UserError(f"--distill must be in [0, 1], got {self.distill}")


@dataclass(frozen=True)
class DataSpec:
    name: str
    path: str | None = None

    def load(self, config: UNetConfig) -> Dataset:
        return load_dataset(self.name, config.image_size, config.in_channels, self.path)


class Trainer:
    def __init__(self, model_config: UNetConfig, schedule_config: ScheduleConfig, data: DataSpec,
                 cfg: TrainConfig, out_dir: str | Path, plugins: PluginHost | None = None,
                 device: str | torch.device = "cpu", init: Checkpoint | None = None,
                 dist_info: DistInfo = DistInfo(), teacher_weights: dict[str, torch.Tensor] | None = None):
        self.out_dir = Path(out_dir)
        self.dist = dist_info
        if cfg.batch_size % dist_info.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the "
                            f"{dist_info.world_size} processes; pick a multiple of {dist_info.world_size}")
        if not self.out_dir.parent.is_dir():
            raise UserError(f"--out {out_dir}: folder {self.out_dir.parent} does not exist; create it first")
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        self.schedule_config = schedule_config
        self.diffusion = Diffusion(schedule_config)
        self.dataset = data.load(model_config)
        self.plugins = plugins or PluginHost()
        self.ctx = RunContext("train", self.device, model_config, self.diffusion, cfg.batch_size)
        self.plugins.hook.configure(ctx=self.ctx)

        torch.manual_seed(cfg.seed)  # initial weights (the same on every rank) and rank 0's dropout
        self.net = UNet(model_config)
        if init is not None:
            if init.model_config != model_config:
                raise UserError(f"--init {init.path}: its model config differs from the one being trained")
            self.net.load_state_dict(init.weights)
        self.net.to(self.device).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False) if dist_info.is_main else None
        if cfg.distill and teacher_weights is None:
            if init is None:
                raise UserError("--distill needs --init: the teacher is the network being fine-tuned, as it was")
            teacher_weights = init.weights
        self.teacher = self._teacher(teacher_weights) if cfg.distill else None
        if dist_info.rank:
            torch.manual_seed(cfg.seed + dist_info.rank)  # other ranks: their own dropout masks
        # fused: one multi-tensor kernel per step (CPU and CUDA); torch's CPU default is a per-parameter
        # loop of ~10 ops, 3.4x slower on the cifar10 U-Net (docs/performance.md, "Training step")
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0

        # Names fixed before any plugin wraps a unit: checkpoints keep the plain U-Net's keys.
        self._state = dict(self.net.state_dict(keep_vars=True))
        self.model = self.plugins.chain("transform_model", self.net, ctx=self.ctx)
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                                 else None)
        self.loss_fn = self.plugins.chain("wrap_train_step", self._loss, ctx=self.ctx)

    def _teacher(self, weights: dict[str, torch.Tensor]) -> UNet:
        """The --init weights, frozen, running the whole plain U-Net (no plugin touches it)."""
        teacher = UNet(self.net.config)
        teacher.load_state_dict(weights)
        return teacher.to(self.device).eval().requires_grad_(False)

    def _loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # with --distill, a network whose function a plugin changed (units skipped, widths cut)
        # learns the teacher's prediction, a far less noisy target than the noise itself
        return self.diffusion.loss(self.model, x0, t, noise, self.teacher, self.cfg.distill)

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save(self) -> Path | None:
        """Write the run's checkpoint (rank 0 only; the others hold the same weights)."""
        if not self.dist.is_main:
            return None
        self.out_dir.mkdir(exist_ok=True)
        optim = self.optimizer.state_dict()
        tensors = {f"model.{k}": v.detach() for k, v in self._state.items()}
        for index, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = value
        if self.teacher is not None:
            tensors.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        tensors["rng.data"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"step": self.step, "config": dataclasses.asdict(self.cfg),
                "data": dataclasses.asdict(self.data), "param_groups": optim["param_groups"]}
        if self.ctx.grad_scaler is not None:
            meta["grad_scaler"] = self.ctx.grad_scaler.state_dict()
        if self.ctx.checkpoint_meta:
            meta["plugins"] = self.ctx.checkpoint_meta
        return save_checkpoint(self.checkpoint_path, self.net.config, self.schedule_config,
                               self.ema.state_dict(), tensors, meta, trained_with=self.plugins.spec)

    @classmethod
    def resume(cls, path: str | Path, plugins: PluginHost | None = None, device: str | torch.device = "cpu",
               steps: int | None = None, dist_info: DistInfo = DistInfo()) -> "Trainer":
        """Continue a run; the world size may differ from the run's (the data stream is global).

        ``plugins=None`` continues with the plugins the run was trained with. Other plugins are
        allowed (a speed plugin may not exist on this machine), with a warning: plugins such as
        early_exit or step_aware change what is trained, not only how fast."""
        ckpt = load_checkpoint(path, with_training=True)
        meta = ckpt.train_meta
        if plugins is None:
            try:
                plugins = PluginHost.from_spec(ckpt.trained_with)
            except UserError as e:
                raise UserError(f"{e} (the run was trained with '{ckpt.trained_with}'; name the plugins to "
                                f"continue with in --plugins)") from e
        elif plugins.spec != ckpt.trained_with:
            warnings.warn(f"resuming {path} with plugins '{plugins.spec}'; the run was trained with "
                          f"'{ckpt.trained_with}'. Leave out --plugins to continue with the run's own",
                          RunWarning, stacklevel=2)
        cfg = TrainConfig(**{**meta["config"], **({"steps": steps} if steps else {})})
        tensors = ckpt.train_tensors
        teacher = {k.removeprefix("teacher."): v for k, v in tensors.items() if k.startswith("teacher.")}
        trainer = cls(ckpt.model_config, ckpt.schedule_config, DataSpec(**meta["data"]), cfg,
                      Path(path).parent, plugins, device, dist_info=dist_info, teacher_weights=teacher or None)
        with torch.no_grad():
            for key, value in trainer._state.items():
                value.copy_(tensors[f"model.{key}"])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(ckpt.weights)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if trainer.ctx.grad_scaler is not None and "grad_scaler" in meta:
            trainer.ctx.grad_scaler.load_state_dict(meta["grad_scaler"])
        trainer.generator.set_state(tensors["rng.data"])
        trainer.step = meta["step"]
        if dist_info.rank == 0:
            torch.set_rng_state(tensors["rng.torch"])
        else:  # only rank 0's dropout state is saved; the others restart theirs from the step
            torch.manual_seed(cfg.seed + dist_info.rank + 1_000_003 * trainer.step)
        if trainer.step >= cfg.steps:
            raise UserError(f"{path} is already at step {trainer.step} of {cfg.steps}; pass a larger --steps")
        return trainer

    # -- training ----------------------------------------------------------------------------

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch. Every rank draws the whole batch's random numbers
        (cheap) and loads only its own images: the data stream does not depend on the world size."""
        g, bs, (c, h, w) = self.generator, self.cfg.batch_size, self.ctx.image_shape
        idx = torch.randint(len(self.dataset), (bs,), generator=g)
        flip = torch.rand(bs, generator=g) < 0.5 if self.cfg.hflip else None
        t = torch.randint(self.diffusion.num_timesteps, (bs,), generator=g)
        noise = torch.randn((bs, c, h, w), generator=g)
        share = bs // self.dist.world_size
        mine = slice(self.dist.rank * share, (self.dist.rank + 1) * share)
        x0 = torch.stack([self.dataset[int(i)] for i in idx[mine]])
        if flip is not None:
            x0 = torch.where(flip[mine, None, None, None], x0.flip(3), x0)
        return x0.to(self.device), t[mine].to(self.device), noise[mine].to(self.device)

    def train_step(self) -> float:
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss_fn(*self._batch())
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.ctx.grad_scaler
        if scaler is None:
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            self.optimizer.step()
        else:  # fp16: scale the loss, unscale before clipping, skip steps with inf gradients
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            scaler.step(self.optimizer)
            scaler.update()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self._state.values()), 1 - cfg.ema_decay)
        self.step += 1
        if self.dist.enabled:  # report the global batch's loss (the mean of equal shards' means)
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= self.dist.world_size
        return loss.item()

    def sample_grid(self, num: int = 64) -> Path:
        sampler = DDIMSampler(self.diffusion, 50)
        engine = SamplingEngine(Checkpoint.from_model(self.ema, self.schedule_config), sampler,
                                device=self.device, batch_size=num)
        path = self.out_dir / "samples" / f"step{self.step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        return save_images(to_uint8(engine.sample(num, seed=0)), path)

    def run(self, progress: bool = True) -> list[float]:
        cfg, losses = self.cfg, []
        start, first = time.perf_counter(), self.step
        with tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not (progress and self.dist.is_main),
                  dynamic_ncols=True,
                  desc="train") as bar:
            while self.step < cfg.steps:
                losses.append(self.train_step())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.dist.is_main:
                    self.sample_grid()
        self.seconds = time.perf_counter() - start
        self.steps_run = self.step - first
        return losses
