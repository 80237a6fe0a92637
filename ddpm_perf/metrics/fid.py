"""The inputs of ``ddpm-perf fid`` and their statistics in a feature space.

An input is an image folder (its top-level image files, sorted, as pytorch-fid reads them), an .npz
holding uint8 images under ``images`` (N, H, W, C) or (N, H, W) -- what ``ddpm-perf sample --out
x.npz`` writes -- or a statistics .npz (``mu``, ``sigma``, as pytorch-fid's ``--save-stats`` writes).

Feature spaces: ``InceptionSpace`` (pytorch-fid's pool3, 2048-d: images to [0, 1] as ``ToTensor``
does, grayscale repeated to RGB as PIL's ``convert('RGB')`` does) and ``DigitsSpace`` (the FD-digits
classifier: 16x16 grayscale images mapped to [-1, 1]).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .frechet import STATS_KEYS, load_stats, statistics

# pytorch-fid's IMAGE_EXTENSIONS
IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}


@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    images: int | None = None  # None: read from a statistics file

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


class InceptionSpace:
    name, label, dim, pil_mode = "Inception pool3", "FID", 2048, "RGB"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        self.weights, self.device, self._model = weights, torch.device(device), None

    @property
    def model(self):
        if self._model is None:  # only when images are given: statistics files need no weights
            from .inception import load_fid_inception

            self._model = load_fid_inception(self.weights).to(self.device)
        return self._model

    def check(self, path: Path, shape: tuple[int, ...]) -> None:
        if shape[-1] not in (1, 3):
            raise UserError(f"{path}: images must have 1 or 3 channels, got shape {shape}")

    def features(self, images: list[np.ndarray], batch_size: int) -> np.ndarray:
        model, out = self.model, []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                batch = [self._tensor(a) for a in images[i:i + batch_size]]
                if len({tuple(t.shape) for t in batch}) > 1:  # mixed sizes: each resized on its own
                    batch = [F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) for t in batch]
                out.append(model(torch.cat(batch)).cpu())
        return torch.cat(out).numpy()

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float() / 255
        return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t


class DigitsSpace:
    name, label, pil_mode = "digits classifier", "FD-digits", "L"

    @property
    def dim(self) -> int:
        from .digits_classifier import _cached_classifier, default_classifier_path

        return _cached_classifier(str(default_classifier_path())).feature_dim

    def check(self, path: Path, shape: tuple[int, ...]) -> None:
        if tuple(shape[-3:]) != (16, 16, 1):
            raise UserError(f"{path}: --digits compares 16x16 grayscale digits; these images are "
                            f"{'x'.join(map(str, shape[-3:]))} (H x W x C)")

    def features(self, images: list[np.ndarray], batch_size: int) -> np.ndarray:
        from .digits_classifier import digits_features

        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        return digits_features(x, batch_size=batch_size)

    def reference(self) -> Stats:
        from .digits_classifier import reference_statistics

        return Stats(*reference_statistics("train"), images=None)


def check_input(path: Path) -> None:
    """Fail early, before any network is loaded, on an input that cannot be one."""
    if not path.exists():
        raise UserError(f"{path} does not exist; give an image folder, an .npz of images or a statistics .npz")
    if not path.is_dir() and path.suffix.lower() != ".npz":
        raise UserError(f"{path}: give an image folder, an .npz of uint8 images (key 'images') "
                        "or a statistics .npz (keys 'mu', 'sigma')")


def read_images(path: Path, pil_mode: str) -> list[np.ndarray] | None:
    """uint8 (H, W, C) images of a folder or an images .npz; None for a statistics .npz."""
    check_input(path)
    if path.is_dir():
        return _read_folder(path, pil_mode)
    try:
        f = np.load(path)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise UserError(f"{path} is a single .npy array; save images as np.savez(path, images=...)")
        with f:
            if all(k in f.files for k in STATS_KEYS):
                return None
            if "images" not in f.files:
                raise UserError(f"{path} has neither 'images' nor 'mu' and 'sigma' (keys: {', '.join(f.files) or 'none'})")
            images = f["images"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable .npz file ({e})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(f"{path}: 'images' must be uint8 (N, H, W, C) or (N, H, W), got {images.dtype} "
                        f"{images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    return list(images)


def _read_folder(path: Path, pil_mode: str) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    images = []
    for file in files:
        try:
            with Image.open(file) as im:
                array = np.asarray(im.convert(pil_mode))
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"{file} is not a readable image ({e})") from None
        images.append(array[..., None] if array.ndim == 2 else array)
    return images


def input_stats(path: Path, space, batch_size: int) -> Stats:
    """The statistics of an input in ``space``: read from a statistics file or computed from images."""
    images = read_images(path, space.pil_mode)
    if images is None:
        stats = Stats(*load_stats(path))
    else:
        for shape in {a.shape for a in images}:
            space.check(path, shape)
        if len(images) < 2:
            raise UserError(f"{path}: a covariance needs at least 2 images, got {len(images)}")
        stats = Stats(*statistics(space.features(images, batch_size)), images=len(images))
    if stats.dim != space.dim:
        raise UserError(f"{path}: these statistics are {stats.dim}-d, but the {space.name} features are "
                        f"{space.dim}-d; compare statistics of the same feature space"
                        + (" (drop --digits)" if isinstance(space, DigitsSpace) else " (add --digits?)"))
    return stats
