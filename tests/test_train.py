import pytest
import torch

from ddpm_perf.diffusion.schedule import ScheduleConfig
from ddpm_perf.errors import UserError
from ddpm_perf.model.checkpoint import load_checkpoint
from ddpm_perf.train import DataSpec, TrainConfig, Trainer
from ddpm_perf.data import load_dataset

from conftest import TINY

# Dropout on, so the global RNG (restored on resume) matters.
CONFIG = TINY.__class__(**{**TINY.__dict__, "dropout": 0.1})


def make_trainer(out, steps, **kw):
    cfg = TrainConfig(steps=steps, batch_size=8, warmup=3, ema_decay=0.9, checkpoint_every=3, **kw)
    return Trainer(CONFIG, ScheduleConfig(), DataSpec("digits"), cfg, out)


def test_resume_continues_bit_exactly(tmp_path):
    straight = make_trainer(tmp_path / "a", 6).run(progress=False)

    first = make_trainer(tmp_path / "b", 3)
    head = first.run(progress=False)
    resumed = Trainer.resume(tmp_path / "b" / "checkpoint.safetensors", steps=6)
    tail = resumed.run(progress=False)
    assert head + tail == straight  # exact float equality, not approximate

    a = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors", with_training=True)
    b = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors", with_training=True)
    assert a.train_meta["step"] == b.train_meta["step"] == 6
    for key in a.weights:
        assert torch.equal(a.weights[key], b.weights[key]), key  # EMA weights
    for key in a.train_tensors:
        assert torch.equal(a.train_tensors[key], b.train_tensors[key]), key  # raw weights, optimizer, RNG


def test_ema_lags_the_raw_weights(tmp_path):
    trainer = make_trainer(tmp_path / "a", 3)
    trainer.run(progress=False)
    ckpt = load_checkpoint(trainer.checkpoint_path, with_training=True)
    raw = ckpt.train_tensors["model.conv_in.weight"]
    assert not torch.equal(ckpt.weights["conv_in.weight"], raw)


def test_training_reduces_the_loss(tmp_path):
    cfg = TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup=5, ema_decay=0.9, checkpoint_every=60)
    losses = Trainer(TINY, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / "r").run(progress=False)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


def test_resume_past_the_end_is_a_user_error(tmp_path):
    make_trainer(tmp_path / "a", 3).run(progress=False)
    with pytest.raises(UserError, match="already at step 3"):
        Trainer.resume(tmp_path / "a" / "checkpoint.safetensors")


def test_distillation_learns_the_teachers_prediction(tmp_path, tiny_checkpoint):
    """--distill 1: the target is the frozen --init network's prediction, so an unchanged network
    starts at zero loss and one whose function a plugin changed (units skipped) learns the gap."""
    from ddpm_perf.model.unet import StepPlan
    from ddpm_perf.plugins import PluginHost

    init = load_checkpoint(tiny_checkpoint)
    cfg = TrainConfig(steps=2, batch_size=4, warmup=1, checkpoint_every=1, distill=1.0)
    same = Trainer(TINY, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / "a", init=init)
    x0, t, noise = same._batch()
    assert same._loss(x0, t, noise).item() < 1e-10  # equal up to rounding (grad mode takes other kernels)

    skipping = Trainer(TINY, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / "b",
                       PluginHost.from_spec("early_exit(max_skip=1.0)"), init=init)
    plugin = skipping.plugins.plugins[0]
    t = torch.tensor([999, 990, 5, 10])  # two noisy samples skip units, two run the whole network
    x_t = skipping.diffusion.q_sample(x0, t, noise)
    with torch.no_grad():
        guess = skipping.teacher(x_t, t)
        skipped = torch.cat([skipping.net(x_t[i:i + 1], t[i:i + 1], StepPlan(skip=plugin.skips[int(t[i]) * 5 // 1000]))
                             for i in range(4)])
    expected = ((skipped - guess) ** 2).mean()
    assert expected > 0
    torch.testing.assert_close(skipping._loss(x0, t, noise).detach(), expected, rtol=1e-5, atol=1e-7)

    half = Trainer(TINY, ScheduleConfig(), DataSpec("digits"), TrainConfig(**{**cfg.__dict__, "distill": 0.5}),
                   tmp_path / "c", init=init)
    with torch.no_grad():
        plain = half.net(x_t, t)
    torch.testing.assert_close(half._loss(x0, t, noise).detach(), ((plain - (noise + guess) / 2) ** 2).mean())


def test_distillation_resumes_bit_exactly(tmp_path):
    from ddpm_perf.model.checkpoint import Checkpoint
    from ddpm_perf.model.unet import UNet

    init = Checkpoint.from_model(UNet(CONFIG))  # dropout on: the student's masks come from the restored RNG

    def trainer(out, steps):
        cfg = TrainConfig(steps=steps, batch_size=4, warmup=2, ema_decay=0.9, checkpoint_every=2, distill=0.7)
        return Trainer(CONFIG, ScheduleConfig(), DataSpec("digits"), cfg, out, init=init)

    straight = trainer(tmp_path / "a", 4).run(progress=False)
    head = trainer(tmp_path / "b", 2).run(progress=False)
    resumed = Trainer.resume(tmp_path / "b" / "checkpoint.safetensors", steps=4)  # the teacher comes back from it
    assert resumed.teacher is not None
    assert head + resumed.run(progress=False) == straight


def test_distillation_needs_a_teacher_and_a_weight_in_range(tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="--distill needs --init"):
        Trainer(TINY, ScheduleConfig(), DataSpec("digits"), TrainConfig(distill=1.0), tmp_path / "a")
    with pytest.raises(UserError, match=r"--distill must be in \[0, 1\], got 1.5"):
        TrainConfig(distill=1.5)


def test_digits_data_set_is_real_and_scaled():
    data = load_dataset("digits", 16, 1)
    assert len(data) == 1797
    x = data[0]
    assert x.shape == (1, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.3


def test_data_sets_that_need_files_say_where(tmp_path):
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", 32, 3, None)
    with pytest.raises(UserError, match=r"data_batch_1 is missing"):
        load_dataset("cifar10", 32, 3, tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("folder", 64, 3, tmp_path / "none")
    with pytest.raises(UserError, match="model takes 3"):
        load_dataset("digits", 16, 3)


def test_cifar10_pickles_and_image_folders_load(tmp_path):
    import pickle

    import numpy as np
    from PIL import Image

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        data = np.random.default_rng(i).integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [0] * 4}, f)
    cifar = load_dataset("cifar10", 32, 3, tmp_path)
    assert len(cifar) == 20 and cifar[0].shape == (3, 32, 32)
    first = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)[0].reshape(3, 32, 32)
    torch.testing.assert_close(cifar[0], torch.from_numpy(first).float() / 127.5 - 1)

    folder = tmp_path / "faces"
    folder.mkdir()
    Image.fromarray(np.full((40, 60, 3), 255, np.uint8)).save(folder / "a.png")
    faces = load_dataset("folder", 16, 3, folder)
    assert len(faces) == 1 and faces[0].shape == (3, 16, 16)
    torch.testing.assert_close(faces[0], torch.ones(3, 16, 16))


def test_resume_continues_with_the_runs_own_plugins(tmp_path):
    """A run trained with a plugin that changes what is trained (early_exit) continues with it when
    --plugins is left out; other plugins are allowed, with a warning naming the run's."""
    from ddpm_perf.errors import RunWarning
    from ddpm_perf.plugins import PluginHost

    spec = "early_exit(levels=1,max_skip=1.0)"
    cfg = TrainConfig(steps=2, batch_size=8, warmup=1, ema_decay=0.9, checkpoint_every=2)
    Trainer(CONFIG, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / "a", PluginHost.from_spec(spec)).run(
        progress=False)
    path = tmp_path / "a" / "checkpoint.safetensors"
    trained_with = load_checkpoint(path).trained_with
    assert trained_with.startswith("early_exit(")

    resumed = Trainer.resume(path, steps=3)
    assert resumed.plugins.spec == trained_with
    resumed.run(progress=False)
    assert load_checkpoint(path).trained_with == trained_with  # still recorded after the resumed steps

    with pytest.warns(RunWarning, match=r"trained with 'early_exit\("):
        other = Trainer.resume(path, plugins=PluginHost(), steps=4)
    assert other.plugins.spec == ""
