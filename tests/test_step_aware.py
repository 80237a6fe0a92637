"""step_aware (DDSM): the slimmable U-Net against plain U-Nets of each width, the per-step widths
on every sampler, sandwich training, schedules (JSON and errors) and the search."""

import dataclasses
import json
import re

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ddpm_perf.cli import main
from ddpm_perf.diffusion.samplers import make_sampler
from ddpm_perf.diffusion.schedule import Diffusion, ScheduleConfig
from ddpm_perf.engine import SamplingEngine, StepNoise, initial_noise
from ddpm_perf.errors import UserError
from ddpm_perf.model.checkpoint import load_checkpoint, save_checkpoint
from ddpm_perf.model.unet import StepPlan, UNet, timestep_embedding
from ddpm_perf.plugins import PluginHost
from ddpm_perf.train import DataSpec, TrainConfig, Trainer

from ddpm_perf_plugins.step_aware import Schedule, Segment, StepAware, fingerprint, make_slimmable

from conftest import TINY, assert_user_error

WIDTHS = (1.0, 0.75, 0.5, 0.25)
SLIM_META = {"plugins": {"step_aware": {"widths": list(WIDTHS)}}}


@pytest.fixture
def slim_checkpoint(tmp_path, tiny_model):
    """The tiny model (random weights) marked as sandwich-trained for WIDTHS."""
    return save_checkpoint(tmp_path / "slim.safetensors", TINY, ScheduleConfig(), tiny_model.state_dict(),
                           train_meta=SLIM_META)


def engine(path, spec="", sampler="ddim", steps=6, batch=4):
    ckpt = load_checkpoint(path)
    return SamplingEngine(ckpt, make_sampler(sampler, Diffusion(ckpt.schedule_config), steps),
                          PluginHost.from_spec(spec), "cpu", batch_size=batch)


def input_segments(model: UNet) -> dict[str, tuple[int, int]]:
    """(h, skip) channels of each up unit's input, read from a forward of the plain model: the
    channels each push unit stored, popped in LIFO order."""
    pushed, segments, handles = [], {}, []
    handles.append(model.conv_in.register_forward_hook(lambda m, a, out: pushed.append(out.shape[1])))
    for unit in model.units:
        block = model.blocks[unit.name]
        if unit.pop:
            def pre(m, args, name=unit.name):
                skip = pushed.pop()
                segments[name] = (args[0].shape[1] - skip, skip)
            handles.append(block.register_forward_pre_hook(pre))
        if unit.push:
            handles.append(block.register_forward_hook(lambda m, a, out: pushed.append(out.shape[1])))
    with torch.no_grad():
        model(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long))
    for h in handles:
        h.remove()
    return segments


def plain_unet_of_width(full: UNet, width: float) -> UNet:
    """A plain U-Net of ch·w channels and G·w groups whose weights are the full model's slices:
    the first channels of every layer, each segment of an up ResBlock's [h | skip] input sliced on
    its own. Its time MLP takes the full sinusoidal embedding (the slim model never slices it)."""
    c = full.config
    ref = UNet(dataclasses.replace(c, ch=round(c.ch * width), num_groups=round(c.num_groups * width))).eval()
    ref.time_embed[0] = nn.Linear(c.ch, ref.time_embed[0].out_features)
    ref.embed_time = lambda t, batch: ref.time_embed(timestep_embedding(t.expand(batch) if t.ndim == 0 else t,
                                                                        c.ch))
    segments = input_segments(full)
    full_state = full.state_dict()
    state = {}
    for name, value in ref.state_dict().items():
        src = full_state[name]
        unit = name.split(".")[1] if name.startswith("blocks.") else None
        layer = name.split(".")[2] if unit else None
        if unit in segments and layer in ("norm1", "conv1", "shortcut") and not (layer != "norm1" and
                                                                                  name.endswith("bias")):
            dim = 0 if layer == "norm1" else 1
            h, skip = segments[unit]
            if dim == 1:
                src = src[:value.shape[0]]
            parts = [src.narrow(dim, 0, round(h * width)), src.narrow(dim, h, round(skip * width))]
            state[name] = torch.cat(parts, dim)
        else:
            state[name] = src[tuple(slice(0, n) for n in value.shape)]
        assert state[name].shape == value.shape, name
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("width", WIDTHS)
def test_each_width_equals_a_plain_unet_of_that_width(width):
    # ch 16: the plain U-Net of width 0.25 needs ch >= 4; 4 groups: the up units' [h | skip] inputs
    # of 48 = 32 + 16 channels have segment boundaries inside a group (the hard case)
    model = UNet(dataclasses.replace(TINY, ch=16)).eval()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([3, 500, 999])
    ref = plain_unet_of_width(model, width)
    make_slimmable(model, WIDTHS)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, StepPlan(width=width)), ref(x, t), rtol=1e-5, atol=1e-5)


def test_width_one_is_the_unmodified_model_exactly(tiny_model, slim_checkpoint):
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([3, 500, 999])
    with torch.no_grad():
        before = tiny_model(x, t, StepPlan())
        make_slimmable(tiny_model, WIDTHS)
        assert torch.equal(tiny_model(x, t, StepPlan()), before)
        assert not torch.allclose(tiny_model(x, t, StepPlan(width=0.5)), before)
    assert torch.equal(engine(slim_checkpoint, "step_aware(width=1)").sample(4, seed=1),
                       engine(slim_checkpoint).sample(4, seed=1))


def write_schedule(path, checkpoint, segments, widths=WIDTHS, T=1000):
    model, _ = load_checkpoint(checkpoint).build()
    Schedule([Segment(*s) for s in segments], widths, fingerprint(model), T).save(path)
    return path


SEGMENTS = [(0, 300, 1.0), (300, 600, 0.75), (600, 800, 0.5), (800, 1000, 0.25)]


def expected_width(t):
    return 1.0 if t < 300 else 0.75 if t < 600 else 0.5 if t < 800 else 0.25


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_per_step_widths_on_every_sampler(slim_checkpoint, tmp_path, sampler):
    write_schedule(str(slim_checkpoint) + ".step_aware.json", slim_checkpoint, SEGMENTS)
    steps = 10
    eng = engine(slim_checkpoint, "step_aware", sampler, steps)
    plugin, seen = eng.plugins.plugins[0], []
    eng.model.register_forward_pre_hook(lambda m, args: seen.append(plugin.state.width))  # after the plugin's
    out = eng.sample(4, seed=3)
    timesteps = eng.sampler.timesteps
    assert seen == [expected_width(t) for t in timesteps]
    assert len(set(seen)) >= 3  # the schedule really switches widths on this sampler
    report = next(line for line in eng.ctx.report if line.startswith("step_aware:"))
    assert "fewer FLOPs" in report

    # the same trajectory by hand: a slimmed model called with each step's width
    model, diffusion = load_checkpoint(slim_checkpoint).build()
    make_slimmable(model, WIDTHS)
    ref = make_sampler(sampler, diffusion, steps)
    x, noise = initial_noise(4, (1, 16, 16), 3), StepNoise(3, range(4), (1, 16, 16))
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            eps = model(x, torch.full((4,), t), StepPlan(width=expected_width(t)))
            x = ref.step(i, eps, x, noise.draw(x.device, x.dtype) if ref.needs_noise(i) else None)
    torch.testing.assert_close(out, x.clamp(-1, 1))


def test_flops_saved_are_reported_and_match_the_widths(slim_checkpoint):
    eng = engine(slim_checkpoint, "step_aware(width=0.5)")
    plugin = eng.plugins.plugins[0]
    assert plugin.flops[1.0] > plugin.flops[0.75] > plugin.flops[0.5] > plugin.flops[0.25] > 0
    # conv/linear FLOPs scale about as w^2 (the image input and noise output keep their channels)
    assert 0.2 < plugin.flops[0.5] / plugin.flops[1.0] < 0.35
    saved = 1 - plugin.flops[0.5] / plugin.flops[1.0]
    assert f"{saved:.0%} fewer FLOPs" in next(line for line in eng.ctx.report if line.startswith("step_aware:"))


def test_sandwich_training_runs_the_widths_and_changes_weights(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, warmup=1, checkpoint_every=2)
    trainer = Trainer(TINY, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / "r",
                      PluginHost.from_spec("step_aware"))
    plugin, seen = trainer.plugins.plugins[0], []
    trainer.net.register_forward_pre_hook(lambda m, args: seen.append(plugin.state.width))
    before = {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}
    trainer.run(progress=False)
    assert len(seen) == 6  # per step: the largest, the smallest and one random middle width
    for step in (seen[:3], seen[3:]):
        assert step[:2] == [1.0, 0.25] and step[2] in (0.75, 0.5)
    after = trainer.net.state_dict()
    assert not torch.equal(after["conv_out.weight"], before["conv_out.weight"])
    # the channels only the full width uses also moved: the full width trained too
    assert not torch.equal(after["blocks.mid_res0.conv1.weight"][-1], before["blocks.mid_res0.conv1.weight"][-1])
    ckpt = load_checkpoint(trainer.checkpoint_path)
    assert ckpt.train_meta["plugins"] == {"step_aware": {"widths": list(WIDTHS)}}
    assert "blocks.mid_attn.q.weight" in ckpt.weights  # plain U-Net keys
    # the trained checkpoint samples with step_aware
    assert engine(trainer.checkpoint_path, "step_aware(width=0.25)").sample(2).shape == (2, 1, 16, 16)


def test_sandwich_from_init_and_custom_widths(tmp_path, slim_checkpoint):
    cfg = TrainConfig(steps=1, batch_size=2, warmup=1, checkpoint_every=1)
    trainer = Trainer(TINY, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / "r",
                      PluginHost.from_spec("step_aware(widths=1:0.5,middle=0)"), init=load_checkpoint(slim_checkpoint))
    seen = []
    trainer.net.register_forward_pre_hook(lambda m, args: seen.append(trainer.plugins.plugins[0].state.width))
    trainer.run(progress=False)
    assert seen == [1.0, 0.5]
    assert load_checkpoint(trainer.checkpoint_path).train_meta["plugins"]["step_aware"]["widths"] == [1.0, 0.5]


def test_sandwich_distils_every_width_from_the_full_network(tmp_path, slim_checkpoint):
    """--distill with step_aware: each width of the sandwich learns the frozen --init network's
    prediction (in-place distillation; the teacher is a plain U-Net the plugin never slims)."""
    cfg = TrainConfig(steps=1, batch_size=2, warmup=1, checkpoint_every=1, distill=1.0)
    trainer = Trainer(TINY, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / "r",
                      PluginHost.from_spec("step_aware(widths=1:0.5,middle=0)"), init=load_checkpoint(slim_checkpoint))
    state = trainer.plugins.plugins[0].state
    calls = []
    trainer.teacher.register_forward_hook(lambda m, args, out: calls.append("teacher"))
    trainer.net.register_forward_hook(lambda m, args, out: calls.append(state.width))
    batch = trainer._batch()
    with state.force(1.0):
        assert trainer._loss(*batch).item() < 1e-10  # width 1 is the teacher itself
    calls.clear()
    assert trainer.loss_fn(*batch).item() > 0  # width 0.5 is not
    assert calls == ["teacher", 1.0, "teacher", 0.5]
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in trainer.teacher.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))  # never slimmed


def test_schedule_json_round_trip(tmp_path):
    s = Schedule.from_genome([1.0, 0.5, 0.25], [900, 700, 500, 300, 100, 0], 1000, WIDTHS, "abc")
    assert [(x.t_start, x.t_stop, x.width) for x in s.segments] == [(0, 300, 1.0), (300, 700, 0.5),
                                                                    (700, 1000, 0.25)]
    s.search = {"sampler": "ddim", "steps": 6}
    loaded = Schedule.load(s.save(tmp_path / "s.json"))
    assert loaded == s
    assert [loaded.width_at(t) for t in (0, 299, 300, 699, 700, 999)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_bad_schedules_are_refused(slim_checkpoint, tmp_path):
    path = str(slim_checkpoint) + ".step_aware.json"
    with pytest.raises(UserError, match="does not exist"):
        engine(slim_checkpoint, "step_aware")
    Schedule([Segment(0, 1000, 0.5)], WIDTHS, "0" * 16, 1000).save(path)
    with pytest.raises(UserError, match="other weights"):
        engine(slim_checkpoint, "step_aware")
    write_schedule(path, slim_checkpoint, [(0, 500, 1.0), (500, 1000, 0.3)], widths=(1.0, 0.3))
    with pytest.raises(UserError, match=r"uses widths \[0.3\] but the model was trained for"):
        engine(slim_checkpoint, "step_aware")
    write_schedule(path, slim_checkpoint, [(0, 2000, 1.0)], T=2000)
    with pytest.raises(UserError, match="covers 2000 timesteps, the model has 1000"):
        engine(slim_checkpoint, "step_aware")
    write_schedule(path, slim_checkpoint, [(0, 400, 1.0), (500, 1000, 0.5)])
    with pytest.raises(UserError, match="do not cover timesteps"):
        engine(slim_checkpoint, "step_aware")
    with open(path, "w") as f:
        json.dump({"format": "something else"}, f)
    with pytest.raises(UserError, match="is not a step_aware schedule"):
        engine(slim_checkpoint, "step_aware")


def test_bad_models_and_widths_are_refused(tiny_checkpoint, slim_checkpoint):
    with pytest.raises(UserError, match="was not trained slimmable"):
        engine(tiny_checkpoint, "step_aware(width=0.5)")
    with pytest.raises(UserError, match="width=0.125 is not one the model was trained for"):
        engine(slim_checkpoint, "step_aware(width=0.125)")
    with pytest.raises(UserError, match="multiple of 1/4"):
        Trainer(TINY, ScheduleConfig(), DataSpec("digits"), TrainConfig(steps=1, batch_size=2), "r",
                PluginHost.from_spec("step_aware(widths=1:0.3)"))
    with pytest.raises(UserError, match="must be numbers"):
        PluginHost.from_spec("step_aware(widths=1:half)")
    with pytest.raises(UserError, match="must include 1"):
        StepAware(widths="0.5:0.25").configure(ctx=type("C", (), {"model_config": TINY, "mode": "train",
                                                                  "checkpoint_meta": {}})())
    with pytest.raises(UserError, match="cannot be combined"):
        PluginHost.from_spec("step_aware,deep_cache")


def test_cli_errors_are_one_line(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["sample", "--checkpoint", str(tiny_checkpoint), "--plugins", "step_aware",
                                  "--steps", "2", "-n", "1", "--out", str(tmp_path / "x.png")])
    assert_user_error(result, "was not trained slimmable", "--plugins step_aware --init")
    result = runner.invoke(main, ["search", "step-aware", "--checkpoint", str(tiny_checkpoint), "--steps", "2"])
    assert_user_error(result, "was not trained slimmable")


def test_search_finds_a_schedule_within_budget(slim_checkpoint, tmp_path):
    out = tmp_path / "found.json"
    result = CliRunner().invoke(main, ["search", "step-aware", "--checkpoint", str(slim_checkpoint), "--steps", "8",
                                       "--segments", "4", "--population", "4", "--generations", "1", "--images",
                                       "16", "--batch-size", "16", "--budget", "0.5", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    schedule = Schedule.load(out)
    assert schedule.search["flops_fraction"] <= 0.5
    assert schedule.search["timesteps"] == make_sampler("ddim", Diffusion(ScheduleConfig()), 8).timesteps
    assert f"wrote {out}" in result.output
    # the plugin takes it, and its report agrees with the search's FLOPs
    eng = engine(slim_checkpoint, f"step_aware(schedule={out})", steps=8)
    plugin = eng.plugins.plugins[0]
    widths = [plugin.schedule.width_at(t) for t in eng.sampler.timesteps]
    assert plugin.flops_fraction(widths) == pytest.approx(schedule.search["flops_fraction"])
    assert plugin.flops_fraction(widths) <= 0.5


def test_stacks_with_early_exit_and_channels_last(slim_checkpoint):
    write_schedule(str(slim_checkpoint) + ".step_aware.json", slim_checkpoint, SEGMENTS)
    eng = engine(slim_checkpoint, "step_aware,early_exit(levels=1,max_skip=1.0,order=deep),channels_last")
    out = eng.sample(4, seed=5)
    skips = next(p for p in eng.plugins.plugins if p.name == "early_exit").skips
    model, diffusion = load_checkpoint(slim_checkpoint).build()
    make_slimmable(model, WIDTHS)
    ref = make_sampler("ddim", diffusion, 6)
    x = initial_noise(4, (1, 16, 16), 5)
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            eps = model(x, torch.full((4,), t), StepPlan(width=expected_width(t), skip=skips[t * 5 // 1000]))
            x = ref.step(i, eps, x)
    torch.testing.assert_close(out, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_cli_fine_tunes_the_embedded_model_and_samples_it(tmp_path):
    from ddpm_perf.model.checkpoint import default_checkpoint

    runner, run = CliRunner(), tmp_path / "run"
    result = runner.invoke(main, ["train", "--config", "digits", "--init", str(default_checkpoint()), "--plugins",
                                  "step_aware(widths=1:0.5)", "--steps", "1", "--batch-size", "2", "--warmup", "1",
                                  "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)
    ckpt = run / "checkpoint.safetensors"
    assert load_checkpoint(ckpt).train_meta["plugins"]["step_aware"]["widths"] == [1.0, 0.5]
    result = runner.invoke(main, ["sample", "--checkpoint", str(ckpt), "--plugins", "step_aware(width=0.5)",
                                  "--steps", "2", "-n", "2", "--out", str(tmp_path / "x.png"), "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = re.search(r"step_aware: widths 0.5x2 over 2 steps; (\d+)% fewer FLOPs", result.output)
    assert saved and 65 <= int(saved.group(1)) <= 80, result.output  # about 1 - 0.5^2
    result = runner.invoke(main, ["sample", "--checkpoint", str(ckpt), "--plugins", "step_aware(width=0.25)",
                                  "--steps", "2", "-n", "2", "--out", str(tmp_path / "x.png")])
    assert_user_error(result, "width=0.25 is not one the model was trained for")
    result = runner.invoke(main, ["train", "--config", "digits", "--plugins", "early_exit,step_aware",
                                  "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "r2")])
    assert_user_error(result, "list step_aware before")


def test_without_a_checkpoint_it_samples_the_shipped_slimmable_model(tmp_path, monkeypatch):
    from ddpm_perf.model.checkpoint import default_checkpoint

    import ddpm_perf_plugins.step_aware as step_aware

    embedded = load_checkpoint(default_checkpoint())
    path = save_checkpoint(tmp_path / "digits_slim.safetensors", embedded.model_config, embedded.schedule_config,
                           embedded.weights, train_meta=SLIM_META)
    write_schedule(str(path) + ".step_aware.json", path, [(0, 500, 1.0), (500, 1000, 0.5)])
    monkeypatch.setattr(step_aware.StepAware, "shipped_model_path", classmethod(lambda cls: path))
    assert PluginHost.from_spec("step_aware").default_checkpoint() == path
    result = CliRunner().invoke(main, ["sample", "--plugins", "step_aware", "-n", "2", "--steps", "2",
                                       "--no-progress", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert "model: digits_slim.safetensors, the plugins' own" in result.stdout
    # the embedded model itself is not slimmable
    with pytest.raises(UserError, match="was not trained slimmable"):
        engine(default_checkpoint(), "step_aware", steps=2, batch=2)
    monkeypatch.setattr(step_aware.StepAware, "shipped_model_path",
                        classmethod(lambda cls: tmp_path / "absent.safetensors"))
    assert PluginHost.from_spec("step_aware").default_checkpoint() is None


def test_stacks_with_fused_norm_listed_first(slim_checkpoint):
    write_schedule(str(slim_checkpoint) + ".step_aware.json", slim_checkpoint, SEGMENTS)
    fused = engine(slim_checkpoint, "fused_norm,step_aware")
    assert type(fused.model.norm_out).__name__ == "SlimFusedNormAct"
    torch.testing.assert_close(fused.sample(4, seed=2), engine(slim_checkpoint, "step_aware").sample(4, seed=2),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="list fused_norm before step_aware"):
        engine(slim_checkpoint, "step_aware,fused_norm")


def test_search_with_a_penalty_and_an_impossible_budget(slim_checkpoint, tmp_path):
    runner, out = CliRunner(), tmp_path / "p.json"
    common = ["search", "step-aware", "--checkpoint", str(slim_checkpoint), "--steps", "4", "--segments", "2",
              "--population", "4", "--generations", "0", "--images", "16", "--batch-size", "16"]
    result = runner.invoke(main, common + ["--budget", "0", "--penalty", "1000", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    # a FLOPs penalty this large outweighs any FD difference: of the first population (the four
    # uniform schedules), the narrowest wins
    assert {s.width for s in Schedule.load(out).segments} == {0.25}
    assert_user_error(runner.invoke(main, common + ["--budget", "0.01"]), "no schedule fits 1% of the FLOPs")
    assert_user_error(runner.invoke(main, common + ["--budget", "0"]), "give a FLOPs --budget, a --penalty")
