"""Import a diffusers DDPM model (``UNet2DModel`` or ``DDPMPipeline`` folder) as a ddpm-perf checkpoint.

``load_diffusers(path)`` accepts either

* a UNet2DModel folder: ``config.json`` plus ``diffusion_pytorch_model.safetensors`` (preferred) or
  ``diffusion_pytorch_model.bin`` (read with ``torch.load(weights_only=True)``), or
* a pipeline folder (a ``DDPMPipeline`` or ``DDIMPipeline``: pixel space, unconditional):
  ``model_index.json``, ``unet/`` (as above) and ``scheduler/scheduler_config.json``.

The JSON files are read directly; diffusers itself is not imported (it is only a test dependency).

Model config. The UNet2DModel fields map onto ``UNetConfig``: ``block_out_channels`` -> ``ch``
(its first entry) and ``ch_mult`` (every entry must be a multiple of the first),
``layers_per_block`` -> ``num_res_blocks``, ``sample_size`` -> ``image_size``, ``norm_num_groups``,
``norm_eps``, ``in_channels``, ``out_channels``, ``dropout``. Attention is placed by *level*: down
block L is an ``AttnDownBlock2D`` iff level L (resolution ``sample_size / 2**L``) is in
``attn_resolutions``, and the up block types must mirror the down block types. A field absent from
config.json takes diffusers' own UNet2DModel default (as diffusers does), so e.g. a config without
``freq_shift`` is rejected because diffusers' default 0 is not our embedding. Fields diffusers does not
know are ignored, as diffusers ignores them. Anything that would change the math of our U-Net
(activation, time embedding, padding, multi-head attention, class conditioning, ...) is a UserError
naming the field.

Schedule config. From ``scheduler/scheduler_config.json`` of a pipeline folder (a DDPMScheduler or
DDIMScheduler config; fields it omits take DDPMScheduler's defaults, as diffusers does):
``beta_schedule`` linear -> linear, squaredcos_cap_v2 -> cosine; ``beta_start``, ``beta_end``,
``num_train_timesteps``, ``variance_type`` (fixed_small / fixed_large) and ``clip_sample``;
``prediction_type`` must be epsilon and ``thresholding`` false. Inference-only fields
(``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``) are ignored: the sampler options choose
those. **A bare UNet2DModel folder has no scheduler: it gets the defaults of ``ScheduleConfig``**
(linear betas 1e-4 .. 0.02, 1000 steps, variance ``fixed_large``, ``clip_sample`` true; the values of
Ho et al.'s CIFAR-10 model).

Weights. An explicit module-name map (``weight_key_map``) renames every diffusers key to ours
(legacy attention names ``query/key/value/proj_attn`` and 1x1-conv attention weights [C, C, 1, 1]
are accepted too); every source key must be consumed and every parameter of our U-Net produced, with
matching shapes. Weights are returned as float32.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..diffusion.schedule import ScheduleConfig
from ..errors import UserError
from .checkpoint import Checkpoint
from .config import UNetConfig
from .unet import UNet

CONFIG_FILE = "config.json"
MODEL_INDEX_FILE = "model_index.json"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# diffusers' UNet2DModel.__init__ defaults: the value diffusers uses when config.json omits a field.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}

# diffusers' DDPMScheduler.__init__ defaults (DDIMScheduler shares the ones we read, bar variance_type).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "rescale_betas_zero_snr": False,
}
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}

# Parts of a diffusers module -> parts of ours, inside one ResnetBlock2D / Attention block.
RESNET_PARTS = (("norm1", "norm1"), ("conv1", "conv1"), ("time_emb_proj", "temb_proj"),
                ("norm2", "norm2"), ("conv2", "conv2"), ("conv_shortcut", "shortcut"))
ATTN_PARTS = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
              # names of diffusers' deprecated attention block (and of its conversion script)
              ("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out"))
ATTN_LINEARS = frozenset({"q", "k", "v", "proj_out"})


# -- entry point ----------------------------------------------------------------------------

def load_diffusers(path: str | os.PathLike) -> Checkpoint:
    """A diffusers UNet2DModel or DDPM pipeline folder as an in-memory Checkpoint (float32 weights)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"diffusers folder {path} does not exist; check the path")
    if not path.is_dir():
        raise UserError(f"diffusers model {path} is not a folder; pass the folder holding config.json "
                        "(a UNet2DModel) or model_index.json (a DDPM pipeline)")
    if (path / MODEL_INDEX_FILE).is_file():
        unet_dir, schedule_config = _read_pipeline(path)
    elif (path / CONFIG_FILE).is_file():
        unet_dir, schedule_config = path, ScheduleConfig()
    else:
        raise UserError(f"diffusers folder {path} holds neither {CONFIG_FILE} (a UNet2DModel) nor "
                        f"{MODEL_INDEX_FILE} (a DDPM pipeline); pass the model's folder")
    config_file = unet_dir / CONFIG_FILE
    model_config = unet_config_from_diffusers(_read_json(config_file), str(config_file))
    weight_file, state = _read_weights(unet_dir)
    weights = convert_state_dict(state, model_config, str(weight_file))
    return Checkpoint(model_config, schedule_config, weights, path=path)


def _read_pipeline(path: Path) -> tuple[Path, ScheduleConfig]:
    index_file = path / MODEL_INDEX_FILE
    index = _read_json(index_file)
    pipeline = index.get("_class_name", "DDPMPipeline")
    if pipeline not in PIPELINE_CLASSES:
        raise UserError(f"diffusers pipeline {index_file}: field '_class_name' = {json.dumps(pipeline)} is not "
                        f"supported (ddpm-perf needs a {' or '.join(PIPELINE_CLASSES)}: pixel-space, "
                        "unconditional)")
    unet_entry = index.get("unet")
    if not unet_entry:
        raise UserError(f"diffusers pipeline {index_file} has no 'unet' component; "
                        "ddpm-perf imports unconditional DDPM pipelines (a UNet2DModel and a scheduler)")
    if isinstance(unet_entry, list) and len(unet_entry) == 2 and unet_entry[1] != "UNet2DModel":
        raise UserError(f"diffusers pipeline {index_file}: field 'unet' = {json.dumps(unet_entry)} is not "
                        "supported (ddpm-perf needs a UNet2DModel)")
    unet_dir = path / "unet"
    if not (unet_dir / CONFIG_FILE).is_file():
        raise UserError(f"diffusers pipeline {path}: {unet_dir / CONFIG_FILE} is missing; "
                        "the pipeline folder is incomplete, re-download or re-save it")
    if not index.get("scheduler") or index["scheduler"] == [None, None]:  # diffusers' "no component"
        return unet_dir, ScheduleConfig()
    scheduler_file = path / "scheduler" / SCHEDULER_CONFIG_FILE
    if not scheduler_file.is_file():
        raise UserError(f"diffusers pipeline {path}: {scheduler_file} is missing; "
                        "the pipeline folder is incomplete, re-download or re-save it")
    return unet_dir, schedule_config_from_diffusers(_read_json(scheduler_file), str(scheduler_file))


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"diffusers config {file} does not exist; check the folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"diffusers config {file} is not readable JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"diffusers config {file} is not a JSON object; re-download it")
    return data


def _read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in WEIGHT_FILES:
        file = folder / name
        if file.is_file():
            break
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json")
                        and p.name != CONFIG_FILE)
        found = f" (found: {', '.join(others)})" if others else ""
        raise UserError(f"diffusers folder {folder} has no {' or '.join(WEIGHT_FILES)}{found}; "
                        "sharded and variant (fp16) weight files are not supported, re-save the model with "
                        "save_pretrained()")
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"diffusers weights {file} cannot be read ({first_line}); re-download or re-save "
                        "the model") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"diffusers weights {file} is not a state dict of tensors; re-save the model "
                        "with save_pretrained()")
    return file, state


# -- configs --------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Fields:
    """Reads fields of a diffusers config with diffusers' defaults; builds the one-line errors."""

    def __init__(self, cfg: dict, source: str, defaults: dict[str, Any]):
        self.cfg, self.source, self.defaults = cfg, source, defaults

    def __getitem__(self, name: str) -> Any:
        return self.cfg.get(name, self.defaults[name])

    def error(self, name: str, need: str, value: Any = ...) -> UserError:
        if value is ...:
            value = self[name]
        shown = json.dumps(value)
        if name not in self.cfg and name in self.defaults:
            shown += " (diffusers' default: the field is absent)"
        return UserError(f"diffusers config {self.source}: field '{name}' = {shown} is not supported "
                         f"(ddpm-perf needs {need})")

    def require(self, name: str, ok: bool, need: str) -> None:
        if not ok:
            raise self.error(name, need)


def unet_config_from_diffusers(cfg: dict, source: str = CONFIG_FILE) -> UNetConfig:
    """Map a diffusers UNet2DModel config (the dict of its config.json) to a UNetConfig."""
    f = _Fields(cfg, source, UNET_DEFAULTS)
    class_name = cfg.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise f.error("_class_name", "a UNet2DModel", class_name)

    # Fields that change the math of the network.
    f.require("act_fn", f["act_fn"] in ("silu", "swish"), "'silu'")
    f.require("time_embedding_type", f["time_embedding_type"] == "positional", "'positional'")
    f.require("flip_sin_to_cos", f["flip_sin_to_cos"] is False, "false: the embedding is [sin, cos]")
    f.require("freq_shift", _is_number(f["freq_shift"]) and f["freq_shift"] == 1,
              "1: frequencies 10000^(-i/(half-1)) as in Ho et al.")
    f.require("resnet_time_scale_shift", f["resnet_time_scale_shift"] == "default",
              "'default': the time embedding is added, not a scale-shift")
    f.require("downsample_padding", _is_number(f["downsample_padding"]) and f["downsample_padding"] == 0,
              "0: pad right/bottom by 1, then a stride-2 conv")
    f.require("downsample_type", f["downsample_type"] == "conv", "'conv'")
    f.require("upsample_type", f["upsample_type"] == "conv", "'conv'")
    f.require("mid_block_type", f["mid_block_type"] == "UNetMidBlock2D", "'UNetMidBlock2D'")
    f.require("mid_block_scale_factor", _is_number(f["mid_block_scale_factor"]) and f["mid_block_scale_factor"] == 1,
              "1")
    f.require("center_input_sample", f["center_input_sample"] is False, "false")
    f.require("class_embed_type", f["class_embed_type"] is None, "null: unconditional models only")
    f.require("num_class_embeds", f["num_class_embeds"] is None, "null: unconditional models only")
    f.require("add_attention", f["add_attention"] is True, "true: the middle block has attention")

    # Shape of the network.
    channels = f["block_out_channels"]
    f.require("block_out_channels", isinstance(channels, list) and bool(channels)
              and all(_is_int(c) and c > 0 for c in channels), "a non-empty list of positive integers")
    ch = channels[0]
    f.require("block_out_channels", ch % 2 == 0 and ch >= 4,
              "an even first entry of at least 4 (the time embedding has block_out_channels[0] / 2 frequencies)")
    f.require("block_out_channels", all(c % ch == 0 for c in channels),
              f"every entry to be a multiple of the first, {ch}")
    levels = len(channels)
    f.require("layers_per_block", _is_int(f["layers_per_block"]) and f["layers_per_block"] > 0,
              "a positive integer")
    for name in ("in_channels", "out_channels"):
        f.require(name, _is_int(f[name]) and f[name] > 0, "a positive integer")

    down, up = f["down_block_types"], f["up_block_types"]
    down_attn = _block_attention(f, "down_block_types", down, levels, "DownBlock2D", "AttnDownBlock2D")
    up_attn = _block_attention(f, "up_block_types", up, levels, "UpBlock2D", "AttnUpBlock2D")
    mirrored = [down_attn[levels - 1 - i] for i in range(levels)]
    f.require("up_block_types", up_attn == mirrored,
              f"the mirror of down_block_types: {json.dumps(_up_types(mirrored))}")
    attn_levels = [level for level, a in enumerate(down_attn) if a]

    size = f["sample_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    f.require("sample_size", _is_int(size) and size > 0 and size % 2 ** (levels - 1) == 0,
              f"a square size, a positive multiple of 2^(levels-1) = {2 ** (levels - 1)}")

    groups = f["norm_num_groups"]
    f.require("norm_num_groups", _is_int(groups) and groups > 0 and all(c % groups == 0 for c in channels),
              f"a positive integer dividing every channel count {sorted(set(channels))}")
    f.require("attn_norm_num_groups", f["attn_norm_num_groups"] in (None, groups),
              "null or norm_num_groups")
    f.require("norm_eps", _is_number(f["norm_eps"]) and f["norm_eps"] > 0, "a positive number")
    f.require("dropout", _is_number(f["dropout"]) and 0 <= f["dropout"] < 1, "a number in [0, 1)")
    f.require("time_embedding_dim", f["time_embedding_dim"] in (None, 4 * ch),
              f"null or 4 * block_out_channels[0] = {4 * ch}")

    head_dim = f["attention_head_dim"]
    attn_channels = sorted({channels[level] for level in attn_levels} | {channels[-1]})
    f.require("attention_head_dim", head_dim is None or (_is_int(head_dim) and attn_channels == [head_dim]),
              f"null, or the channel count of every attention block ({', '.join(map(str, attn_channels))}): "
              "single-head attention")

    config_fields = dict(
        image_size=size, in_channels=f["in_channels"], out_channels=f["out_channels"], ch=ch,
        ch_mult=tuple(c // ch for c in channels), num_res_blocks=f["layers_per_block"],
        attn_resolutions=tuple(size // 2 ** level for level in attn_levels), dropout=float(f["dropout"]),
        num_groups=groups, norm_eps=float(f["norm_eps"]))
    try:
        return UNetConfig(**config_fields)
    except UserError as e:  # a combination our checks above did not anticipate
        raise UserError(f"diffusers config {source}: {e}") from None


def _block_attention(f: _Fields, name: str, types: Any, levels: int, plain: str, attn: str) -> list[bool]:
    f.require(name, isinstance(types, list) and len(types) == levels,
              f"a list of {levels} block types, one per entry of block_out_channels")
    out = []
    for t in types:
        # diffusers' get_down_block/get_up_block strip a 'UNetRes' prefix.
        base = t[len("UNetRes"):] if isinstance(t, str) and t.startswith("UNetRes") else t
        f.require(name, base in (plain, attn), f"only {plain} and {attn} blocks; {json.dumps(t)} is not one")
        out.append(base == attn)
    return out


def _up_types(attn: list[bool]) -> list[str]:
    return ["AttnUpBlock2D" if a else "UpBlock2D" for a in attn]


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """The UNet2DModel config of the same network: the inverse of ``unet_config_from_diffusers``
    (for building a diffusers model to compare against)."""
    levels = range(config.num_levels)
    attn = [config.image_size // 2 ** level in config.attn_resolutions for level in levels]
    return {
        "sample_size": config.image_size, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "block_out_channels": [config.ch * m for m in config.ch_mult], "layers_per_block": config.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": _up_types(attn[::-1]),
        "norm_num_groups": config.num_groups, "norm_eps": config.norm_eps, "act_fn": "silu",
        "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
        "resnet_time_scale_shift": "default", "attention_head_dim": None, "downsample_padding": 0,
        "mid_block_scale_factor": 1, "center_input_sample": False, "dropout": config.dropout,
    }


def schedule_config_from_diffusers(cfg: dict, source: str = SCHEDULER_CONFIG_FILE) -> ScheduleConfig:
    """Map a diffusers DDPMScheduler/DDIMScheduler config (scheduler_config.json) to a ScheduleConfig."""
    f = _Fields(cfg, source, SCHEDULER_DEFAULTS)
    class_name = cfg.get("_class_name", "DDPMScheduler")
    if class_name not in SCHEDULER_CLASSES:
        raise f.error("_class_name", " or ".join(SCHEDULER_CLASSES), class_name)
    f.require("beta_schedule", isinstance(f["beta_schedule"], str) and f["beta_schedule"] in BETA_SCHEDULES,
              " or ".join(map(repr, BETA_SCHEDULES)))
    f.require("trained_betas", f["trained_betas"] is None, "null: betas from beta_schedule")
    f.require("rescale_betas_zero_snr", f["rescale_betas_zero_snr"] is False, "false")
    f.require("prediction_type", f["prediction_type"] == "epsilon", "'epsilon': the model predicts the noise")
    f.require("thresholding", f["thresholding"] is False, "false: x0 is clipped to [-1, 1]")
    f.require("clip_sample", isinstance(f["clip_sample"], bool), "true or false")
    f.require("clip_sample_range", not f["clip_sample"] or f["clip_sample_range"] == 1,
              "1.0: x0 is clipped to [-1, 1]")
    # DDIMScheduler has no variance_type; DDPM sampling then uses DDPMScheduler's default.
    f.require("variance_type", f["variance_type"] in ("fixed_small", "fixed_large"), "'fixed_small' or 'fixed_large'")
    for name in ("beta_start", "beta_end"):
        f.require(name, _is_number(f[name]) and 0 < f[name] < 1, "a number in (0, 1)")
    f.require("num_train_timesteps", _is_int(f["num_train_timesteps"]) and f["num_train_timesteps"] >= 2,
              "an integer of at least 2")
    return ScheduleConfig(beta_schedule=BETA_SCHEDULES[f["beta_schedule"]], beta_start=float(f["beta_start"]),
                          beta_end=float(f["beta_end"]), num_train_timesteps=f["num_train_timesteps"],
                          variance_type=f["variance_type"], clip_sample=f["clip_sample"])


# -- weights --------------------------------------------------------------------------------

def weight_key_map(config: UNetConfig) -> dict[str, str]:
    """diffusers module name -> our module name, for every module that holds parameters.

    Up block i of diffusers runs at level N-1-i; our up units are named by level.
    """
    m: dict[str, str] = {"conv_in": "conv_in", "time_embedding.linear_1": "time_embed.0",
                         "time_embedding.linear_2": "time_embed.2",
                         "conv_norm_out": "norm_out", "conv_out": "conv_out"}

    def resnet(src: str, dst: str) -> None:
        for a, b in RESNET_PARTS:
            m[f"{src}.{a}"] = f"{dst}.{b}"

    def attention(src: str, dst: str) -> None:
        for a, b in ATTN_PARTS:
            m[f"{src}.{a}"] = f"{dst}.{b}"

    levels = config.num_levels
    for level in range(levels):
        has_attn = config.image_size // 2 ** level in config.attn_resolutions
        for j in range(config.num_res_blocks):
            resnet(f"down_blocks.{level}.resnets.{j}", f"blocks.down{level}_res{j}")
            if has_attn:
                attention(f"down_blocks.{level}.attentions.{j}", f"blocks.down{level}_attn{j}")
        if level != levels - 1:
            m[f"down_blocks.{level}.downsamplers.0.conv"] = f"blocks.down{level}_downsample.conv"
    resnet("mid_block.resnets.0", "blocks.mid_res0")
    attention("mid_block.attentions.0", "blocks.mid_attn")
    resnet("mid_block.resnets.1", "blocks.mid_res1")
    for i in range(levels):
        level = levels - 1 - i
        has_attn = config.image_size // 2 ** level in config.attn_resolutions
        for j in range(config.num_res_blocks + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", f"blocks.up{level}_res{j}")
            if has_attn:
                attention(f"up_blocks.{i}.attentions.{j}", f"blocks.up{level}_attn{j}")
        if level != 0:
            m[f"up_blocks.{i}.upsamplers.0.conv"] = f"blocks.up{level}_upsample.conv"
    return m


def _expected_shapes(config: UNetConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # no memory, no initialisation cost
        return {k: v.shape for k, v in UNet(config).state_dict().items()}


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def convert_state_dict(state: dict[str, torch.Tensor], config: UNetConfig,
                       source: str = WEIGHT_FILES[0]) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DModel state dict to ours (float32); every key must map one to one."""
    key_map = weight_key_map(config)
    expected = _expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unused, duplicated, mismatched = [], [], []
    bad_shape: set[str] = set()
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        target_module = key_map.get(module)
        target = f"{target_module}.{param}" if target_module is not None else None
        if target is None or target not in expected:
            unused.append(key)
            continue
        if target in out:
            duplicated.append(f"{origin[target]} and {key}")
            continue
        if target_module.rpartition(".")[2] in ATTN_LINEARS and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]  # a 1x1 conv of the original code: the same linear map
        if tensor.shape != expected[target]:
            mismatched.append(f"{key} {list(tensor.shape)} (needs {list(expected[target])})")
            bad_shape.add(target)
            continue
        out[target] = tensor.detach().to(torch.float32).contiguous()
        origin[target] = key
    missing = [_source_name(t, key_map) for t in expected if t not in out and t not in bad_shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_few(mismatched, 3)}")
    if duplicated:
        problems.append(f"keys given twice: {_few(duplicated, 3)}")
    if unused:
        problems.append(f"{len(unused)} key(s) that do not belong to this model config: {_few(sorted(unused))}")
    if missing:
        problems.append(f"{len(missing)} key(s) missing: {_few(missing)}")
    if problems:
        raise UserError(f"diffusers weights {source} do not match the model's config.json ("
                        + "; ".join(problems) + "); the weight file is damaged or belongs to another model")
    return out


def _source_name(target: str, key_map: dict[str, str]) -> str:
    """The diffusers key a target parameter comes from (the first, modern name), for error messages."""
    module, _, param = target.rpartition(".")
    for src, dst in key_map.items():
        if dst == module:
            return f"{src}.{param}"
    return target
