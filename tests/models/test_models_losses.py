"""Loss terms against hand-computed values on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch

from models import EncoderConfig, ModelConfig, StageConfig, kl_divergence, nstage_loss, reconstruction_loss
from models.losses import CHARBONNIER_EPS

# One 1x1x2x2 image and its target; the differences are 0.5, -1, 2, 0.
X = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])
Y = torch.zeros(1, 1, 2, 2)
DIFFS = [0.5, -1.0, 2.0, 0.0]


def test_l2_is_the_gaussian_data_term_with_sigma():
    mse = sum(d * d for d in DIFFS) / 4  # 5.25 / 4
    for sigma in (0.5, 1.0, 2.0):
        got = reconstruction_loss(X, Y, StageConfig(loss="l2", sigma=sigma))
        assert got.item() == pytest.approx(mse / (2 * sigma ** 2), rel=1e-6)
    # The default sigma = 1/sqrt(2) gives unit weight on the MSE (the official code's scaling).
    assert reconstruction_loss(X, Y, StageConfig(loss="l2")).item() == pytest.approx(mse, rel=1e-6)


def test_l1_by_hand():
    got = reconstruction_loss(X, Y, StageConfig(loss="l1"))
    assert got.item() == pytest.approx(sum(abs(d) for d in DIFFS) / 4, rel=1e-6)  # 3.5 / 4


def test_charbonnier_by_hand():
    got = reconstruction_loss(X, Y, StageConfig(loss="charbonnier"))
    want = sum(math.sqrt(d * d + CHARBONNIER_EPS ** 2) for d in DIFFS) / 4
    assert got.item() == pytest.approx(want, rel=1e-6)
    # A smooth l1: close to it away from zero, and CHARBONNIER_EPS (not 0) at a perfect match.
    assert got.item() == pytest.approx(3.5 / 4, abs=1e-3)
    assert reconstruction_loss(Y, Y, StageConfig(loss="charbonnier")).item() == pytest.approx(CHARBONNIER_EPS)


def test_kl_is_zero_at_the_prior():
    mu, logvar = torch.zeros(4, 8), torch.zeros(4, 8)
    assert kl_divergence(mu, logvar).item() == 0.0


def test_kl_by_hand_nonzero():
    mu = [[1.0, 2.0], [0.0, -1.0]]
    logvar = [[0.0, math.log(2.0)], [-1.0, 0.5]]
    # KL(N(m, v) || N(0, 1)) = (m^2 + v - 1 - log v) / 2 per dim; summed over dims, averaged over the batch.
    per_image = [sum(0.5 * (m * m + math.exp(lv) - 1 - lv) for m, lv in zip(ms, lvs)) for ms, lvs in zip(mu, logvar)]
    want = sum(per_image) / 2
    got = kl_divergence(torch.tensor(mu), torch.tensor(logvar))
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert got.item() > 0
    # bf16 inputs are computed in fp32.
    assert kl_divergence(torch.tensor(mu).bfloat16(), torch.tensor(logvar).bfloat16()).dtype == torch.float32


def _two_stage_config(stage1: StageConfig, stage2: StageConfig, kl_weight: float) -> ModelConfig:
    """A valid 4 px model: a 2 px decoder, then a x2 refiner. Only `kl_weight` and `stages` matter to the loss."""
    return ModelConfig(image_size=4, channels=1, latent_dim=2, norm="none", kl_weight=kl_weight,
                       encoder=EncoderConfig(channels=[2], convs_per_block=1),
                       stages=[stage1, stage2]).validate()


def _out(mu, logvar, images):
    return {"mu": mu, "logvar": logvar, "z": mu, "images": images}


def test_nstage_loss_weights_resizing_and_total():
    # Target 4x4: its 2x2 blocks average to 1, 2, 3, 4, so at stage 1's 2 px it is [[1, 2], [3, 4]].
    x = torch.tensor([[[[0.0, 2.0, 1.0, 3.0], [2.0, 0.0, 3.0, 1.0],
                        [3.0, 3.0, 4.0, 4.0], [3.0, 3.0, 4.0, 4.0]]]])
    img1 = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])  # diff to the 2 px target: 0, 0, 0, 2
    img2 = x + 0.5  # diff 0.5 everywhere at 4 px
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)  # KL = 0.5
    cfg = _two_stage_config(StageConfig(kind="decoder", channels=[2], out_size=2, loss="l2", sigma=1.0, loss_weight=3.0),
                            StageConfig(kind="refiner", upsample=True, loss="l1", loss_weight=0.25), kl_weight=0.1)
    total, terms = nstage_loss(_out(mu, logvar, [img1, img2]), x, cfg)
    assert sorted(terms) == ["kl", "rec_1", "rec_2"]
    assert terms["kl"].item() == pytest.approx(0.1 * 0.5)
    assert terms["rec_1"].item() == pytest.approx(3.0 * (4.0 / 4) / (2 * 1.0 ** 2))  # weight * mse / (2 sigma^2)
    assert terms["rec_2"].item() == pytest.approx(0.25 * 0.5)
    assert total.item() == pytest.approx(0.05 + 1.5 + 0.125)


@pytest.mark.parametrize("off", [dict(loss="none"), dict(loss="l1", loss_weight=0.0)])
def test_a_switched_off_stage_is_reported_but_not_in_the_total(off):
    x = torch.zeros(1, 1, 4, 4)
    img1 = torch.full((1, 1, 2, 2), 2.0, requires_grad=True)  # its MSE is 4
    img2 = torch.full((1, 1, 4, 4), 1.0, requires_grad=True)
    mu, logvar = torch.zeros(1, 2), torch.zeros(1, 2)
    cfg = _two_stage_config(StageConfig(kind="decoder", channels=[2], out_size=2, **off),
                            StageConfig(kind="refiner", upsample=True, loss="l1"), kl_weight=1.0)
    total, terms = nstage_loss(_out(mu, logvar, [img1, img2]), x, cfg)
    assert terms["rec_1"].item() == pytest.approx(4.0)  # unweighted MSE, for monitoring
    assert terms["rec_1"].grad_fn is None
    assert total.item() == pytest.approx(1.0)  # kl 0 + l1 of stage 2
    total.backward()
    assert img1.grad is None and img2.grad is not None
