"""Native checkpoints: one safetensors file, configs as JSON metadata, written atomically.

Layout of a file:
  <param name>            the weights to sample with (the EMA weights of a training run)
  train.model.<name>      raw training weights            } only in training checkpoints,
  train.optim.<i>.<key>   optimizer state per parameter   } read by --resume
  train.rng.<name>        RNG states as uint8 tensors     }
metadata: format, model (UNetConfig JSON), schedule (ScheduleConfig JSON), train (JSON),
trained_with (the --plugins spec of the training run that made the weights, e.g. "early_exit(levels=1,...)";
kept by 'ddpm-perf convert', so a plugin can tell whether the weights were fine-tuned for it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..diffusion.schedule import Diffusion, ScheduleConfig
from ..errors import UserError
from ..io import atomic_path
from .config import UNetConfig
from .unet import UNet

FORMAT = "ddpm-perf/1"
TRAIN_PREFIX = "train."


@dataclass
class Checkpoint:
    model_config: UNetConfig
    schedule_config: ScheduleConfig
    weights: dict[str, torch.Tensor]
    train_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    train_meta: dict = field(default_factory=dict)
    path: Path | None = None
    trained_with: str = ""  # the plugins the weights were trained with ("" = none, or unknown)

    @classmethod
    def from_model(cls, model: UNet, schedule_config: ScheduleConfig | None = None) -> "Checkpoint":
        """An in-memory checkpoint of a model (random weights for benchmarks, EMA weights in training)."""
        weights = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        return cls(model.config, schedule_config or ScheduleConfig(), weights)

    def build(self, device: str | torch.device = "cpu") -> tuple[UNet, Diffusion]:
        with torch.device("meta"):  # no random initialisation: every parameter is loaded below
            model = UNet(self.model_config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(self.weights)), sorted(set(self.weights) - expected)
        if missing or unexpected:
            raise UserError(
                f"checkpoint {self.path}: weights do not match its model config "
                f"(missing {_brief(missing)}; unexpected {_brief(unexpected)}); re-create the checkpoint")
        model = model.to_empty(device="cpu")  # allocated, not initialised; filled by the copy below
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as e:  # shape mismatch
            raise UserError(f"checkpoint {self.path}: {str(e).splitlines()[-1].strip()}; "
                            "re-create the checkpoint") from None
        return model.to(device).eval(), Diffusion(self.schedule_config)


def _brief(keys: list[str]) -> str:
    return "none" if not keys else ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def default_checkpoint() -> Path:
    """The embedded digits model shipped inside the package."""
    return Path(str(resources.files("ddpm_perf") / "assets" / "digits.safetensors"))


def save_checkpoint(path: str | os.PathLike, model_config: UNetConfig, schedule_config: ScheduleConfig,
                    weights: dict[str, torch.Tensor], train_tensors: dict[str, torch.Tensor] | None = None,
                    train_meta: dict | None = None, dtype: torch.dtype | None = None, trained_with: str = "") -> Path:
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in weights.items()}
    for k, v in (train_tensors or {}).items():
        tensors[TRAIN_PREFIX + k] = v.detach().cpu().contiguous()
    metadata = {"format": FORMAT, "model": model_config.to_json(), "schedule": schedule_config.to_json()}
    if train_meta is not None:
        metadata["train"] = json.dumps(train_meta, sort_keys=True)
    if trained_with:
        metadata["trained_with"] = trained_with
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_checkpoint(path: str | os.PathLike, with_training: bool = False) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; for a diffusers model run "
                        f"'ddpm-perf convert {path} OUT.safetensors' first, or pass a .safetensors file")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise UserError(f"checkpoint {path} is not a ddpm-perf checkpoint (no '{FORMAT}' metadata); "
                                "convert diffusers models with 'ddpm-perf convert'")
            weights, train = {}, {}
            for key in f.keys():
                if key.startswith(TRAIN_PREFIX):
                    if with_training:
                        train[key[len(TRAIN_PREFIX):]] = f.get_tensor(key)
                else:
                    weights[key] = f.get_tensor(key).float()
    except SafetensorError as e:
        raise UserError(f"checkpoint {path} is truncated or not a safetensors file ({e}); "
                        "re-create or re-download it") from None
    try:
        model_config = UNetConfig.from_dict(json.loads(meta["model"]))
        schedule_config = ScheduleConfig.from_dict(json.loads(meta["schedule"]))
        train_meta = json.loads(meta["train"]) if "train" in meta else {}
    except (KeyError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path}: metadata is damaged ({e!r}); re-create the checkpoint") from None
    except UserError as e:
        raise UserError(f"checkpoint {path}: {e}") from None
    if with_training and not train:
        raise UserError(f"checkpoint {path} holds no training state (optimizer, RNG); "
                        "resume from a checkpoint written by 'ddpm-perf train'")
    return Checkpoint(model_config, schedule_config, weights, train, train_meta, path, meta.get("trained_with", ""))
