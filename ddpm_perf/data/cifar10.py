"""CIFAR-10 from the local python pickle batches (the files torchvision reads); no download."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import UserError

FILES = [f"data_batch_{i}" for i in range(1, 6)]
HOW = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it and "
       "pass the folder holding data_batch_1 with --data-dir")


class CIFAR10(Dataset):
    channels = 3

    def __init__(self, root: str | Path | None, image_size: int = 32):
        if root is None:
            raise UserError(f"CIFAR-10 needs a local copy: {HOW}")
        root = Path(root)
        if (root / "cifar-10-batches-py").is_dir():
            root = root / "cifar-10-batches-py"
        missing = [f for f in FILES if not (root / f).is_file()]
        if missing:
            raise UserError(f"CIFAR-10 not found: {root / missing[0]} is missing; {HOW}")
        batches = []
        for name in FILES:
            with open(root / name, "rb") as f:
                batches.append(pickle.load(f, encoding="latin1")["data"])
        data = torch.from_numpy(np.concatenate(batches).reshape(-1, 3, 32, 32))
        images = data.float() / 127.5 - 1
        if image_size != 32:
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
