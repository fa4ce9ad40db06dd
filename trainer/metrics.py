"""Image metrics for evaluation: reconstruction, sharpness, and FID/KID over Inception features.

Convention: every function here takes float images in [0, 1], shape (B, C, H, W) with C = 1 or 3
(`to_unit` converts uint8 or the models' [-1, 1] output). Per-image functions return a (B,) tensor;
the caller averages over the set (`torchmetrics.MeanMetric` does that across ranks too).

- `mse`, `psnr` (data range 1, per image, MSE floored at 1e-10 so identical images give 100 dB, not inf),
  `ssim` (Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03, per image, via torchmetrics' functional SSIM).
- Sharpness, reported as the ratio of a set's mean to the real images' mean (`sharpness_ratio`), so 1 means
  "as sharp as the data" and a blurry decoder scores below 1:
  - `laplacian_variance`: variance of the 3x3 Laplacian (0 1 0 / 1 -4 1 / 0 1 0) of the grey image
    (channel mean), over the valid region;
  - `high_frequency_energy`: the fraction of the grey image's spectral energy |FFT|^2 (mean removed, so DC
    is excluded) at radial frequency above `cutoff` cycles per pixel. The default 0.25 is half the Nyquist
    frequency; frequencies are in cycles per pixel, so compare sets at the same resolution.
- FID and KID: `DistributionScores` wraps core torchmetrics' `FrechetInceptionDistance` and
  `KernelInceptionDistance`; see `kid_leads` for which of the two to read first.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from trainer.inception import NUM_FEATURES

MSE_FLOOR = 1e-10
# Below this many reference images FID is dominated by its small-sample bias; KID (unbiased) leads.
KID_LEADS_BELOW = 5000
KID_MAX_SUBSET = 1000


def to_unit(x: torch.Tensor, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """uint8 -> [0, 1]; float in `value_range` (e.g. (-1, 1) for model output) -> [0, 1], clamped."""
    if x.dtype == torch.uint8:
        return x.float() / 255
    lo, hi = value_range if value_range is not None else (0.0, 1.0)
    return ((x.float() - lo) / (hi - lo)).clamp(0, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 with rounding (the quantisation FID features are computed on)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check_pair(x, y)
    return (x.float() - y.float()).square().flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse(x, y).clamp_min(MSE_FLOOR))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check_pair(x, y)
    return structural_similarity_index_measure(
        x.float(), y.float(), gaussian_kernel=True, sigma=1.5, kernel_size=11,
        data_range=1.0, k1=0.01, k2=0.03, reduction="none",
    )


def _grey(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean(1, keepdim=True)  # (B, 1, H, W)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_variance(x: torch.Tensor) -> torch.Tensor:
    lap = F.conv2d(_grey(x), _LAPLACIAN.to(x.device).view(1, 1, 3, 3))  # (B, 1, H-2, W-2)
    return lap.flatten(1).var(1, unbiased=False)


def high_frequency_energy(x: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    g = _grey(x)[:, 0]
    g = g - g.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(g.double()).abs().square()  # (B, H, W)
    H, W = g.shape[-2:]
    fy = torch.fft.fftfreq(H, device=x.device, dtype=torch.float64).view(H, 1)
    fx = torch.fft.fftfreq(W, device=x.device, dtype=torch.float64).view(1, W)
    high = (fy.square() + fx.square()).sqrt() > cutoff
    total = power.flatten(1).sum(1)
    # A flat image has no spectral energy at all: call its high-frequency share 0, not nan.
    return ((power * high).flatten(1).sum(1) / total.clamp_min(1e-30)).float()


def sharpness_ratio(values: torch.Tensor | float, real_values: torch.Tensor | float) -> float:
    """Mean sharpness of a set over the real images' mean sharpness."""
    v = torch.as_tensor(values, dtype=torch.float64).mean()
    r = torch.as_tensor(real_values, dtype=torch.float64).mean()
    if r <= 0:
        raise ValueError("the real images have zero sharpness (flat images?), so the ratio is undefined")
    return float(v / r)


def kid_leads(n_real: int) -> tuple[bool, str]:
    """Whether KID should be read before FID for a reference set of `n_real` images, and why."""
    if n_real < KID_LEADS_BELOW:
        return True, (
            f"KID leads: the reference set has {n_real} images (< {KID_LEADS_BELOW}). FID's estimate is biased "
            f"upwards by an amount that depends on the number of images (its {NUM_FEATURES}x{NUM_FEATURES} "
            "covariance is poorly estimated from few samples), so small-set FIDs are neither comparable to "
            "published ones nor to each other at other sizes; KID is unbiased at any size."
        )
    return False, f"FID leads: the reference set has {n_real} images (>= {KID_LEADS_BELOW})."


class PrecomputedFeatures(nn.Module):
    """Identity feature module, so FID and KID can share one Inception pass per image."""

    def __init__(self, num_features: int = NUM_FEATURES):
        super().__init__()
        self.num_features = num_features

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() != 2 or f.shape[1] != self.num_features:
            raise ValueError(f"expected features (B, {self.num_features}), got {tuple(f.shape)}")
        return f.double()


def _global_count(n: torch.Tensor) -> int:
    n = n.detach().clone().long()
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            n = n.cuda()
        dist.all_reduce(n)
    return int(n)


class DistributionScores(nn.Module):
    """FID and KID of one generated set against the real set, from precomputed Inception features.

    `update(features, real=...)` takes (B, 2048) features from `InceptionFeatures`. Under torch.distributed
    each rank updates with its own slice; `compute` gathers (torchmetrics syncs its states). The same real
    feature tensor may be passed to several `DistributionScores` without being copied.
    KID uses subsets of min(1000, n_real, n_fake) images; its subsets are drawn from the global RNG, so
    seed it (torch.manual_seed) for repeatable numbers.
    """

    def __init__(self, num_features: int = NUM_FEATURES, kid_subsets: int = 100):
        super().__init__()
        feature = PrecomputedFeatures(num_features)
        self.fid = FrechetInceptionDistance(feature=feature)
        with warnings.catch_warnings():  # "KID will save all extracted features": yes, that is the design
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(feature=feature, subsets=kid_subsets, subset_size=KID_MAX_SUBSET)

    def update(self, features: torch.Tensor, real: bool) -> None:
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)

    def compute(self, fid: bool = True) -> dict:
        """FID (unless `fid=False`: it costs a 2048x2048 eigendecomposition), KID, counts, and which leads."""
        n_real = _global_count(self.fid.real_features_num_samples)
        n_fake = _global_count(self.fid.fake_features_num_samples)
        if min(n_real, n_fake) < 2:
            raise ValueError(f"FID/KID need at least 2 real and 2 generated images, got {n_real} and {n_fake}")
        self.kid.subset_size = min(KID_MAX_SUBSET, n_real, n_fake)
        kid_mean, kid_std = self.kid.compute()
        leads_kid, why = kid_leads(n_real)
        out = {"fid": float(self.fid.compute())} if fid else {}
        return out | {
            "kid": float(kid_mean),
            "kid_std": float(kid_std),
            "kid_subset_size": self.kid.subset_size,
            "n_real": n_real,
            "n_fake": n_fake,
            "lead": "kid" if leads_kid else "fid",
            "lead_reason": why,
        }
