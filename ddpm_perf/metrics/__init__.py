"""Sample-quality metrics: FID (pytorch-fid's Inception-v3 and computation, pytorch-fid-compatible
statistics files) and FD-digits (the same Fréchet distance in the feature space of the small digits
classifier shipped in ddpm_perf/assets). ``ddpm-perf fid`` is the command line.

Names are imported on first use, so ``python -m ddpm_perf.metrics.digits_classifier`` runs cleanly."""

from importlib import import_module

_EXPORTS = {
    "frechet_distance": "frechet", "statistics": "frechet", "save_stats": "frechet", "load_stats": "frechet",
    "FIDInceptionV3": "inception", "load_fid_inception": "inception",
    "fd_digits": "digits_classifier", "load_digits_classifier": "digits_classifier",
    "reference_statistics": "digits_classifier",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
