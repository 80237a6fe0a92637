"""The sampling engine: builds the model, runs the plugins' hooks, drives a sampler.

Seed convention: the initial noise of all N samples is drawn up front as
``torch.randn((N, C, H, W), generator=torch.Generator().manual_seed(seed))`` (as diffusers'
pipelines draw it), and the per-step noise of sample i comes from its own generator seeded
from (seed, i). So a seed gives the same images whatever the batch size or the number of
processes the samples are split over.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from .diffusion.samplers import Sampler
from .errors import UserError
from .hooks import RunContext, StepState
from .model.checkpoint import Checkpoint
from .model.unet import StepPlan
from .plugins import PluginHost


def initial_noise(num: int, shape: Sequence[int], seed: int) -> Tensor:
    return torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed))


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s per-step noise: a fixed mix of (seed, index)."""
    return (seed * 6364136223846793005 + index * 1442695040888963407 + 1) % (1 << 63)


class StepNoise:
    """Per-step Gaussian noise for a batch, drawn per sample so it is independent of batching."""

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
        self.shape = tuple(shape)

    def draw(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(device=device, dtype=dtype)


@dataclass
class SamplingStats:
    images: int = 0
    steps: int = 0  # model evaluations (batches x sampler steps)
    seconds: float = 0.0
    # Each step's wall time, on the CPU only: a GPU step returns before its kernels finish.
    step_seconds: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)

    @property
    def median_step_seconds(self) -> float | None:
        """The typical step, without the first steps' one-off costs (kernel set-up, an exact
        warm-up step of patch parallelism) that the mean carries."""
        return statistics.median(self.step_seconds) if self.step_seconds else None


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB peak CUDA memory"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB peak RSS"


class SamplingEngine:
    """Model + plugins + sampler. Build once, call ``sample`` as often as needed."""

    def __init__(self, checkpoint: Checkpoint, sampler: Sampler, plugins: PluginHost | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64):
        if batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.plugins = plugins or PluginHost()
        self.sampler = sampler
        self.batch_size = batch_size
        self.ctx = RunContext("sample", self.device, checkpoint.model_config, sampler.diffusion, batch_size,
                              sampler=sampler, checkpoint=str(checkpoint.path) if checkpoint.path else None,
                              trained_with=checkpoint.trained_with)
        hook = self.plugins.hook
        hook.configure(ctx=self.ctx)
        model, _ = checkpoint.build(self.device)
        self.model = self.plugins.chain("transform_model", model, ctx=self.ctx)
        self.denoise = self._call_model
        hook.calibrate(engine=self, ctx=self.ctx)
        self.denoise = self.plugins.chain("wrap_denoiser", self._call_model, ctx=self.ctx)
        self._per_step_hooks = self.plugins.has("plan_step") or self.plugins.has("after_step")
        self.stats = SamplingStats()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.ctx.image_shape

    def _call_model(self, x: Tensor, t: Tensor, plan: StepPlan) -> Tensor:
        return self.model(x, t, plan)

    @torch.inference_mode()
    def sample(self, num: int, seed: int = 0, progress: bool = False,
               indices: Sequence[int] | None = None) -> Tensor:
        """Generate ``num`` images (N, C, H, W) in [-1, 1]. ``indices`` picks a subset of the
        ``num`` samples of this seed (data-parallel sampling): each gets the same image as in
        a run of all ``num``."""
        if num <= 0:
            raise UserError(f"--num must be positive, got {num}")
        indices = list(range(num)) if indices is None else list(indices)
        if not indices:  # a rank with no share of a small run
            return torch.empty((0, *self.image_shape))
        noise = initial_noise(num, self.image_shape, seed)[indices]
        steps = len(self.sampler.timesteps)
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        bar = tqdm(total=len(batches) * steps, unit="step", disable=not progress, dynamic_ncols=True,
                   desc=f"{self.sampler.name} x{steps}")
        out: list[Tensor] = []
        step_seconds: list[float] = []
        start = time.perf_counter()
        with bar:
            done = 0
            for batch_indices in batches:
                x = noise[done:done + len(batch_indices)].to(self.device)
                out.append(self._sample_batch(x, StepNoise(seed, batch_indices, self.image_shape), bar, step_seconds).cpu())
                done += len(batch_indices)
                bar.set_postfix(images=done)
        self.stats = SamplingStats(len(indices), len(batches) * steps, time.perf_counter() - start, step_seconds)
        return torch.cat(out).clamp(-1, 1)

    def _sample_batch(self, x: Tensor, step_noise: StepNoise, bar: tqdm, step_seconds: list[float]) -> Tensor:
        sampler, hook, ctx = self.sampler, self.plugins.hook, self.ctx
        # On a GPU a per-step check would make the host wait every step: keep the flags on the
        # device and look once per batch. On the CPU checking at once costs nothing extra.
        check_now = x.device.type == "cpu"
        finite: list[Tensor] = []
        sampler.reset()
        for i, t in enumerate(sampler.timesteps):
            step_start = time.perf_counter()
            plan = StepPlan()
            if self._per_step_hooks:
                hook.plan_step(step=i, t=t, plan=plan, ctx=ctx)
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = self.denoise(x, t_batch, plan).to(x.dtype)
            noise = step_noise.draw(x.device, x.dtype) if sampler.needs_noise(i) else None
            x = sampler.step(i, eps, x, noise)
            finite.append(torch.isfinite(x).all())
            if check_now and not finite[-1]:
                self._non_finite(finite)
            if self._per_step_hooks:
                hook.after_step(step=i, state=StepState(x, eps, t, plan), ctx=ctx)
            if check_now:
                step_seconds.append(time.perf_counter() - step_start)
            bar.update(1)
        if not check_now and not torch.stack(finite).all():
            self._non_finite(finite)
        return x

    def _non_finite(self, finite: list[Tensor]) -> None:
        i = next(i for i, ok in enumerate(finite) if not ok)
        timesteps = self.sampler.timesteps
        raise UserError(f"sampling produced NaN or Inf at step {i + 1}/{len(timesteps)} (t={timesteps[i]}); "
                        "the model or a plugin is numerically unstable: retry without plugins "
                        "or check the checkpoint")
