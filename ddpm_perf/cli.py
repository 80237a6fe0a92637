"""The ``ddpm-perf`` command line (also ``python -m ddpm_perf``)."""

from __future__ import annotations

import json
import platform
import sys
import warnings
from pathlib import Path

import click
import torch

from . import __version__, memory
from .errors import RunWarning, UserError

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpmpp": 20}


class DdpmPerfGroup(click.Group):
    """Every error a user can cause, click's usage errors included, becomes one line and exit 2;
    ``--debug`` shows the traceback instead."""

    def main(self, args=None, prog_name=None, **kwargs):
        args = sys.argv[1:] if args is None else list(args)
        debug = "--debug" in args
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                rv = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except UserError as e:
            if debug:
                raise
            self._fail(str(e), e.exit_code)
        except click.UsageError as e:
            if debug:
                raise
            hint = f"; see 'ddpm-perf {e.ctx.info_name} --help'" if e.ctx and e.ctx.parent else ""
            self._fail(e.format_message().replace("\n", " ").rstrip(".") + hint)
        except click.ClickException as e:
            self._fail(e.format_message())
        except (click.Abort, KeyboardInterrupt):
            if debug:
                raise
            self._fail("interrupted; nothing partial was written")
        sys.exit(rv if isinstance(rv, int) else 0)

    @staticmethod
    def _fail(message: str, exit_code: int = UserError.exit_code) -> None:
        click.echo(f"ddpm-perf: error: {message}", err=True)
        sys.exit(exit_code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our RunWarnings as one line; anything else (torch's own) as Python shows it."""
    if issubclass(category, RunWarning):
        click.echo(f"ddpm-perf: warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch has no CUDA device here "
                        f"(torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def positive(ctx, param, value):
    if value is not None and value <= 0:
        raise UserError(f"--{param.name.replace('_', '-')} must be positive, got {value}")
    return value


@click.group(cls=DdpmPerfGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ddpm-perf")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug: bool) -> None:
    """ddpm-perf: fast DDPM sampling and training with pluggable speedups."""
    memory.keep_freed_memory()  # before any model exists: every step's activations stay mapped


plugins_option = click.option(
    "--plugins", default="", metavar="SPEC",
    help="Plugins to apply, e.g. 'channels_last' or 'int8(calib_batches=8),compile(mode=max-autotune)'. "
         "See 'ddpm-perf plugins'.")
device_option = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="A ddpm-perf .safetensors checkpoint (default: the embedded digits model, or the model a "
                   "plugin brings: step_aware's slimmable one).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim", "dpmpp"]), default="ddim", show_default=True)
@click.option("--steps", type=int, default=None, callback=positive,
              help="Sampler steps (default: ddpm 1000, ddim 50, dpmpp 20).")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM noise scale (0: deterministic).")
@click.option("--spacing", type=click.Choice(["leading", "trailing", "linspace"]), default=None,
              help="Timestep spacing (default: ddim leading, dpmpp linspace).")
@click.option("--clip-sample/--no-clip-sample", default=None,
              help="Clip predicted x0 to [-1, 1] (ddpm, ddim; default: the checkpoint's setting).")
@click.option("--variance", type=click.Choice(["fixed_small", "fixed_large"]), default=None,
              help="DDPM posterior variance (default: the checkpoint's setting).")
# Under torchrun write -n or --num-images: torchrun's parser takes --num for its --numa-binding.
@click.option("-n", "--num", "--num-images", "num", type=int, default=64, show_default=True, callback=positive,
              help="Number of images.")
@click.option("--batch-size", type=int, default=64, show_default=True, callback=positive)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@plugins_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples.png"), show_default=True,
              help="FILE.png: a grid; FILE.npz: uint8 NHWC array 'images'; FILE.npy: float32 NCHW in [-1, 1]; "
                   "DIR: one PNG per image.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def sample(checkpoint, sampler, steps, eta, spacing, clip_sample, variance, num, batch_size, seed, device,
           plugins, out, progress):
    """Generate images with a diffusion model.

    Data-parallel over processes: torchrun --nproc_per_node N -m ddpm_perf sample --num-images 50000 ...
    splits the images over the ranks and rank 0 writes exactly the images one process would."""
    from . import distributed
    from .diffusion.samplers import make_sampler
    from .diffusion.schedule import Diffusion
    from .engine import SamplingEngine, peak_memory
    from .io import check_output_path, save_samples
    from .model.checkpoint import default_checkpoint, load_checkpoint
    from .plugins import PluginHost

    out = check_output_path(out)
    host = PluginHost.from_spec(plugins)
    with distributed.process_group(resolve_device(device)) as (info, device):
        brought = None if checkpoint else host.default_checkpoint()
        ckpt = load_checkpoint(checkpoint or brought or default_checkpoint())
        if info.enabled:  # a fingerprint of the options and the weights, compared across ranks
            distributed.check_same_everywhere(
                f"{sampler} {steps} {eta} {spacing} {clip_sample} {variance} {num} {seed} {plugins} "
                f"{ckpt.model_config.to_json()} {sum(float(w.double().sum()) for w in ckpt.weights.values()):.6e}",
                "sampling options or checkpoint", info)
        chosen = make_sampler(sampler, Diffusion(ckpt.schedule_config), steps or DEFAULT_STEPS[sampler], eta,
                              spacing, clip_sample, variance)
        engine = SamplingEngine(ckpt, chosen, host, device, batch_size)
        if brought:
            engine.ctx.report.insert(0, f"model: {brought.name}, the plugins' own (give --checkpoint for another)")
        if engine.ctx.data_parallel:
            indices = distributed.shard(list(range(num)), info)
            images = distributed.gather_to_main(engine.sample(num, seed=seed, progress=progress and info.is_main,
                                                              indices=indices), indices, num, info)
        else:  # every rank works on every image (patch parallelism): rank 0 has them all
            images = engine.sample(num, seed=seed, progress=progress and info.is_main)
    if not info.is_main:
        return
    save_samples(images, out)
    s = engine.stats
    for line in engine.ctx.report:
        click.echo(line)
    ranks = ""
    if info.enabled:
        ranks = (f" (rank 0 of {info.world_size}: {s.images} images)" if engine.ctx.data_parallel
                 else f" ({info.world_size} ranks, one band each)")
    median = f" (median {s.median_step_seconds * 1e3:.1f})" if s.median_step_seconds is not None else ""
    click.echo(f"wrote {num} images to {out}: {s.seconds:.1f} s, {s.seconds_per_step * 1e3:.1f} ms/step{median}{ranks}, "
               f"{num / s.seconds if s.seconds else 0.0:.1f} images/s, {peak_memory(device)}"
               + (f", plugins: {','.join(host.names)}" if host.names else ""))


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint to calibrate (.safetensors); default: the embedded digits model.")
@click.option("--batch-size", type=int, default=8, show_default=True, callback=positive,
              help="Batch size the plugins are built for.")
@device_option
@click.option("--plugins", default="int8(recalibrate=true)", show_default=True,
              help="Plugins to build and calibrate, e.g. 'int8(method=minmax)'.")
def calibrate(checkpoint, batch_size, device, plugins):
    """Run the plugins' calibration (int8's activation ranges) and save it, without sampling.

    ddpm-perf sample calibrates on first use as well; this does it ahead of time (e.g. when
    building an image) and shows where the result went."""
    from .diffusion.samplers import make_sampler
    from .diffusion.schedule import Diffusion
    from .engine import SamplingEngine
    from .model.checkpoint import default_checkpoint, load_checkpoint
    from .plugins import PluginHost

    host = PluginHost.from_spec(plugins)
    if not host.has("calibrate"):
        raise UserError(f"--plugins {plugins!r}: none of these plugins calibrates anything (int8 does)")
    ckpt = load_checkpoint(checkpoint or default_checkpoint())
    chosen = make_sampler("ddim", Diffusion(ckpt.schedule_config), DEFAULT_STEPS["ddim"])
    engine = SamplingEngine(ckpt, chosen, host, resolve_device(device), batch_size)
    for line in engine.ctx.report:
        click.echo(line)


@main.command()
@click.option("--config", "config_name", default="digits", show_default=True,
              help="Named model config: digits, cifar10, celeba64, celebahq256.")
@click.option("--data", "data_name", type=click.Choice(["digits", "cifar10", "folder"]), default="digits",
              show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of the data set (cifar10: the extracted cifar-10-batches-py; folder: images).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/digits"), show_default=True,
              help="Run folder: checkpoint.safetensors and samples/ go here.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue a run from its checkpoint (the other training options and the plugins come from it; "
                   "--steps may extend).")
@click.option("--init", type=click.Path(path_type=Path), default=None, help="Start from these weights.")
@click.option("--steps", type=int, default=None, callback=positive, help="Total optimizer steps [10000].")
@click.option("--batch-size", type=int, default=128, show_default=True, callback=positive)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--warmup", type=int, default=5000, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--ema-decay", type=float, default=0.9999, show_default=True)
@click.option("--dropout", type=float, default=None, help="Override the config's dropout.")
@click.option("--hflip/--no-hflip", default=False, show_default=True, help="Random horizontal flips.")
@click.option("--distill", type=float, default=0.0, show_default=True,
              help="Fine-tuning: weight of the --init network's own prediction in the target (self-distillation; "
                   "1 learns it alone, 0 the noise alone).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=int, default=1000, show_default=True, callback=positive)
@click.option("--sample-every", type=int, default=0, show_default=True, help="Write a sample grid every N steps.")
@device_option
@plugins_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def train(config_name, data_name, data_dir, out, resume, init, steps, batch_size, lr, warmup, grad_clip,
          ema_decay, dropout, hflip, distill, seed, checkpoint_every, sample_every, device, plugins, progress):
    """Train a DDPM (eps-prediction, linear schedule) from scratch, from --init, or --resume a run.

    Data-parallel: torchrun --nproc_per_node N -m ddpm_perf train ... (--batch-size is the global batch)."""
    from . import distributed
    from .plugins import PluginHost

    host = None if resume and not plugins else PluginHost.from_spec(plugins)  # resume: the run's own plugins
    with distributed.process_group(resolve_device(device)) as (info, device):
        trainer = _make_trainer(info, device, host, config_name, data_name, data_dir, out, resume, init, steps,
                                batch_size, lr, warmup, grad_clip, ema_decay, dropout, hflip, distill, seed,
                                checkpoint_every, sample_every)
        losses = trainer.run(progress=progress)
    if not info.is_main:
        return
    tail = losses[-100:] or [float("nan")]
    procs = f", {info.world_size} processes" if info.enabled else ""
    click.echo(f"trained to step {trainer.step} ({trainer.steps_run} steps, {trainer.seconds:.0f} s, "
               f"{trainer.steps_run / max(trainer.seconds, 1e-9):.2f} steps/s{procs}); mean loss of the last "
               f"{len(tail)} steps {sum(tail) / len(tail):.4f}; checkpoint: {trainer.checkpoint_path}")


def _make_trainer(info, device, host, config_name, data_name, data_dir, out, resume, init, steps, batch_size, lr,
                  warmup, grad_clip, ema_decay, dropout, hflip, distill, seed, checkpoint_every, sample_every):
    import dataclasses

    from .diffusion.schedule import ScheduleConfig
    from .model.checkpoint import load_checkpoint
    from .model.config import get_config
    from .train import DataSpec, TrainConfig, Trainer

    if resume:
        return Trainer.resume(resume, host, device, steps, dist_info=info)
    config = get_config(config_name)
    if dropout is not None:
        config = dataclasses.replace(config, dropout=dropout)
    cfg = TrainConfig(steps=steps or 10_000, batch_size=batch_size, lr=lr, warmup=warmup, grad_clip=grad_clip,
                      ema_decay=ema_decay, hflip=hflip, distill=distill, seed=seed, checkpoint_every=checkpoint_every,
                      sample_every=sample_every)
    return Trainer(config, ScheduleConfig(), DataSpec(data_name, str(data_dir) if data_dir else None), cfg, out,
                   host, device, load_checkpoint(init) if init else None, dist_info=info)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Storage dtype of the weights (loaded back as float32).")
def convert(source, dest, dtype):
    """Write SOURCE as a sampling checkpoint DEST: a diffusers UNet2DModel or DDPM pipeline folder,
    or a ddpm-perf training checkpoint (its EMA weights, without optimizer state)."""
    from .model.checkpoint import load_checkpoint, save_checkpoint

    if dest.suffix != ".safetensors":
        raise UserError(f"{dest}: the destination must be a .safetensors file")
    if not dest.parent.is_dir():
        raise UserError(f"{dest}: folder {dest.parent} does not exist; create it first")
    if source.is_dir():
        from .model.diffusers_import import load_diffusers

        ckpt = load_diffusers(source)
    else:
        ckpt = load_checkpoint(source)
    # what the weights were trained with, and what plugins recorded about them (e.g. step_aware's
    # trained widths), stays with them
    plugins_meta = {"plugins": ckpt.train_meta["plugins"]} if "plugins" in ckpt.train_meta else None
    save_checkpoint(dest, ckpt.model_config, ckpt.schedule_config, ckpt.weights, train_meta=plugins_meta,
                    dtype=getattr(torch, dtype), trained_with=ckpt.trained_with)
    click.echo(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB, {dtype})")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("reference", type=click.Path(path_type=Path), required=False)
@click.option("--inception", type=click.Path(path_type=Path), default=None,
              help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: torch's hub cache).")
@click.option("--digits", is_flag=True,
              help="FD-digits: the digits classifier's features instead of Inception's; REFERENCE defaults "
                   "to the digits data set.")
@click.option("--save-stats", type=click.Path(path_type=Path), default=None, metavar="OUT.npz",
              help="Save SOURCE's statistics (mu, sigma) as pytorch-fid does; without REFERENCE, only that.")
@click.option("--batch-size", type=int, default=50, show_default=True, callback=positive)
@device_option
def fid(source, reference, inception, digits, save_stats, batch_size, device):
    """FID between SOURCE and REFERENCE, computed as pytorch-fid computes it.

    Each is an image folder, an .npz of uint8 NHWC images (key 'images', as 'sample --out x.npz'
    writes) or a statistics .npz (keys 'mu', 'sigma', as pytorch-fid's --save-stats writes)."""
    import warnings

    from .metrics.fid import DigitsSpace, InceptionSpace, check_input, input_stats
    from .metrics.frechet import frechet_distance, save_stats as write_stats

    if reference is None and save_stats is None and not digits:
        raise UserError("give REFERENCE to compare SOURCE with, or --save-stats OUT.npz to save SOURCE's statistics")
    if save_stats is not None:
        if save_stats.suffix.lower() != ".npz":
            raise UserError(f"--save-stats {save_stats}: name the statistics file OUT.npz")
        if not save_stats.parent.is_dir():
            raise UserError(f"--save-stats {save_stats}: folder {save_stats.parent} does not exist; create it first")
    for path in (source, reference):
        if path is not None:
            check_input(path)
    compare = reference is not None or digits  # --digits: REFERENCE defaults to the digits data set
    space = DigitsSpace() if digits else InceptionSpace(inception, resolve_device(device))
    stats = input_stats(source, space, batch_size)
    if save_stats is not None:
        write_stats(save_stats, stats.mu, stats.sigma)
        what = f"{stats.images} images" if stats.images is not None else f"statistics of {source}"
        # stdout keeps the one result line when there is a distance to print
        click.echo(f"wrote {save_stats} ({space.name} statistics, {stats.dim}-d, of {what})", err=compare)
        if not compare:
            return
    ref = input_stats(reference, space, batch_size) if reference is not None else space.reference()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            distance = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
        except ValueError as e:  # a significant imaginary component, as pytorch-fid raises it
            raise UserError(f"the Fréchet distance failed: {e}; the covariances are degenerate "
                            "(too few images?)") from None
    for w in caught:
        click.echo(f"ddpm-perf: note: {w.message}", err=True)
    click.echo(f"{space.label}: {distance:.3f}")


@main.group()
def search() -> None:
    """Search plugin schedules on the model and sampler you sample with."""


@search.command("step-aware")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="A slimmable checkpoint (trained with --plugins step_aware); default: the shipped "
                   "slimmable digits model.")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim", "dpmpp"]), default="ddim", show_default=True)
@click.option("--steps", type=int, default=None, callback=positive,
              help="Sampler steps (default: ddpm 1000, ddim 50, dpmpp 20).")
@click.option("--segments", type=int, default=10, show_default=True, callback=positive,
              help="Contiguous groups of steps, one width each (the genome).")
@click.option("--population", type=int, default=8, show_default=True, callback=positive,
              help="Schedules per generation (the first holds the uniform widths and full-near-data ramps).")
@click.option("--generations", type=int, default=4, show_default=True,
              help="Generations after the first (tournament, one-point crossover, mutation, 2 elites).")
@click.option("--images", type=int, default=256, show_default=True, callback=positive,
              help="Images per FD-digits evaluation (same seed for every schedule).")
@click.option("--budget", type=float, default=0.6, show_default=True,
              help="Most FLOPs a schedule may use, as a fraction of the full model's (0: no budget).")
@click.option("--penalty", type=float, default=0.0, show_default=True,
              help="Fitness = FD-digits + PENALTY x FLOPs fraction (with or instead of --budget).")
@click.option("--batch-size", type=int, default=128, show_default=True, callback=positive)
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seed of the search's images; the schedule is picked on them, so judge it on another "
                   "seed (sampling's default is 0).")
@device_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Schedule JSON (default: <checkpoint>.step_aware.json, where step_aware looks for it).")
def search_step_aware(checkpoint, sampler, steps, segments, population, generations, images, budget, penalty,
                      batch_size, seed, device, out):
    """Evolutionary search of step_aware's width per timestep segment: fitness FD-digits under a FLOPs
    budget (or with a FLOPs penalty), on this sampler and step count."""
    from .plugins import discover

    info = discover().get("step_aware")
    cls = info.load() if info else None
    if cls is None:
        raise UserError("the step_aware plugin is not installed here" + (f" ({info.error})" if info else ""))
    checkpoint = checkpoint or cls.default_search_checkpoint()
    if out is not None and not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it first")
    cls.search(checkpoint, sampler, steps or DEFAULT_STEPS[sampler], segments, population, generations, images,
               batch_size, budget or None, penalty, seed, out, resolve_device(device), log=click.echo)


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_plugins(as_json: bool) -> None:
    """List the plugins installed here: origin, phase, availability, options."""
    from .plugins import discover

    rows = []
    for info in discover().values():
        cls = info.load()
        row = {"name": info.name, "distribution": info.distribution, "version": info.version,
               "target": info.target}
        if cls is None:
            row.update(status=f"broken: {info.error}")
        else:
            reason = cls.available()
            row.update(phase=cls.phase.name.lower(), description=cls.description,
                       status="available" if reason is None else f"unavailable: {reason}",
                       conflicts=list(cls.conflicts),
                       options={k: o.describe() for k, o in cls.options.items()})
            if cls.ops:
                from . import ops

                here = ops.backends("cuda" if torch.cuda.is_available() else "cpu")
                row["ops"] = {op: here[op] for op in cls.ops}
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        head = f"{row['name']}  ({row['distribution']} {row['version']})"
        if "phase" in row:
            head += f"  phase={row['phase']}  {row['status']}"
            click.echo(head)
            click.echo(f"    {row['description']}")
            for name, text in row["options"].items():
                click.echo(f"    {name}: {text}")
            if row["conflicts"]:
                click.echo(f"    conflicts with: {', '.join(row['conflicts'])}")
            for op, backend in row.get("ops", {}).items():
                click.echo(f"    op {op}: {backend}")
        else:
            click.echo(f"{head}  {row['status']}")


@main.command()
def info() -> None:
    """Versions, devices, CPU features and the plugin backends of this installation."""
    from .model.checkpoint import default_checkpoint

    click.echo(f"ddpm-perf {__version__}")
    click.echo(f"python {platform.python_version()}  torch {torch.__version__}  "
               f"threads {torch.get_num_threads()}  platform {platform.platform()}")
    click.echo(f"cuda: {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}"
               f"  (torch built with CUDA {torch.version.cuda or 'no'})")
    click.echo(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}  "
               f"mkldnn: {torch.backends.mkldnn.is_available()}")
    flags = _cpu_flags()
    if flags is not None:
        # amx_bf16: oneDNN's bf16 convolutions (amp) run ~4.6x fp32 with it, ~2x without;
        # amx_int8: int8_conv2d's tile path (docs/performance.md, "Two kinds of machine")
        wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
                  "amx_int8"]
        click.echo("cpu features: " + " ".join(f"{f}{'+' if f in flags else '-'}" for f in wanted))
    from . import ops

    status = ops.extension_status()
    if status == "loaded":
        status += f" (cpu kernels: {torch.ops.ddpm_perf.cpu_isa()})"
    click.echo(f"extension ddpm_perf._C: {status}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for op, backend in ops.backends(device).items():
            click.echo(f"op {op} on {device}: {backend}")
    click.echo(f"heap: {memory.status()}")
    click.echo(f"embedded model: {default_checkpoint()}")


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


if __name__ == "__main__":
    main()
