"""The Fréchet distance between two Gaussians, computed exactly as pytorch-fid computes it, and
feature statistics saved as pytorch-fid-compatible .npz files (keys ``mu`` and ``sigma``).

pytorch-fid's ``calculate_frechet_distance``:
  1. ``covmean = sqrtm(sigma1 @ sigma2)`` (``disp=False``: no printed or warned messages);
  2. if ``covmean`` is not finite (the product is almost singular), add ``eps * I`` to both covariances
     and take the square root again;
  3. if ``covmean`` is complex and the imaginary part of its diagonal is not ``allclose(0, atol=1e-3)``,
     raise ``ValueError("Imaginary component ...")``; otherwise keep its real part;
  4. return ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(covmean)``.

SciPy 1.16 deprecated ``sqrtm``'s ``disp`` argument (it goes in 1.18) and warns ``LinAlgWarning``
for singular input instead; ``_sqrtm`` calls it either way without warnings and returns the matrix.
"""

from __future__ import annotations

import inspect
import os
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import atomic_path

STATS_KEYS = ("mu", "sigma")


def _linalg():
    try:
        from scipy import linalg
    except ImportError:
        raise UserError("the Fréchet distance needs scipy (its matrix square root): pip install scipy") from None
    return linalg


@lru_cache(maxsize=None)
def _sqrtm_takes_disp() -> bool:
    """True for SciPy < 1.16, where ``disp=False`` is the quiet call returning (sqrtm, errest)."""
    param = inspect.signature(_linalg().sqrtm).parameters.get("disp")
    return param is not None and isinstance(param.default, bool)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm(a, disp=False)[0]``, without SciPy >= 1.16's deprecation or singular-matrix
    warnings (``disp=False`` silenced the old equivalents)."""
    linalg = _linalg()
    if _sqrtm_takes_disp():
        return linalg.sqrtm(a, disp=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

    Warns (``RuntimeWarning``) where pytorch-fid prints that the product is singular and ``eps`` is
    added; raises ``ValueError`` for a significant imaginary component, as pytorch-fid does."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"Training and test mean vectors have different lengths ({mu1.shape} vs {mu2.shape})")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"Training and test covariances have different dimensions "
                         f"({sigma1.shape} vs {sigma2.shape})")
    diff = mu1 - mu2

    # The product might be almost singular.
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))

    # Numerical error might give a slight imaginary component.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Imaginary component {m}")
        covmean = covmean.real

    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features, as pytorch-fid: ``np.mean(axis=0)``, ``np.cov(rowvar=False)``."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if len(features) < 2:
        raise UserError(f"a covariance needs at least 2 images, got {len(features)}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def save_stats(path: str | os.PathLike, mu, sigma) -> Path:
    """Write ``mu`` and ``sigma`` as pytorch-fid writes them (``np.savez_compressed``), atomically."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise UserError(f"{path}: statistics are written as .npz files; name it e.g. {path.stem}.npz")
    if not path.parent.is_dir():
        raise UserError(f"{path}: folder {path.parent} does not exist; create it first")
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    _check_shapes(path, mu, sigma)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: given a name, numpy would append '.npz' to it
            np.savez_compressed(f, mu=mu, sigma=sigma)
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid .npz (ours, or written by ``python -m pytorch_fid --save-stats``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"statistics file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        f = np.load(path)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise UserError(f"{path} is a single .npy array, not an .npz file with 'mu' and 'sigma'")
        with f:
            missing = [k for k in STATS_KEYS if k not in f.files]
            if missing:
                raise UserError(f"{path} is not a statistics file: it has no {' or '.join(repr(k) for k in missing)} "
                                f"(keys: {', '.join(f.files) or 'none'}); write one with 'ddpm-perf fid --save-stats'")
            mu, sigma = f["mu"], f["sigma"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable .npz file ({e})") from None
    _check_shapes(path, mu, sigma)
    return mu, sigma


def _check_shapes(path: Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
