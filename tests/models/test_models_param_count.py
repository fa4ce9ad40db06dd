"""The CelebA 128 px presets' parameter counts against a hand count of the official layer list.

Layer list: shared/reference/official-code.md, with the deviations recorded in models/vae.py's docstring
(bias-free convs before a norm; the posterior FC has a bias and no activation; the last transposed conv
and the refiner's last two convs have a bias and no norm). BatchNorm contributes 2 parameters per channel
(weight and bias; running statistics are buffers). Written out term by term, independent of the model code.
"""
from __future__ import annotations

import torch

from models import MODEL_PRESETS, NStageVAE


def conv(cin, cout, k=3, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


ENCODER = (
    # block 1, 128 -> 64 px: 3x3 stride 1 (3 -> 64), 3x3 stride 2 (64 -> 64), each conv -> BN -> LeakyReLU
    conv(3, 64) + bn(64) + conv(64, 64) + bn(64)
    # block 2, 64 -> 32 px
    + conv(64, 128) + bn(128) + conv(128, 128) + bn(128)
    # block 3, 32 -> 16 px
    + conv(128, 256) + bn(256) + conv(256, 256) + bn(256)
    # FC from the flattened 256 x 16 x 16 map to 2 x 512 (mu, logvar), with bias
    + 256 * 16 * 16 * 2 * 512 + 2 * 512
)
DECODER = (
    # FC 512 -> 256 x 16 x 16, no bias
    512 * 256 * 16 * 16
    # transposed 3x3 stride 2: 256 -> 128 (BN), 128 -> 64 (BN), 64 -> 3 (bias, tanh)
    + conv(256, 128) + bn(128) + conv(128, 64) + bn(64) + conv(64, 3, bias=True)
)
REFINER = (
    # head: 5x5 conv 3 -> 64 with bias, no BN
    conv(3, 64, k=5, bias=True)
    # 5 residual blocks: (3x3 conv 64 -> 64, BN) twice
    + 5 * 2 * (conv(64, 64) + bn(64))
    # mid: 3x3 conv 64 -> 64, BN (before the global skip)
    + conv(64, 64) + bn(64)
    # tail: 3x3 conv 64 -> 256 (BN), 3x3 conv 256 -> 64 (bias), 3x3 conv 64 -> 3 (bias), tanh
    + conv(64, 256) + bn(256) + conv(256, 64, bias=True) + conv(64, 3, bias=True)
)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_celeba128_msvae_parameter_count_matches_hand_count():
    with torch.device("meta"):  # shapes only: no 400 MB of fp32 initialisation
        model = NStageVAE(MODEL_PRESETS["celeba128_msvae"]())
    assert ENCODER == 68_256_192 and DECODER == 33_925_187 and REFINER == 708_995  # the arithmetic above
    assert _count(model.encoder) == ENCODER
    assert _count(model.stages[0]) == DECODER
    assert _count(model.stages[1]) == REFINER
    total = _count(model)
    assert total == ENCODER + DECODER + REFINER == 102_890_374
    assert 102e6 < total < 104e6  # "about 103M"; the two FC layers hold 98% of it
    assert (256 * 16 * 16 * 2 * 512 + 512 * 256 * 16 * 16) / total > 0.97


def test_celeba128_vae_and_resvae_counts():
    with torch.device("meta"):
        vae = NStageVAE(MODEL_PRESETS["celeba128_vae"]())
        resvae = NStageVAE(MODEL_PRESETS["celeba128_resvae"]())
    assert _count(vae) == ENCODER + DECODER
    assert _count(resvae) == ENCODER + DECODER + REFINER  # same layers as msvae; only the losses differ
