"""Losses of the N-stage VAE: the analytic KL plus one reconstruction term per stage.

Conventions (explicit, because the official code's scaling is easy to misread):
- Reconstruction terms are per-element means over (B, C, H, W) against the target resized to the
  stage's resolution, times the stage's `loss_weight`. An "l2" stage is the Gaussian negative
  log-likelihood's data term, `mean((x - y)^2) / (2 sigma^2)`.
- The KL is summed over latent dimensions and averaged over the batch, times `kl_weight`.

What the official code's `kl + sigma * mse(stage1) + l1(stage2)`, with sigma = 1 and KL summed then
divided by (batch * latent), is in these weights: stage 1 `loss="l2"`, `sigma = 1/sqrt(2)` (unit
weight on the MSE), stage 2 `loss="l1"`, `loss_weight = 1`, and `kl_weight = 1 / latent_dim`
(1/512 for CelebA). That KL is far weaker than an ELBO's: a per-image-sum ELBO against these
per-element means would be `kl_weight = 2 sigma^2 / (C * H * W)` relative to a unit-weight MSE, i.e.
the official KL is 1/512 where the ELBO asks for 1/49152 at 128x128x3; the official weighting sits
some 96x closer to the prior than a true ELBO. Our presets follow the official code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ModelConfig, StageConfig
from .vae import resize_to

CHARBONNIER_EPS = 1e-3


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dims, averaged over the batch."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()


def reconstruction_loss(x: torch.Tensor, target: torch.Tensor, st: StageConfig) -> torch.Tensor:
    """One stage's unweighted term, as a per-element mean (in fp32, whatever the autocast dtype)."""
    x, target = x.float(), target.float()
    if st.loss == "l2":
        return F.mse_loss(x, target) / (2.0 * st.sigma ** 2)
    if st.loss == "l1":
        return F.l1_loss(x, target)
    if st.loss == "charbonnier":
        return torch.sqrt((x - target).pow(2) + CHARBONNIER_EPS ** 2).mean()
    raise ValueError(f"unknown loss {st.loss!r}")


def nstage_loss(out: dict, x: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and every named term: `kl` (weighted) and `rec_<i>` (weighted) for stages i = 1..N.

    A stage whose loss is "none" (or whose weight is 0) contributes no term, and its `rec_<i>` is
    still reported, detached, as the unweighted MSE so that every stage can be monitored.
    """
    terms: dict[str, torch.Tensor] = {"kl": config.kl_weight * kl_divergence(out["mu"], out["logvar"])}
    total = terms["kl"]
    for i, (img, st) in enumerate(zip(out["images"], config.stages), start=1):
        target = resize_to(x, img.shape[-1])
        if st.loss == "none" or st.loss_weight == 0:
            terms[f"rec_{i}"] = F.mse_loss(img.detach().float(), target.float())
            continue
        terms[f"rec_{i}"] = st.loss_weight * reconstruction_loss(img, target, st)
        total = total + terms[f"rec_{i}"]
    return total, terms
