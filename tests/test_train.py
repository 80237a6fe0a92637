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
