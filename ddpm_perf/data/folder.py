"""A folder of images (CelebA-style): centre crop to a square, resize, scale to [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class ImageFolder(Dataset):
    def __init__(self, root: str | Path | None, image_size: int, channels: int = 3):
        if root is None:
            raise UserError("an image-folder data set needs its folder: pass --data-dir DIR")
        if not Path(root).is_dir():
            raise UserError(f"image folder {root} does not exist; pass a folder of images with --data-dir")
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in EXTENSIONS)
        if not self.files:
            raise UserError(f"image folder {root} holds no images ({', '.join(sorted(EXTENSIONS))})")
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.float32).reshape(self.image_size, self.image_size, self.channels)
        return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1
