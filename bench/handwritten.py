"""The hand-written reference for bench/train.py: celeba128_msvae's layer list as plain nn.Sequentials.

The same layers, parameters and FLOPs as `NStageVAE(MODEL_PRESETS["celeba128_msvae"]())`
(tests/bench checks both), written out as they would be by hand, with the official code's loss
`kl + mse(stage 1) + l1(stage 2)` (KL summed, then divided by batch x latent). The step is the bare
minimum: forward under autocast, loss, backward, Adam step (fused); no EMA, no logging, no host
sync. bench/train.py runs it channels_last with cudnn.benchmark on, on batches already on the device.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LATENT, SLOPE = 512, 0.3


def conv_bn_act(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(SLOPE)]


def up_bn_act(cin: int, cout: int) -> list[nn.Module]:  # x2: 16 -> 32 -> 64 -> 128
    return [nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.LeakyReLU(SLOPE)]


class Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def res_block() -> Residual:
    return Residual(*conv_bn_act(64, 64), nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64))


class HandwrittenVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(  # 128 -> 64 -> 32 -> 16 px, then one FC to (mu, logvar)
            *conv_bn_act(3, 64), *conv_bn_act(64, 64, 2), *conv_bn_act(64, 128), *conv_bn_act(128, 128, 2),
            *conv_bn_act(128, 256), *conv_bn_act(256, 256, 2), nn.Flatten(), nn.Linear(256 * 16 * 16, 2 * LATENT))
        self.decoder = nn.Sequential(
            nn.Linear(LATENT, 256 * 16 * 16, bias=False), nn.LeakyReLU(SLOPE), nn.Unflatten(1, (256, 16, 16)),
            *up_bn_act(256, 128), *up_bn_act(128, 64), nn.ConvTranspose2d(64, 3, 3, 2, 1, output_padding=1),
            nn.Tanh())
        self.refiner = nn.Sequential(  # all at 128 px
            nn.Conv2d(3, 64, 5, 1, 2), nn.LeakyReLU(SLOPE),
            Residual(*[res_block() for _ in range(5)], nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)),
            *conv_bn_act(64, 256), nn.Conv2d(256, 64, 3, 1, 1), nn.LeakyReLU(SLOPE), nn.Conv2d(64, 3, 3, 1, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, 512) each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        coarse = self.decoder(z)
        return mu, logvar, coarse, self.refiner(coarse)


def official_loss(x: torch.Tensor, mu, logvar, coarse, fine) -> torch.Tensor:
    mu, logvar = mu.float(), logvar.float()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()  # sum / (batch x latent)
    return kl + F.mse_loss(coarse.float(), x.float()) + F.l1_loss(fine.float(), x.float())


def make_optimizer(model: nn.Module, device: str, lr: float, betas, weight_decay: float) -> torch.optim.Adam:
    # As the trainer (outside DeepSpeed): fused, on GPUs and on CPU. `device` only documents where it runs.
    return torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, dtype: torch.dtype | None) -> None:
    with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x)
    official_loss(x, *out).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
