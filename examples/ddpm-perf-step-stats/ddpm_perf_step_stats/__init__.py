"""step_stats: per-step statistics of the sample and the predicted noise, as a ddpm-perf plugin.

After every N-th sampling step (and always the first and the last) the plugin records the mean
and standard deviation of the sample ``x`` and of the model's noise prediction ``eps``. When a
batch finishes it puts a one-line summary into ``ctx.report`` (the CLI prints it after
sampling) and, with ``file=...``, writes all recorded steps as CSV.

Typical use: check that a speedup plugin does not change the numerics, by comparing

    ddpm-perf sample --plugins 'step_stats(every=1,file=ref.csv)'
    ddpm-perf sample --plugins 'int8,step_stats(every=1,file=int8.csv)'

(``step_stats`` is a RUNTIME plugin, so it sees the steps after every other plugin's changes.)
"""

from __future__ import annotations

import csv
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ddpm_perf.errors import UserError
from ddpm_perf.hooks import RunContext, StepState, hookimpl
from ddpm_perf.io import atomic_path
from ddpm_perf.plugins import Option, Phase, Plugin

__all__ = ["StepStats"]


@dataclass(frozen=True)
class Row:
    """The statistics of one batch after one sampling step: one line of the CSV."""

    batch: int  # batches count up over the engine's lifetime (every ``sample`` call)
    step: int
    t: int
    samples: int  # batch size, the weight of this row when pooling over batches
    x_mean: float
    x_std: float
    eps_mean: float
    eps_std: float


def _pooled(rows: list[Row], step: int) -> tuple[float, float, float, float]:
    """x mean, x std, eps mean, eps std at ``step`` over all batches (population statistics)."""
    rows = [r for r in rows if r.step == step]
    total = sum(r.samples for r in rows)

    def pool(pairs: list[tuple[float, float]]) -> tuple[float, float]:
        mean = sum(r.samples * m for r, (m, _) in zip(rows, pairs)) / total
        second = sum(r.samples * (s * s + m * m) for r, (m, s) in zip(rows, pairs)) / total
        return mean, max(second - mean * mean, 0.0) ** 0.5

    x = pool([(r.x_mean, r.x_std) for r in rows])
    eps = pool([(r.eps_mean, r.eps_std) for r in rows])
    return (*x, *eps)


class StepStats(Plugin):
    """Record mean/std of x and eps per sampling step; summarise in the report, optionally as CSV."""

    name = "step_stats"  # must equal the entry-point name
    description = "Per-step mean/std of the sample x and the predicted noise eps: a report line, optionally a CSV."
    phase = Phase.RUNTIME  # observes only, so it runs last and sees what the other plugins did
    options = {
        "every": Option(int, 10, "record every N-th step (the first and last step always)"),
        "file": Option(str, "", "also write the recorded steps to this CSV file"),
    }

    def __init__(self, **values: Any):
        super().__init__(**values)
        # Option parsing checks types; ranges and paths are the plugin's to check. Do it here, so
        # a bad value fails when --plugins is read, before a model is loaded or a step is run.
        if self.opts.every <= 0:
            raise UserError(f"plugin {self.name}: option every={self.opts.every} must be a positive int")
        if self.opts.file:
            path = Path(self.opts.file)
            if path.is_dir() or not path.parent.is_dir():
                raise UserError(f"plugin {self.name}: option file={self.opts.file}: give a file in an "
                                "existing folder")
        self._reset()

    def _reset(self) -> None:
        self._rows: list[Row] = []
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # this batch: (step, t, 4 statistics)
        self._batches = 0
        self._report_index: int | None = None  # where our line is in ctx.report

    # -- hooks -------------------------------------------------------------------------------

    @hookimpl
    def configure(self, ctx: RunContext) -> None:
        """Once per engine: start afresh (one plugin instance may serve several engines)."""
        self._reset()

    @hookimpl
    def after_step(self, step: int, state: StepState, ctx: RunContext) -> None:
        assert ctx.sampler is not None, "after_step is only called while sampling"
        last = len(ctx.sampler.timesteps) - 1
        if step % self.opts.every == 0 or step == last:
            # Keep the statistics as a tensor: converting to float here (.item()) would make the
            # host wait for the device at every step. They are fetched once per batch instead.
            x_std, x_mean = torch.std_mean(state.x.detach().float(), correction=0)
            eps_std, eps_mean = torch.std_mean(state.eps.detach().float(), correction=0)
            self._pending.append((step, state.t, torch.stack([x_mean, x_std, eps_mean, eps_std])))
        if step == last:  # the engine has no "batch done" hook: the last step is the end
            self._finish_batch(state.x.shape[0], last + 1, ctx)

    # -- the end of a batch --------------------------------------------------------------------

    def _finish_batch(self, samples: int, steps: int, ctx: RunContext) -> None:
        values = torch.stack([v for _, _, v in self._pending]).tolist()  # one device sync
        for (step, t, _), stats in zip(self._pending, values):
            self._rows.append(Row(self._batches, step, t, samples, *stats))
        self._pending.clear()
        self._batches += 1
        # Nothing says whether this batch is the last one, so the summary covers the batches so
        # far and replaces our previous line: after the run it covers all of them, in one line.
        line = self._summary(steps)
        if self._report_index is None:
            self._report_index = len(ctx.report)
            ctx.report.append(line)
        else:
            ctx.report[self._report_index] = line
        if self.opts.file:
            self._write_csv(Path(self.opts.file))

    def _summary(self, steps: int) -> str:
        first, last = min(r.step for r in self._rows), max(r.step for r in self._rows)
        x0_mean, x0_std, e0_mean, e0_std = _pooled(self._rows, first)
        x1_mean, x1_std, e1_mean, e1_std = _pooled(self._rows, last)
        images = sum(r.samples for r in self._rows if r.step == last)
        line = (f"step_stats: {images} images, {self._batches} batch(es) x {steps} steps; "
                f"x mean/std {x0_mean:+.3f}/{x0_std:.3f} -> {x1_mean:+.3f}/{x1_std:.3f}, "
                f"eps mean/std {e0_mean:+.3f}/{e0_std:.3f} -> {e1_mean:+.3f}/{e1_std:.3f} "
                f"(after steps {first + 1} and {last + 1})")
        if self.opts.file:
            line += f"; per-step statistics in {self.opts.file}"
        return line

    def _write_csv(self, path: Path) -> None:
        # Written whole, through a temp file and a rename: readers never see half a CSV.
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([field.name for field in fields(Row)])
            for row in self._rows:
                writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in astuple(row)])
