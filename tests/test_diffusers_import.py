"""Importing diffusers UNet2DModel / DDPM pipeline folders (ddpm_perf.model.diffusers_import).

The models are built by diffusers itself with random weights (group norms perturbed too, so that a
swapped norm would show) and saved with save_pretrained; the imported model must agree with diffusers'
forward to 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

from ddpm_perf.cli import main  # noqa: E402
from ddpm_perf.diffusion.schedule import ScheduleConfig  # noqa: E402
from ddpm_perf.errors import UserError  # noqa: E402
from ddpm_perf.model.checkpoint import load_checkpoint  # noqa: E402
from ddpm_perf.model.config import CONFIGS  # noqa: E402
from ddpm_perf.model.diffusers_import import (  # noqa: E402
    load_diffusers, schedule_config_from_diffusers, unet_config_from_diffusers, unet_config_to_diffusers)

TOL = 1e-4

# config.json of google/ddpm-cifar10-32 (dropout is not stored: diffusers' default 0.0).
CIFAR10_32 = {
    "_class_name": "UNet2DModel",
    "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 32, "norm_eps": 1e-6, "act_fn": "silu",
    "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
    "resnet_time_scale_shift": "default", "attention_head_dim": None, "downsample_padding": 0,
    "mid_block_scale_factor": 1, "center_input_sample": False,
}
# google/ddpm-celebahq-256: six levels, attention on down block 4 / up block 1 (16x16 at 256).
CELEBAHQ_256 = dict(
    CIFAR10_32, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
# A small model of the same kind for pipelines and error paths.
TINY = dict(CIFAR10_32, sample_size=16, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])


def diffusers_unet(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    with torch.no_grad():  # default GroupNorm init is weight 1, bias 0: make mix-ups visible
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


@torch.inference_mode()
def max_diff(reference: torch.Tensor, ours: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    return (ours(x, t) - reference).abs().max().item()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """The ddpm-cifar10-32 layout saved as safetensors and as .bin, and diffusers' output on one input."""
    model = diffusers_unet(CIFAR10_32)
    folder, bin_folder = tmp_path_factory.mktemp("cifar"), tmp_path_factory.mktemp("cifar_bin")
    model.save_pretrained(folder)
    model.save_pretrained(bin_folder, safe_serialization=False)
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.inference_mode():
        reference = model(x, t).sample
    return SimpleNamespace(folder=folder, bin_folder=bin_folder, x=x, t=t, reference=reference)


def tiny_folder(path: Path, seed: int = 0, **overrides) -> Path:
    """A saved tiny UNet2DModel whose config.json is then edited (any value, even ones diffusers refuses)."""
    diffusers_unet(TINY, seed).save_pretrained(path)
    edit_json(path / "config.json", **overrides)
    return path


def edit_json(file: Path, **overrides) -> None:
    data = json.loads(file.read_text())
    for key, value in overrides.items():
        if value is DELETE:
            del data[key]
        else:
            data[key] = value
    file.write_text(json.dumps(data))


DELETE = object()


# -- configs and forward agreement ----------------------------------------------------------

@pytest.mark.slow
def test_cifar10_matches_diffusers(cifar):
    ckpt = load_diffusers(cifar.folder)
    assert ckpt.model_config == dataclasses.replace(CONFIGS["cifar10"], dropout=0.0)
    assert ckpt.schedule_config == ScheduleConfig()  # a bare UNet folder: our defaults
    assert ckpt.path == cifar.folder
    assert all(w.dtype == torch.float32 for w in ckpt.weights.values())
    model, _ = ckpt.build()
    diff = max_diff(cifar.reference, model, cifar.x, cifar.t)
    print(f"cifar10-32 max abs diff {diff:.3g}")
    assert diff <= TOL


def test_celebahq_config_maps_to_ours():
    assert unet_config_from_diffusers(CELEBAHQ_256) == CONFIGS["celebahq256"]


@pytest.mark.slow
def test_celebahq_layout_matches_diffusers(tmp_path):
    # The celebahq-256 blocks and channels at sample_size 64 (the parameter count does not depend on it):
    # attention sits on level 4, which is 4x4 here; the importer must place it by level, not at "16".
    model = diffusers_unet(dict(CELEBAHQ_256, sample_size=64))
    model.save_pretrained(tmp_path)
    ckpt = load_diffusers(tmp_path)
    cfg = ckpt.model_config
    assert (cfg.image_size, cfg.ch, cfg.ch_mult, cfg.attn_resolutions) == (64, 128, (1, 1, 2, 2, 4, 4), (4,))
    ours, _ = ckpt.build()
    assert sorted(n for n in ours.blocks if "attn" in n) == [
        "down4_attn0", "down4_attn1", "mid_attn", "up4_attn0", "up4_attn1", "up4_attn2"]
    torch.manual_seed(1)
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([500])
    with torch.inference_mode():
        reference = model(x, t).sample
    del model
    diff = max_diff(reference, ours, x, t)
    print(f"celebahq-256 layout (64x64) max abs diff {diff:.3g}")
    assert diff <= TOL


@pytest.mark.slow
def test_bin_weights_equal_safetensors(cifar):
    a, b = load_diffusers(cifar.folder), load_diffusers(cifar.bin_folder)
    assert a.model_config == b.model_config
    assert a.weights.keys() == b.weights.keys()
    for key in a.weights:
        assert torch.equal(a.weights[key], b.weights[key]), key


@pytest.mark.parametrize("schedule, ours", [
    (dict(variance_type="fixed_small", clip_sample=False),
     ScheduleConfig(variance_type="fixed_small", clip_sample=False)),
    (dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500, variance_type="fixed_large"),
     ScheduleConfig(beta_schedule="cosine", num_train_timesteps=500, variance_type="fixed_large")),
    (dict(beta_start=2e-4, beta_end=0.03, variance_type="fixed_small", clip_sample=True),
     ScheduleConfig(beta_start=2e-4, beta_end=0.03, variance_type="fixed_small", clip_sample=True)),
])
def test_pipeline_folder_carries_schedule(tmp_path, schedule, ours):
    unet = diffusers_unet(TINY)
    scheduler = diffusers.DDPMScheduler(**schedule)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    ckpt = load_diffusers(tmp_path)
    assert ckpt.path == tmp_path
    assert ckpt.schedule_config == ours
    model, diffusion = ckpt.build()
    torch.testing.assert_close(diffusion.alphas_cumprod, scheduler.alphas_cumprod, rtol=0, atol=1e-6)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 499])
    with torch.inference_mode():
        reference = unet(x, t).sample
    assert max_diff(reference, model, x, t) <= TOL


def test_pipeline_scheduler_mapping_errors():
    for field, value in [("prediction_type", "v_prediction"), ("beta_schedule", "scaled_linear"),
                         ("thresholding", True), ("variance_type", "learned_range"),
                         ("trained_betas", [0.1, 0.2])]:
        with pytest.raises(UserError, match=f"field '{field}'"):
            schedule_config_from_diffusers({"_class_name": "DDPMScheduler", field: value})


def test_pipeline_folder_errors(tmp_path):
    unet = diffusers_unet(TINY)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    (tmp_path / "scheduler" / "scheduler_config.json").rename(tmp_path / "moved.json")
    with pytest.raises(UserError, match="scheduler_config.json is missing"):
        load_diffusers(tmp_path)
    (tmp_path / "moved.json").rename(tmp_path / "scheduler" / "scheduler_config.json")
    edit_json(tmp_path / "scheduler" / "scheduler_config.json", prediction_type="sample")
    with pytest.raises(UserError, match=r"scheduler_config.json: field 'prediction_type' = \"sample\""):
        load_diffusers(tmp_path)
    edit_json(tmp_path / "model_index.json", _class_name="LDMPipeline")  # latent space: not ours
    with pytest.raises(UserError, match="field '_class_name' = \"LDMPipeline\""):
        load_diffusers(tmp_path)


def test_legacy_attention_names_and_conv_weights(tmp_path):
    modern = tiny_folder(tmp_path / "modern")
    legacy = tiny_folder(tmp_path / "legacy")
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(modern / "diffusion_pytorch_model.safetensors").items():
        module, _, param = key.rpartition(".")
        head, _, last = module.rpartition(".attentions.")
        if head:
            index, _, part = last.partition(".")
            if part in renames:
                key = f"{head}.attentions.{index}.{renames[part]}.{param}"
                value = value[..., None, None] if param == "weight" else value  # pesser's 1x1 convs
        state[key] = value
    assert any(".query.weight" in k for k in state)
    save_file(state, str(legacy / "diffusion_pytorch_model.safetensors"))
    a, b = load_diffusers(modern).weights, load_diffusers(legacy).weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- error paths ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("act_fn", "gelu"),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D"]),  # does not mirror the down blocks
    ("flip_sin_to_cos", True),
    ("freq_shift", 0),
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("downsample_padding", 1),
    ("mid_block_scale_factor", 2),
    ("center_input_sample", True),
    ("attention_head_dim", 8),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("add_attention", False),
    ("block_out_channels", [16, 24]),
    ("norm_num_groups", 12),
    ("_class_name", "UNet2DConditionModel"),
])
def test_unsupported_config_names_field(tmp_path, field, value):
    folder = tiny_folder(tmp_path, **{field: value})
    with pytest.raises(UserError) as info:
        load_diffusers(folder)
    message = str(info.value)
    assert f"field '{field}'" in message and str(folder / "config.json") in message
    assert "\n" not in message


def test_absent_field_takes_diffusers_default(tmp_path):
    # diffusers' UNet2DModel default freq_shift is 0, which is not our embedding.
    with pytest.raises(UserError, match=r"field 'freq_shift' = 0 \(diffusers' default"):
        load_diffusers(tiny_folder(tmp_path, freq_shift=DELETE))


def test_attention_head_dim_equal_to_channels_is_single_head(tmp_path):
    folder = tiny_folder(tmp_path, attention_head_dim=32)  # attention only at 32 channels: one head
    assert load_diffusers(folder).model_config.attn_resolutions == (8,)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_diffusers(tmp_path / "nope")
    with pytest.raises(UserError, match="neither config.json"):
        load_diffusers(tmp_path)
    folder = tiny_folder(tmp_path / "m")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="has no diffusion_pytorch_model"):
        load_diffusers(folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot be read"):
        load_diffusers(folder)


def test_missing_and_extra_weight_keys(tmp_path):
    folder = tiny_folder(tmp_path)
    file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["up_blocks.0.attentions.1.to_k.weight"]
    state["down_blocks.7.resnets.0.conv1.weight"] = torch.zeros(1)
    save_file(state, str(file))
    with pytest.raises(UserError) as info:
        load_diffusers(folder)
    message = str(info.value)
    assert "up_blocks.0.attentions.1.to_k.weight" in message and "down_blocks.7.resnets.0.conv1.weight" in message


def test_weight_shape_mismatch(tmp_path):
    folder = tiny_folder(tmp_path)
    file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["conv_in.weight"] = torch.zeros(16, 3, 5, 5)
    save_file(state, str(file))
    with pytest.raises(UserError, match=r"shape mismatch: conv_in.weight \[16, 3, 5, 5\]"):
        load_diffusers(folder)


# -- CLI ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_convert_writes_a_matching_checkpoint(cifar, tmp_path):
    out = tmp_path / "cifar.safetensors"
    result = CliRunner().invoke(main, ["convert", str(cifar.folder), str(out)])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    assert ckpt.model_config == dataclasses.replace(CONFIGS["cifar10"], dropout=0.0)
    model, _ = ckpt.build()
    diff = max_diff(cifar.reference, model, cifar.x, cifar.t)
    print(f"cifar10-32 via 'ddpm-perf convert' max abs diff {diff:.3g}")
    assert diff <= TOL


def test_cli_convert_bad_config_is_one_line(tmp_path):
    folder = tiny_folder(tmp_path / "m", act_fn="gelu")
    # click >= 8.2: stderr is always captured separately (mix_stderr is gone).
    result = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.startswith("ddpm-perf: error: ") and result.stderr.count("\n") == 1
    assert "'act_fn'" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("google,ours", [(CIFAR10_32, "cifar10"), (CELEBAHQ_256, "celebahq256")])
def test_export_is_the_inverse_of_import(google, ours):
    config = dataclasses.replace(CONFIGS[ours], dropout=0.0)  # dropout is not stored in Google's files
    exported = unet_config_to_diffusers(config)
    assert exported == {**{k: v for k, v in google.items() if not k.startswith("_")}, "dropout": 0.0}
    assert unet_config_from_diffusers(exported) == config
