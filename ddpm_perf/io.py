"""File output that never leaves a half-written file: write to a temp file, then rename."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError

IMAGE_SUFFIXES = (".png", ".npz", ".npy")
_UMASK = os.umask(0)  # read the process umask (there is no getter) and put it back at once
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.open("xb").close()
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # Writers such as safetensors' save_file create 0600 files: give the usual permissions.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output_path(out: str | os.PathLike) -> Path:
    """Validate --out before any work is done: FILE.png, FILE.npz, FILE.npy or a directory."""
    out = Path(out)
    parent = out.parent if out.suffix.lower() in IMAGE_SUFFIXES or not out.exists() else out
    if not parent.is_dir():
        raise UserError(f"--out {out}: folder {parent} does not exist; create it first or pick another path")
    if out.suffix and out.suffix.lower() not in IMAGE_SUFFIXES and not out.is_dir():
        raise UserError(f"--out {out}: give FILE.png (a grid), FILE.npz (uint8 NHWC array), FILE.npy "
                        "(float32 NCHW in [-1, 1]) or a directory")
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding as diffusers' numpy_to_pil does."""
    x = ((images.float().cpu() + 1) / 2).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def _to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_samples(samples: torch.Tensor, out: str | os.PathLike) -> Path:
    """Write (N, C, H, W) samples in [-1, 1]: FILE.npy keeps them as float32 (for comparisons at
    full precision); any other --out gets uint8 images (``save_images``)."""
    out = Path(out)
    if out.suffix.lower() != ".npy":
        return save_images(to_uint8(samples), out)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, samples.float().cpu().numpy())
    return out


def save_images(images: np.ndarray, out: str | os.PathLike) -> Path:
    """Write uint8 NHWC images as a PNG grid, an .npz (key ``images``) or one PNG per image."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".npz":
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images)
    elif suffix == ".png":
        with atomic_path(out) as tmp:
            _to_pil(make_grid(images)).save(tmp, format="PNG")
    else:
        out.mkdir(exist_ok=True)
        for i, img in enumerate(images):
            with atomic_path(out / f"{i:06d}.png") as tmp:
                _to_pil(img).save(tmp, format="PNG")
    return out
