"""Metrics: the Fréchet distance as pytorch-fid computes it, pytorch-fid statistics files, the FID
Inception-v3 layout, the shipped FD-digits classifier, and 'ddpm-perf fid'."""

import warnings
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddpm_perf.cli import main
from ddpm_perf.errors import UserError
from ddpm_perf.io import save_images, to_uint8
from ddpm_perf.metrics import digits_classifier as dc
from ddpm_perf.metrics import frechet
from ddpm_perf.metrics.fid import InceptionSpace
from ddpm_perf.metrics.frechet import frechet_distance, load_stats, save_stats, statistics
from ddpm_perf.metrics.inception import FID_WEIGHTS_URL, FIDInceptionV3, load_fid_inception

from conftest import assert_user_error


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def random_rotation(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------- Fréchet distance: analytic values

def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=16), random_spd(rng, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_diagonal_covariances_match_the_closed_form():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # the distance only depends on the Gaussians: rotate both the same way
    q = random_rotation(rng, d)
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9 + 1)


def test_general_covariances_match_the_eigenvalue_formula():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.normal(size=8), rng.normal(size=8), random_spd(rng, 8), random_spd(rng, 8)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()  # tr sqrtm(s1 s2): its eigenvalues are > 0
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_rank_deficient_covariances_take_the_eps_fallback():
    # 2 and 3 samples in 3 dimensions: covariances of rank 1 and 2; s1 @ s2 has a double eigenvalue 0
    # whose rounding noise makes scipy's square root NaN, as pytorch-fid meets with few images
    s1 = np.cov(np.array([[-1, 1, -1], [2, 1, 0]], float), rowvar=False)
    s2 = np.cov(np.array([[0, 0, -2], [-2, 0, 2], [2, 2, 1]], float), rowvar=False)
    assert not np.isfinite(frechet._sqrtm(s1 @ s2)).all()
    mu = np.zeros(3)
    with pytest.warns(RuntimeWarning, match="adding 1e-06 to diagonal"):
        value = frechet_distance(mu, s1, mu, s2)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()  # sqrt(103/6)
    assert value == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, abs=1e-2)


def test_the_fallback_adds_eps_to_both_covariances(monkeypatch):
    calls, real_sqrtm = [], frechet._sqrtm

    def spy(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(frechet, "_sqrtm", spy)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 4.0])
    with pytest.warns(RuntimeWarning):
        frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=0.5)
    np.testing.assert_allclose(calls[1], (s1 + 0.5 * np.eye(2)) @ (s2 + 0.5 * np.eye(2)))


def test_a_significant_imaginary_component_raises():
    # not covariances: the product has a negative eigenvalue, so its square root is imaginary
    with pytest.raises(ValueError, match="Imaginary component"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_the_imaginary_check_uses_atol_1e_3_on_the_diagonal(monkeypatch):
    s = np.eye(2)
    monkeypatch.setattr(frechet, "_sqrtm", lambda a: np.eye(2) + 1e-4j * np.eye(2))
    assert frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0.0)  # .real is used
    monkeypatch.setattr(frechet, "_sqrtm", lambda a: np.eye(2) + 0.5j * np.eye(2))
    with pytest.raises(ValueError, match="Imaginary component 0.5"):
        frechet_distance(np.zeros(2), s, np.zeros(2), s)


def test_no_scipy_warnings_for_singular_input():
    s = np.diag([1.0, 0.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither disp's DeprecationWarning nor LinAlgWarning
        assert frechet_distance(np.zeros(3), s, np.ones(3), s) == pytest.approx(3.0)


def test_mismatched_dimensions_raise():
    with pytest.raises(ValueError, match="different lengths"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------- statistics files

def test_statistics_are_pytorch_fids():
    x = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = statistics(x)
    np.testing.assert_array_equal(mu, np.mean(x, axis=0))
    np.testing.assert_array_equal(sigma, np.cov(x, rowvar=False))
    with pytest.raises(UserError, match="at least 2 images"):
        statistics(x[:1])


def test_stats_round_trip_as_pytorch_fid_files(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.normal(size=5).astype(np.float32), random_spd(rng, 5)
    path = save_stats(tmp_path / "s.npz", mu, sigma)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no temp file left behind
    with np.load(path) as f:  # what pytorch-fid reads: f["mu"], f["sigma"]
        assert sorted(f.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(f["mu"], mu)
        np.testing.assert_array_equal(f["sigma"], sigma)
    with zipfile.ZipFile(path) as z:  # np.savez_compressed, as pytorch-fid writes
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    # and a file written the way pytorch-fid writes it loads
    np.savez_compressed(tmp_path / "theirs.npz", mu=mu, sigma=sigma)
    loaded = load_stats(tmp_path / "theirs.npz")
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)


def test_load_stats_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(2))
    with pytest.raises(UserError, match="no 'mu'"):
        load_stats(tmp_path / "nomu.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(UserError, match="not a readable"):
        load_stats(tmp_path / "junk.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(UserError, match=r"mu must be \(D,\)"):
        load_stats(tmp_path / "shape.npz")
    with pytest.raises(UserError, match="does not exist"):
        save_stats(tmp_path / "no" / "s.npz", np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- the FID Inception network

@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory):
    """A weights file in pytorch-fid's layout holding random weights (the real one cannot be fetched here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


def test_the_layout_is_pytorch_fids_weights_file():
    state = FIDInceptionV3().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Conv2d_1a_3x3.bn.running_var"] == (32,)
    assert shapes["Conv2d_4a_3x3.conv.weight"] == (192, 80, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert shapes["Mixed_7b.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    assert not any(k.startswith("AuxLogits") for k in shapes)  # aux_logits=False
    assert not any(k.endswith(".conv.bias") for k in shapes)  # BasicConv2d: conv without bias
    # 94 BasicConv2d (conv.weight + 5 BatchNorm entries each) and fc
    assert len(shapes) == 94 * 6 + 2
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with
    # 1008 instead of 1000 classes (+8 * 2049) that leaves 23,850,960
    assert sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k and "num_batches" not in k) \
        == 27_161_264 - 3_326_696 + 8 * 2049


def test_load_fid_inception_and_extract_pool3_features(fake_inception, tmp_path):
    model = load_fid_inception(fake_inception)
    assert not model.training
    with torch.inference_mode():
        features = model(torch.rand(2, 3, 20, 24))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    # a file without BatchNorm counters (saved before torch 0.4.1) loads as torch's own loader allows
    state = torch.load(fake_inception, weights_only=True)
    torch.save({k: v for k, v in state.items() if "num_batches_tracked" not in k}, tmp_path / "old.pth")
    with torch.inference_mode():
        torch.testing.assert_close(load_fid_inception(tmp_path / "old.pth")(torch.ones(1, 3, 8, 8)),
                                   model(torch.ones(1, 3, 8, 8)))
    # another network's file is refused, by name
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    del state["fc.bias"]
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(UserError, match="missing fc.bias; unexpected AuxLogits.fc.weight"):
        load_fid_inception(tmp_path / "other.pth")


def test_missing_inception_weights_name_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as e:
        load_fid_inception()
    message = str(e.value)
    assert FID_WEIGHTS_URL in message and "--inception" in message
    assert str(tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth") in message
    with pytest.raises(UserError, match="--inception .*nope.pth does not exist"):
        load_fid_inception(tmp_path / "nope.pth")


def test_inception_inputs_grayscale_and_mixed_sizes(fake_inception):
    space = InceptionSpace(fake_inception)
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, size=(2, 12, 12, 1), dtype=np.uint8)
    rgb = np.repeat(gray, 3, axis=-1)  # what PIL's convert('RGB') makes of a grayscale image
    np.testing.assert_array_equal(space.features(list(gray), 2), space.features(list(rgb), 2))
    # a folder may mix sizes: each image is resized to 299x299 on its own
    other = rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    mixed = space.features([rgb[0], other], 2)
    np.testing.assert_allclose(mixed, np.concatenate([space.features([rgb[0]], 1), space.features([other], 1)]),
                               rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- FD-digits

def test_the_shipped_classifier_loads_with_its_accuracy():
    model, meta = dc.load_digits_classifier()
    assert meta["format"] == dc.FORMAT and meta["accuracy"] >= 0.97
    assert meta["feature_dim"] == model.feature_dim == 128 and {"seed", "steps"} <= meta.keys()
    images, labels = dc._data()
    _, test = dc.split(meta["seed"], len(labels))
    assert dc.accuracy(model, images[test], labels[test]) == pytest.approx(meta["accuracy"])
    assert model.features(images[:3]).shape == (3, 128)


def test_fd_digits_of_real_digits_is_small_and_of_noise_large():
    images, _ = dc._data()
    subset = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:500]]
    real = dc.fd_digits(subset)
    noise = dc.fd_digits(torch.randn(500, 1, 16, 16, generator=torch.Generator().manual_seed(1)).clamp(-1, 1))
    assert 0 <= real < 2.0 and noise > 10 * real, (real, noise)
    before = dc._reference_stats.cache_info().hits
    assert dc.fd_digits(subset) == real and dc._reference_stats.cache_info().hits > before  # computed once
    assert dc.fd_digits(subset, reference=dc.reference_statistics("test")) < 2 * real + 2


def test_train_classifier_writes_weights_and_metadata(tmp_path):
    model, meta = dc.train_classifier(seed=3, steps=20, out=tmp_path / "c.safetensors")
    loaded, loaded_meta = dc.load_digits_classifier(tmp_path / "c.safetensors")
    assert loaded_meta == meta and meta["steps"] == 20 and meta["seed"] == 3
    x = dc._data()[0][:4]
    torch.testing.assert_close(loaded.features(x), model.features(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    with pytest.raises(UserError, match="does not exist"):
        dc.load_digits_classifier(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- ddpm-perf fid

def run(*args):
    return CliRunner().invoke(main, ["fid", *map(str, args)])


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """.npz files of uint8 NHWC images, as 'ddpm-perf sample --out x.npz' writes them."""
    root = tmp_path_factory.mktemp("fid")
    images, _ = dc._data()
    np.savez(root / "a.npz", images=to_uint8(images[:300]))
    np.savez(root / "b.npz", images=to_uint8(images[300:600]))
    noise = torch.randn(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    np.savez(root / "noise.npz", images=to_uint8(noise))
    return root


def value(result, label):
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{label}: "), result.stdout
    return float(lines[0].split()[-1])


def test_fid_digits_on_two_npz_files(digit_files):
    real = value(run(digit_files / "a.npz", digit_files / "b.npz", "--digits"), "FD-digits")
    noise = value(run(digit_files / "a.npz", digit_files / "noise.npz", "--digits"), "FD-digits")
    assert real < 5 and noise > 10 * real
    # without REFERENCE: the digits data set
    assert value(run(digit_files / "a.npz", "--digits"), "FD-digits") < 5


def test_fid_save_stats_and_image_folders(digit_files, tmp_path):
    out = tmp_path / "a_stats.npz"
    result = run(digit_files / "a.npz", digit_files / "b.npz", "--digits", "--save-stats", out)
    direct = value(result, "FD-digits")
    with np.load(out) as f:
        assert sorted(f.files) == ["mu", "sigma"] and f["mu"].shape == (128,) and f["sigma"].shape == (128, 128)
    assert value(run(out, digit_files / "b.npz", "--digits"), "FD-digits") == direct
    # a folder of PNGs (as 'sample --out DIR' writes) holds the same images as the array
    save_images(np.load(digit_files / "a.npz")["images"][:40], tmp_path / "pngs")
    np.savez(tmp_path / "a40.npz", images=np.load(digit_files / "a.npz")["images"][:40])
    assert run(tmp_path / "pngs", "--digits", "--save-stats", tmp_path / "folder.npz").exit_code == 0
    assert run(tmp_path / "a40.npz", "--digits", "--save-stats", tmp_path / "array.npz").exit_code == 0
    for key in ("mu", "sigma"):
        np.testing.assert_array_equal(np.load(tmp_path / "folder.npz")[key], np.load(tmp_path / "array.npz")[key])


def test_fid_with_inception_weights(fake_inception, tmp_path, monkeypatch):
    images = np.random.default_rng(6).integers(0, 256, size=(3, 10, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=images)
    result = run(tmp_path / "rgb.npz", "--inception", fake_inception, "--save-stats", tmp_path / "s.npz")
    assert result.exit_code == 0 and "wrote" in result.stdout and "2048-d" in result.stdout, result.output
    mu, sigma = load_stats(tmp_path / "s.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    # the full computation (a 2048x2048 sqrtm takes ~15 s on one thread) is tested above on small
    # matrices; here a zero square root checks the plumbing: FID = |mu1 - mu2|^2 + tr s1 + tr s2
    monkeypatch.setattr(frechet, "_sqrtm", lambda a: np.zeros_like(a))
    np.savez(tmp_path / "gray.npz", images=images[:2, :, :, :1])
    got = value(run(tmp_path / "s.npz", tmp_path / "gray.npz", "--inception", fake_inception), "FID")
    mu2, sigma2 = statistics(InceptionSpace(fake_inception).features(list(images[:2, :, :, :1]), 2))
    expected = np.sum((mu - mu2) ** 2) + np.trace(sigma) + np.trace(sigma2)
    assert got == pytest.approx(expected, rel=1e-3)


def test_fid_errors(digit_files, tmp_path, monkeypatch):
    assert_user_error(run(tmp_path / "missing.npz", "--digits"), "missing.npz does not exist")
    assert_user_error(run(digit_files / "a.npz", tmp_path / "missing"), "missing does not exist")
    assert_user_error(run(digit_files / "a.npz"), "give REFERENCE")
    (tmp_path / "x.png").write_bytes(b"")
    assert_user_error(run(digit_files / "a.npz", tmp_path / "x.png", "--digits"), "x.png: give an image folder")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert_user_error(run(digit_files / "a.npz", digit_files / "b.npz"), FID_WEIGHTS_URL, "--inception")
    assert_user_error(run(digit_files / "a.npz", digit_files / "b.npz", "--inception", tmp_path / "x.pth"),
                      FID_WEIGHTS_URL, "x.pth does not exist")
    np.savez(tmp_path / "rgb.npz", images=np.zeros((4, 16, 16, 3), np.uint8))
    assert_user_error(run(tmp_path / "rgb.npz", "--digits"), "16x16 grayscale")
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 16, 16, 1), np.float32))
    assert_user_error(run(tmp_path / "float.npz", "--digits"), "must be uint8")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    assert_user_error(run(tmp_path / "other.npz", "--digits"), "neither 'images' nor 'mu' and 'sigma'")
    np.savez(tmp_path / "one.npz", images=np.zeros((1, 16, 16, 1), np.uint8))
    assert_user_error(run(tmp_path / "one.npz", "--digits"), "at least 2 images")
    save_stats(tmp_path / "big.npz", np.zeros(2048), np.eye(2048))
    assert_user_error(run(tmp_path / "big.npz", "--digits"), "2048-d", "128-d")
    assert_user_error(run(digit_files / "a.npz", "--digits", "--save-stats", tmp_path / "s.txt"), "OUT.npz")
    assert_user_error(run(digit_files / "a.npz", "--digits", "--save-stats", tmp_path / "no" / "s.npz"),
                      "does not exist")
    assert not (tmp_path / "s.txt").exists()
