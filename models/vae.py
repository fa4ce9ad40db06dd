"""N-stage coarse-to-fine VAE: an encoder, a stage-1 decoder and N-1 residual refiners.

Architecture choices (see also models/config.py):
- The CelebA encoder follows the authors' official code, not the paper's prose: the paper says "four
  layers", the code has `network_depth=4`, which is 3 down blocks (3x3 stride 1, then 3x3 stride 2;
  64/128/256 channels; 128 -> 16 px) plus one fully connected layer to 2 x latent.
- The posterior uses the usual (mu, logvar) parameterisation, not the official std = sqrt(4 sigmoid(s)),
  and the FC layer producing it has no activation (the official code puts a LeakyReLU on it).
- Convs followed by a norm have no bias (the norm's shift replaces it), as in the official code.
- The residual block is conv -> norm -> act -> conv -> norm, then add. The official code feeds the first
  conv's raw output into the second conv; that is a bug we do not repeat.
- Decoder strides land on any resolution: each transposed conv's output_padding is chosen so that
  the sizes retrace the encoder's ceil-halving (28 -> 14 -> 7 -> 4 comes back as 4 -> 7 -> 14 -> 28).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import ModelConfig, StageConfig


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=0.1, eps=1e-5)  # TF decay 0.9 == torch momentum 0.1
    if kind == "group":
        groups = math.gcd(32, channels)
        return nn.GroupNorm(groups, channels, eps=1e-5)
    return nn.Identity()


def conv(cin: int, cout: int, k: int = 3, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        act = lambda: nn.LeakyReLU(cfg.act_slope)  # noqa: E731
        has_bias = cfg.norm == "none"
        layers, cin = [], cfg.channels
        for cout in cfg.encoder.channels:
            if cfg.encoder.convs_per_block == 2:
                layers += [conv(cin, cout, bias=has_bias), make_norm(cfg.norm, cout), act()]
                cin = cout
            layers += [conv(cin, cout, stride=2, bias=has_bias), make_norm(cfg.norm, cout), act()]
            cin = cout
        self.features = nn.Sequential(*layers)
        s = cfg.encoder_out_size()
        self.fc = nn.Linear(cin * s * s, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)  # (B, C, s, s)
        mu, logvar = self.fc(h.flatten(1)).chunk(2, dim=1)  # (B, D) each
        return mu, logvar


class Decoder(nn.Module):
    """Stage 1: z -> FC -> (C0, s, s) -> stride-2 transposed convs -> image in [-1, 1]."""

    def __init__(self, cfg: ModelConfig, st: StageConfig):
        super().__init__()
        out_size = st.out_size or cfg.image_size
        sizes = [out_size]
        for _ in st.channels:
            sizes.append(math.ceil(sizes[-1] / 2))
        sizes = sizes[::-1]  # e.g. [4, 7, 14, 28]
        self.c0, self.s0 = st.channels[0], sizes[0]
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, self.c0 * self.s0 * self.s0, bias=False),
                                nn.LeakyReLU(cfg.act_slope))
        has_bias = cfg.norm == "none"
        layers = []
        widths = list(st.channels) + [cfg.channels]
        for i in range(len(st.channels)):
            cin, cout, last = widths[i], widths[i + 1], i == len(st.channels) - 1
            out_pad = sizes[i + 1] - (2 * sizes[i] - 1)  # 0 or 1: lands exactly on the target size
            layers.append(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=out_pad,
                                             bias=has_bias or last))
            layers += [nn.Tanh()] if last else [make_norm(cfg.norm, cout), nn.LeakyReLU(cfg.act_slope)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = rearrange(self.fc(z), "b (c h w) -> b c h w", c=self.c0, h=self.s0, w=self.s0)
        return self.net(h)


class ResBlock(nn.Module):
    def __init__(self, width: int, norm: str, slope: float):
        super().__init__()
        has_bias = norm == "none"
        self.body = nn.Sequential(conv(width, width, bias=has_bias), make_norm(norm, width), nn.LeakyReLU(slope),
                                  conv(width, width, bias=has_bias), make_norm(norm, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Refiner(nn.Module):
    """An SRResNet-like stage: head conv, K residual blocks, global skip, tail (optionally x2)."""

    def __init__(self, cfg: ModelConfig, st: StageConfig):
        super().__init__()
        w, slope, has_bias = st.width, cfg.act_slope, cfg.norm == "none"
        self.detach_input = st.detach_input
        self.head = nn.Sequential(nn.Conv2d(cfg.channels, w, 5, padding=2), nn.LeakyReLU(slope))
        self.blocks = nn.Sequential(*[ResBlock(w, cfg.norm, slope) for _ in range(st.num_blocks)])
        self.mid = nn.Sequential(conv(w, w, bias=has_bias), make_norm(cfg.norm, w))
        # Official tail: conv to 4w (norm, act), conv to w, conv to C, tanh. With upsampling, the 4w
        # conv feeds a PixelShuffle, as in SRResNet, so the stage doubles its resolution.
        tail = [conv(w, 4 * w, bias=has_bias), make_norm(cfg.norm, 4 * w), nn.LeakyReLU(slope)]
        if st.upsample:
            tail += [nn.PixelShuffle(2), conv(w, w, bias=True)]
        else:
            tail += [conv(4 * w, w, bias=True)]
        tail += [nn.LeakyReLU(slope), conv(w, cfg.channels, bias=True), nn.Tanh()]
        self.tail = nn.Sequential(*tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detach_input:
            x = x.detach()
        h = self.head(x)
        h = h + self.mid(self.blocks(h))  # global skip
        return self.tail(h)


class NStageVAE(nn.Module):
    """Encoder plus a ModuleList of N >= 1 stages; stage 1 decodes z, stage i > 1 refines stage i-1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.encoder = Encoder(config)
        self.stages = nn.ModuleList(
            [Decoder(config, st) if st.kind == "decoder" else Refiner(config, st) for st in config.stages])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> list[torch.Tensor]:
        images = []
        h = z
        for stage in self.stages:
            h = stage(h)
            images.append(h)
        return images

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> dict:
        """Encode, sample z with the reparameterisation (`eps` given, or fresh N(0, I)), decode every stage."""
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        eps = eps.to(mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)  # reparameterisation
        return {"mu": mu, "logvar": logvar, "z": z, "images": self.decode(z)}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> list[torch.Tensor]:
        p = next(self.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=p.device, dtype=torch.float32)
        return self.decode((z * temperature).to(p.dtype))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decode the posterior mean: the deterministic reconstruction."""
        mu, _ = self.encode(x)
        return self.decode(mu)


def resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a target batch to a stage's resolution (area averaging down, bilinear up)."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
