"""Training data: scikit-learn's digits (installed with the package), local CIFAR-10, image folders."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..errors import UserError
from .cifar10 import CIFAR10
from .digits import Digits
from .folder import ImageFolder

DATASETS = ("digits", "cifar10", "folder")


def load_dataset(name: str, image_size: int, channels: int, path: str | Path | None = None) -> Dataset:
    """A Dataset of (C, H, W) float tensors in [-1, 1]; ``path`` for the data sets kept on disk."""
    if name == "digits":
        dataset = Digits(image_size)
    elif name == "cifar10":
        dataset = CIFAR10(path, image_size)
    elif name == "folder":
        dataset = ImageFolder(path, image_size, channels)
    else:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if dataset.channels != channels:
        raise UserError(f"data set {name} has {dataset.channels} channel(s) but the model takes {channels}; "
                        "pick a model config that matches")
    return dataset
