"""early_exit: the schedule, sampling with it, and training with it, against the plain U-Net."""

import pytest
import torch

from click.testing import CliRunner

from ddpm_perf.cli import main
from ddpm_perf.diffusion.samplers import make_sampler
from ddpm_perf.diffusion.schedule import Diffusion, ScheduleConfig
from ddpm_perf.engine import SamplingEngine, initial_noise
from ddpm_perf.errors import UserError
from ddpm_perf.model.checkpoint import load_checkpoint
from ddpm_perf.model.unet import StepPlan
from ddpm_perf.plugins import PluginHost
from ddpm_perf.train import DataSpec, TrainConfig, Trainer

from conftest import TINY


def engine(path, spec, sampler="ddim", steps=6):
    ckpt = load_checkpoint(path)
    return SamplingEngine(ckpt, make_sampler(sampler, Diffusion(ckpt.schedule_config), steps),
                          PluginHost.from_spec(spec), "cpu", batch_size=4)


def test_schedule_skips_more_near_noise_and_nothing_near_zero(tiny_checkpoint):
    eng = engine(tiny_checkpoint, "early_exit(levels=1,max_skip=1.0,buckets=4,order=deep)")
    plugin = eng.plugins.plugins[0]
    sizes = [len(s) for s in plugin.skips]
    assert sizes[0] == 0 and sizes == sorted(sizes) and sizes[-1] > sizes[1]
    names = set(eng.model.blocks)
    for skip in plugin.skips:
        assert skip <= names and not any(n.endswith("sample") for n in skip)
        assert all(n.startswith(("mid", "down2", "up2")) for n in skip)  # the lowest level and the middle
    assert plugin.skips[-1] >= {"mid_attn", "mid_res0", "mid_res1"}
    assert any(line.startswith("early_exit:") for line in eng.ctx.report)


def test_shallow_order_skips_the_image_resolution_first(tiny_checkpoint):
    eng = engine(tiny_checkpoint, "early_exit(levels=1,max_skip=1.0,buckets=4,order=shallow)")
    skips = eng.plugins.plugins[0].skips
    assert [len(s) for s in skips] == sorted(len(s) for s in skips) and not skips[0]
    # the full-resolution level only: its up path's last unit first, never the middle or a sampler
    assert all(n.startswith(("down0_", "up0_")) and not n.endswith("sample") for n in skips[-1])
    assert skips[1] == {"up0_res2", "down0_res0"}  # round(5 units x 1/3)
    assert skips[-1] == {n for n in eng.model.blocks if n.startswith(("down0_", "up0_")) and "sample" not in n}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp"])
def test_sampling_applies_the_schedule(tiny_checkpoint, sampler):
    eng = engine(tiny_checkpoint, "early_exit", sampler)
    out = eng.sample(4, seed=3)
    plugin = eng.plugins.plugins[0]
    model, diffusion = load_checkpoint(tiny_checkpoint).build()
    ref = make_sampler(sampler, diffusion, 6)
    x = initial_noise(4, (1, 16, 16), 3)
    from ddpm_perf.engine import StepNoise
    noise = StepNoise(3, range(4), (1, 16, 16))
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            eps = model(x, torch.full((4,), t), StepPlan(skip=plugin.skips[t * 5 // 1000]))
            x = ref.step(i, eps, x, noise.draw(x.device, x.dtype) if ref.needs_noise(i) else None)
    torch.testing.assert_close(out, x.clamp(-1, 1))


def test_training_runs_each_sample_with_its_own_skips(tmp_path):
    cfg = TrainConfig(steps=1, batch_size=6, warmup=1, checkpoint_every=1)
    trainer = Trainer(TINY, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / "r",
                      PluginHost.from_spec("early_exit(levels=1,max_skip=1.0,order=deep)"))
    wrapped, plugin = trainer.model, trainer.plugins.plugins[0]
    x, t = torch.randn(6, 1, 16, 16), torch.tensor([5, 990, 400, 999, 10, 650])
    out = wrapped(x, t)
    for i in range(6):
        alone = trainer.net(x[i:i + 1], t[i:i + 1], StepPlan(skip=plugin.skips[int(t[i]) * 5 // 1000]))
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # gradients flow through the grouped forward
    assert trainer.net.conv_in.weight.grad is not None
    trainer.run(progress=False)  # and the checkpoint keeps the plain U-Net's names
    ckpt = load_checkpoint(trainer.checkpoint_path)
    assert "blocks.mid_attn.q.weight" in ckpt.weights
    # ... and says what it was fine-tuned with, through convert too
    assert ckpt.trained_with == "early_exit(levels=1,max_skip=1.0,buckets=5,order=deep,tune=schedule)"
    result = CliRunner().invoke(main, ["convert", str(trainer.checkpoint_path), str(tmp_path / "c.safetensors"),
                                       "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    converted = tmp_path / "c.safetensors"
    assert load_checkpoint(converted).trained_with == ckpt.trained_with

    def sample(spec):
        return CliRunner().invoke(main, ["sample", "--checkpoint", str(converted), "-n", "2", "--steps", "2",
                                         "--no-progress", "--plugins", spec, "--out", str(tmp_path / "s.png")])

    assert "warning" not in sample("early_exit(levels=1,max_skip=1.0,order=deep)").stderr  # its schedule
    warned = sample("early_exit").stderr.strip().splitlines()
    assert warned == ["ddpm-perf: warning: plugin early_exit(levels=2,max_skip=0.7,buckets=5,order=shallow): the "
                      "weights were fine-tuned with early_exit(levels=1,max_skip=1.0,buckets=5,order=deep); skipping "
                      "units then changes what the network computes. Fine-tune first: ddpm-perf train --plugins "
                      "'early_exit(levels=2,max_skip=0.7,buckets=5,order=shallow)' --init CKPT ..."]


def test_random_tuning_skips_a_random_bucket_at_any_timestep(tmp_path):
    """tune=random (LayerDrop-like): each sample skips what a bucket drawn from torch's RNG skips;
    sampling with the same schedule does not warn, since tune changes the training only."""
    cfg = TrainConfig(steps=1, batch_size=8, warmup=1, checkpoint_every=1)
    trainer = Trainer(TINY, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / "r",
                      PluginHost.from_spec("early_exit(max_skip=1.0,tune=random)"))
    wrapped, plugin = trainer.model, trainer.plugins.plugins[0]
    x, t = torch.randn(8, 1, 16, 16), torch.full((8,), 999)  # one timestep, yet different skips
    torch.manual_seed(5)
    drawn = torch.randint(5, (8,))
    assert len(drawn.unique()) > 1
    torch.manual_seed(5)
    out = wrapped(x, t)
    for i in range(8):
        alone = trainer.net(x[i:i + 1], t[i:i + 1], StepPlan(skip=plugin.skips[int(drawn[i])]))
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    trainer.run(progress=False)
    result = CliRunner().invoke(main, ["sample", "--checkpoint", str(trainer.checkpoint_path), "-n", "2", "--steps",
                                       "2", "--no-progress", "--plugins", "early_exit(max_skip=1.0)", "--out",
                                       str(tmp_path / "s.png")])
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr


def test_weights_never_fine_tuned_get_a_warning(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["sample", "--checkpoint", str(tiny_checkpoint), "-n", "2", "--steps", "2",
                                       "--no-progress", "--plugins", "early_exit", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0
    assert ("ddpm-perf: warning: plugin early_exit(levels=2,max_skip=0.7,buckets=5,order=shallow): the "
            "checkpoint records no") in result.stderr
    assert (tmp_path / "s.png").exists()


def test_without_a_checkpoint_it_samples_the_shipped_fine_tuned_model(tmp_path, monkeypatch):
    """The defaults are the shipped model's schedule: no --checkpoint, no warning."""
    import ddpm_perf_plugins.early_exit as early_exit
    from ddpm_perf.model.checkpoint import default_checkpoint, save_checkpoint

    embedded = load_checkpoint(default_checkpoint())
    default_spec = PluginHost.from_spec("early_exit").spec
    path = save_checkpoint(tmp_path / "digits_early_exit.safetensors", embedded.model_config,
                           embedded.schedule_config, embedded.weights,
                           trained_with=default_spec.replace("tune=schedule", "tune=random"))
    monkeypatch.setattr(early_exit.EarlyExit, "shipped_model_path", classmethod(lambda cls: path))
    assert PluginHost.from_spec("early_exit").default_checkpoint() == path
    result = CliRunner().invoke(main, ["sample", "--plugins", "early_exit", "-n", "2", "--steps", "2",
                                       "--no-progress", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert "model: digits_early_exit.safetensors, the plugins' own" in result.stdout
    assert "warning" not in result.stderr
    monkeypatch.setattr(early_exit.EarlyExit, "shipped_model_path",
                        classmethod(lambda cls: tmp_path / "absent.safetensors"))
    assert PluginHost.from_spec("early_exit").default_checkpoint() is None


def test_bad_options(tiny_checkpoint):
    with pytest.raises(UserError, match="levels=9 exceeds"):
        engine(tiny_checkpoint, "early_exit(levels=9)")
    with pytest.raises(UserError, match="max_skip in"):
        engine(tiny_checkpoint, "early_exit(max_skip=2)")
    with pytest.raises(UserError, match="order"):
        engine(tiny_checkpoint, "early_exit(order=middle)")
