import json

import pytest
import torch
from safetensors.torch import save_file

import ddpm_perf.model.checkpoint as checkpoint_module
from ddpm_perf.diffusion.schedule import ScheduleConfig
from ddpm_perf.errors import UserError
from ddpm_perf.model.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_keeps_weights_and_configs(tmp_path, tiny_config, tiny_model):
    sched = ScheduleConfig(beta_schedule="cosine", variance_type="fixed_small", clip_sample=False)
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_config, sched, tiny_model.state_dict())
    ckpt = load_checkpoint(path)
    assert ckpt.model_config == tiny_config and ckpt.schedule_config == sched
    model, diffusion = ckpt.build()
    for (k, a), b in zip(tiny_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert diffusion.config.beta_schedule == "cosine"


def test_half_precision_storage_loads_as_float32(tmp_path, tiny_config, tiny_model):
    path = save_checkpoint(tmp_path / "h.safetensors", tiny_config, ScheduleConfig(), tiny_model.state_dict(),
                           dtype=torch.float16)
    weights = load_checkpoint(path).weights
    assert all(w.dtype == torch.float32 for w in weights.values())
    w = tiny_model.state_dict()["conv_in.weight"]
    torch.testing.assert_close(weights["conv_in.weight"], w.half().float())


def test_crash_during_save_leaves_the_old_file_intact(tmp_path, tiny_config, tiny_model, monkeypatch):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_config, ScheduleConfig(), tiny_model.state_dict())
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")  # a truncated write, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_config, ScheduleConfig(), tiny_model.state_dict())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_missing_truncated_and_foreign_files_are_user_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or not a safetensors"):
        load_checkpoint(truncated)
    text = tmp_path / "x.safetensors"
    text.write_text("hello")
    with pytest.raises(UserError, match="truncated or not a safetensors"):
        load_checkpoint(text)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="not a ddpm-perf checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(UserError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_config_the_model_cannot_take(tmp_path, tiny_config, tiny_model):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_config, ScheduleConfig(), tiny_model.state_dict())
    # Rewrite the metadata with an impossible group count.
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    model = json.loads(meta["model"])
    model["num_groups"] = 3
    save_file(tensors, str(path), metadata={**meta, "model": json.dumps(model)})
    with pytest.raises(UserError, match="num_groups"):
        load_checkpoint(path)


def test_weights_that_do_not_match_the_config(tmp_path, tiny_config, tiny_model):
    state = tiny_model.state_dict()
    del state["conv_in.weight"]
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_config, ScheduleConfig(), state)
    with pytest.raises(UserError, match="missing conv_in.weight"):
        load_checkpoint(path).build()


def test_sampling_checkpoint_has_no_training_state(tiny_checkpoint):
    with pytest.raises(UserError, match="no training state"):
        load_checkpoint(tiny_checkpoint, with_training=True)
