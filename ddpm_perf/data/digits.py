"""scikit-learn's 8x8 handwritten digits (1,797 images, installed with scikit-learn), upsampled."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class Digits(Dataset):
    channels = 1

    def __init__(self, image_size: int = 16):
        from sklearn.datasets import load_digits

        images = torch.from_numpy(load_digits().images).float()[:, None] / 16.0  # values 0..16
        if image_size != 8:
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = (images.clamp(0, 1) * 2 - 1).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
