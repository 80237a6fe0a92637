"""FD-digits: the Fréchet distance in the feature space of a small digits classifier the project ships.

Inception features say little about 16x16 grayscale digits, so the digits model (and the tests)
measure sample quality with a classifier trained on the same data: a 3-conv CNN on the 16x16
images of ``ddpm_perf.data.Digits`` (values in [-1, 1]), whose 128-d global average of its last
convolution (BatchNorm + ReLU; the counterpart of Inception's pool3) is the feature layer. ``fd_digits(images)`` is
the Fréchet distance (pytorch-fid's computation) between the features of ``images`` and those of
the whole digits data set, the set the digits DDPM trains on.

The weights ship as ``ddpm_perf/assets/digits_classifier.safetensors``, trained on a fixed 80/20
split of sklearn's digits (a permutation seeded by ``seed``); the held-out accuracy, feature
dimension, seed and steps are in the file's metadata. To retrain and rewrite the shipped file
(about 10 s on one CPU thread)::

    OMP_NUM_THREADS=1 python -m ddpm_perf.metrics.digits_classifier [--seed 0] [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError
from ..io import atomic_path
from .frechet import frechet_distance, statistics

FORMAT = "ddpm-perf-digits-classifier/1"
IMAGE_SIZE = 16
DEFAULT_STEPS = 1000
TEST_FRACTION = 0.2


class DigitsClassifier(nn.Module):
    """16x16x1 digits in [-1, 1] -> 10 logits; ``features`` gives the (N, feature_dim) FD-digits features."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.feature_dim = feature_dim
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)                # 16x16, then pool -> 8x8
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)        # 8x8, then pool -> 4x4
        self.conv3 = nn.Conv2d(2 * width, feature_dim, 3, padding=1, bias=False)  # 4x4
        self.bn3 = nn.BatchNorm2d(feature_dim)  # keeps every feature channel alive (no all-zero features)
        self.fc = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"expected (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) images in [-1, 1], "
                             f"got shape {tuple(x.shape)}")
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.bn3(self.conv3(x))).mean((2, 3))  # global average: the features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def split(seed: int = 0, n: int = 1797) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) of the fixed 80/20 split of sklearn's n = 1,797 digits."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * TEST_FRACTION)
    return perm[n_test:], perm[:n_test]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    from ..data.digits import Digits

    return Digits(IMAGE_SIZE).images, torch.from_numpy(load_digits().target).long()


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (the background value -1 fills in)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def train_classifier(seed: int = 0, steps: int = DEFAULT_STEPS, out: str | os.PathLike | None = None,
                     batch_size: int = 64, lr: float = 3e-3, log: bool = False) -> tuple[DigitsClassifier, dict]:
    """Train the classifier on the 80% split (Adam, one-cycle schedule, +-1 pixel shifts); returns the model
    in eval mode and its metadata (``accuracy`` on the held-out 20%). ``out``: write the weights there."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = _data()
    train_idx, test_idx = split(seed, len(labels))
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's global RNG untouched
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = train_idx[torch.randint(len(train_idx), (batch_size,), generator=generator)]
        loss = F.cross_entropy(model(_shift(images[batch], generator)), labels[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 250 == 0:
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    meta = {"format": FORMAT, "accuracy": accuracy(model, images[test_idx], labels[test_idx]),
            "train_accuracy": accuracy(model, images[train_idx], labels[train_idx]),
            "feature_dim": model.feature_dim, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
            "train_images": len(train_idx), "test_images": len(test_idx), "train_seconds": round(seconds, 2),
            "image_size": IMAGE_SIZE}
    if out is not None:
        save_classifier(out, model, meta)
    return model, meta


def default_classifier_path() -> Path:
    return Path(str(resources.files("ddpm_perf") / "assets" / "digits_classifier.safetensors"))


def save_classifier(path: str | os.PathLike, model: DigitsClassifier, meta: dict) -> Path:
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_digits_classifier(path: str | os.PathLike | None = None) -> tuple[DigitsClassifier, dict]:
    """The classifier (eval mode) and its metadata; by default the shipped file."""
    path = Path(path) if path is not None else default_classifier_path()
    if not path.is_file():
        raise UserError(f"digits classifier {path} does not exist; "
                        "rebuild it with 'python -m ddpm_perf.metrics.digits_classifier'")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"digits classifier {path} is damaged ({e}); "
                        "rebuild it with 'python -m ddpm_perf.metrics.digits_classifier'") from None
    if raw.get("format") != FORMAT:
        raise UserError(f"{path} is not a digits classifier (no '{FORMAT}' metadata)")
    meta = {k: v if k == "format" else json.loads(v) for k, v in raw.items()}
    model = DigitsClassifier(width=tensors["conv1.weight"].shape[0], feature_dim=int(meta["feature_dim"]))
    model.load_state_dict(tensors, strict=True)
    return model.eval(), meta


@lru_cache(maxsize=4)
def _cached_classifier(path: str) -> DigitsClassifier:
    return load_digits_classifier(path)[0]


def digits_features(images, batch_size: int = 500, classifier: DigitsClassifier | None = None) -> np.ndarray:
    """(N, feature_dim) float32 features of (N, 1, 16, 16) images in [-1, 1] (a tensor or an array)."""
    model = classifier or _cached_classifier(str(default_classifier_path()))
    images = torch.as_tensor(images).detach().float().cpu()
    with torch.inference_mode():
        return torch.cat([model.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
                         ).numpy() if len(images) else np.zeros((0, model.feature_dim), np.float32)


@lru_cache(maxsize=4)
def _reference_stats(path: str, reference: str) -> tuple[np.ndarray, np.ndarray]:
    images, _ = _data()
    if reference == "test":
        images = images[split(load_digits_classifier(path)[1]["seed"], len(images))[1]]
    return statistics(digits_features(images, classifier=_cached_classifier(path)))


def reference_statistics(reference: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference features, computed once per process: ``"train"`` is the whole
    digits data set (all 1,797 images, what the digits DDPM trains on); ``"test"`` the classifier's
    held-out 20%."""
    if reference not in ("train", "test"):
        raise UserError(f"FD-digits reference {reference!r}: use 'train' (the whole data set) or 'test'")
    return _reference_stats(str(default_classifier_path()), reference)


def fd_digits(images, reference="train") -> float:
    """FD-digits of (N, 1, 16, 16) images in [-1, 1] against the digits data set (``reference``:
    "train", "test", or a (mu, sigma) pair). Lower is better; real digits score near 0."""
    mu, sigma = statistics(digits_features(images))
    ref_mu, ref_sigma = reference_statistics(reference) if isinstance(reference, str) else reference
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddpm_perf.metrics.digits_classifier",
                                     description="Retrain the FD-digits classifier and rewrite its weights file.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--out", type=Path, default=default_classifier_path())
    args = parser.parse_args(argv)
    _, meta = train_classifier(seed=args.seed, steps=args.steps, out=args.out, log=True)
    print(f"held-out accuracy {meta['accuracy']:.4f} ({meta['test_images']} images), train accuracy "
          f"{meta['train_accuracy']:.4f}, {meta['train_seconds']:.1f} s on {torch.get_num_threads()} thread(s); "
          f"wrote {args.out}")


if __name__ == "__main__":
    _main()
