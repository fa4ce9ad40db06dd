"""Discriminators for adversarial refiner stages, and their losses.

The paper's refiners are trained with pixel losses, which give blurry averages; super-resolution adds an
adversarial loss (SRGAN). A stage listed in the trainer's `adv.stages` gets one discriminator at that
stage's resolution. Training settings only: the VAE's architecture (`ModelConfig`, the export's
`config.json`) does not change, and `load_pretrained` never builds these.

The form, and why:
- **PatchGAN** (pix2pix, Isola et al. 2017): 4x4 stride-2 convs then two 4x4 stride-1 convs to a map of
  logits, one per overlapping patch. It judges local texture, which is what a refiner adds on top of the
  coarse stage; it is small (2.8M parameters at width 64 and 128 px, against the VAE's 103M), and it
  works at any input size, so 28 px MNIST and 128 px photos share it.
- **Spectral norm on every conv** (Miyato et al. 2018), and no normalisation layer. It bounds the
  discriminator's Lipschitz constant without a second backward (an R1 penalty needs a gradient of the
  output with respect to the input, with `create_graph`); with no batch statistics, real and generated
  images never share a normaliser, DDP needs no SyncBatchNorm, and per-rank batches give the same
  result as one big batch. Its power-iteration vectors `_u`, `_v` are buffers: checkpointed, restored
  on a skipped step, broadcast by DDP.
- **Hinge loss** by default (SAGAN, BigGAN), the usual pair with spectral norm; `nonsat` is the
  non-saturating logistic loss of the original GAN. (Under hinge, while no logit is past the margin, a
  shift of every logit leaves both losses' gradients unchanged, so the head's bias gets a zero gradient
  and Adam moves it by rounding noise: it shifts the logged `d_real_<i>`/`d_fake_<i>`/`g_adv_<i>` a
  little, never the training gradients. Read `d_real - d_fake`, not either alone.)
- **Feature matching** (Salimans et al. 2016) on the discriminator's own features: an l1 distance
  between the features of real and generated images at every layer, a perceptual-style term that needs
  no pretrained network.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ADV_LOSSES = ("hinge", "nonsat")
DISC_WEIGHTS_NAME = "discriminator.safetensors"
DISC_CONFIG_NAME = "discriminator.json"
DISC_FORMAT_VERSION = 1


@dataclass
class DiscriminatorConfig:
    channels: int = 3  # image channels (the VAE's)
    width: int = 64  # first conv's width; doubles per stride-2 conv, capped at 8 x width
    num_layers: int = 3  # stride-2 convs (3: 70 px patches at 256 px, as pix2pix)
    spectral_norm: bool = True

    def out_size(self, size: int) -> int:
        """Side of the logit map for a `size` px input (0 when the input is too small)."""
        for _ in range(self.num_layers):
            size = (size + 2 - 4) // 2 + 1
        for _ in range(2):
            size = size + 2 - 4 + 1
        return max(size, 0)

    def validate(self, size: int, where: str = "adv") -> "DiscriminatorConfig":
        if self.width < 1 or self.num_layers < 1:
            raise ValueError(f"{where}: width and num_layers must be >= 1, got {self.width}, {self.num_layers}")
        if self.out_size(size) < 1:
            fits = [n for n in range(1, 12) if dataclasses.replace(self, num_layers=n).out_size(size) >= 1]
            hint = f"use adv.num_layers <= {fits[-1]}" if fits else "the stage is too small for a discriminator"
            raise ValueError(f"{where}: num_layers={self.num_layers} leaves no patch to judge at {size} px; {hint}")
        return self


def _conv(cin: int, cout: int, stride: int, sn: bool) -> nn.Module:
    c = nn.Conv2d(cin, cout, 4, stride=stride, padding=1)
    return nn.utils.parametrizations.spectral_norm(c) if sn else c


class PatchDiscriminator(nn.Module):
    """Image in [-1, 1] -> (patch logits (B, 1, h, w), the feature maps after each activation)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        sn, w = cfg.spectral_norm, cfg.width
        widths = [cfg.channels] + [w * min(2 ** i, 8) for i in range(cfg.num_layers)]
        layers = [_conv(widths[i], widths[i + 1], 2, sn) for i in range(cfg.num_layers)]
        layers.append(_conv(widths[-1], w * min(2 ** cfg.num_layers, 8), 1, sn))
        self.layers = nn.ModuleList(layers)
        self.head = _conv(w * min(2 ** cfg.num_layers, 8), 1, 1, sn)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
            feats.append(x)
        return self.head(x), feats


class StageDiscriminators(nn.Module):
    """One `PatchDiscriminator` per adversarial stage, keyed `stage_<i>` (1-based stage number).

    One forward call judges every stage, so that DDP wraps and reduces all of them together."""

    def __init__(self, cfg: DiscriminatorConfig, sizes: dict[int, int]):
        super().__init__()
        self.config, self.sizes = cfg, dict(sizes)
        for i, size in self.sizes.items():
            cfg.validate(size, where=f"adv (stage {i}, {size} px)")
        self.nets = nn.ModuleDict({f"stage_{i}": PatchDiscriminator(cfg) for i in self.sizes})

    def forward(self, images: dict[int, torch.Tensor]) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
        return {i: self.nets[f"stage_{i}"](x) for i, x in images.items()}


# ----------------------------------------------------------------------------- losses
def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss on its logits for real and (detached) generated images, in fp32."""
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "nonsat":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; allowed: {', '.join(ADV_LOSSES)}")


def generator_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term on the discriminator's logits for generated images, in fp32."""
    fake = fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "nonsat":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; allowed: {', '.join(ADV_LOSSES)}")


def feature_matching(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the l1 distance between generated and (detached) real features, in fp32."""
    terms = [F.l1_loss(f.float(), r.detach().float()) for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------- files
def save_discriminators(state: dict[str, torch.Tensor], cfg: DiscriminatorConfig, sizes: dict[int, int],
                        out_dir: str, extra: dict | None = None) -> str:
    """Write `discriminator.safetensors` and `discriminator.json` (written last) into out_dir."""
    from safetensors.torch import save_file

    expected = StageDiscriminators(cfg, sizes).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"discriminator weights do not match adv.*: missing {missing[:5]}, unexpected {unexpected[:5]}")
    os.makedirs(out_dir, exist_ok=True)
    weights, config = os.path.join(out_dir, DISC_WEIGHTS_NAME), os.path.join(out_dir, DISC_CONFIG_NAME)
    save_file({k: v.detach().cpu().float().contiguous() for k, v in state.items()}, weights + ".tmp",
              metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    meta = {"format_version": DISC_FORMAT_VERSION, "discriminator": dataclasses.asdict(cfg),
            "stage_sizes": {str(i): s for i, s in sizes.items()}, **(extra or {})}
    with open(config + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(config + ".tmp", config)
    return out_dir


def has_discriminators(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DISC_CONFIG_NAME))


def load_discriminators(path: str) -> StageDiscriminators:
    """Rebuild the discriminators written by `python -m trainer.export RUN --discriminator`."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, DISC_CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: write it with `python -m trainer.export RUN_DIR --discriminator`")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != DISC_FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {meta.get('format_version')!r} is not supported "
                         f"(this version reads {DISC_FORMAT_VERSION})")
    disc = StageDiscriminators(DiscriminatorConfig(**meta["discriminator"]),
                               {int(i): s for i, s in meta["stage_sizes"].items()})
    disc.load_state_dict(load_file(os.path.join(path, DISC_WEIGHTS_NAME)), strict=True)
    return disc
