"""The architecture schema: one small dataclass for the encoder, one per stage, one for the model.

This is the single definition of a model's shape. The trainer's config embeds `ModelConfig` and an
export's `config.json` stores `dataclasses.asdict(ModelConfig)`; neither redefines it.

Validation happens in `validate()` (called by `NStageVAE.__init__` and by the trainer at start-up),
so a bad value fails when the model is built, naming the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

NORMS = ("batch", "group", "none")
STAGE_KINDS = ("decoder", "refiner")
LOSSES = ("l2", "l1", "charbonnier", "none")


@dataclass
class EncoderConfig:
    # One down block per entry. With convs_per_block=2 a block is a 3x3 stride-1 conv then a 3x3
    # stride-2 conv (the official CelebA code); with 1 it is a single 3x3 stride-2 conv (the paper's MNIST).
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    convs_per_block: int = 2


@dataclass
class StageConfig:
    # "decoder": stage 1, a fully connected layer and stride-2 transposed convs from z to an image.
    # "refiner": an SRResNet-like residual refiner from the previous stage's image to a sharper one.
    kind: str = "refiner"
    # decoder: transposed-conv widths, starting from the FC's feature map (one x2 step each).
    channels: list[int] = field(default_factory=lambda: [256, 128, 64])
    # decoder: output resolution; 0 means the model's image_size.
    out_size: int = 0
    # refiner: width, residual blocks (paper: 5), and whether the stage doubles the resolution.
    width: int = 64
    num_blocks: int = 5
    upsample: bool = False
    # The stage's own loss against the target resized to this stage's resolution. "none" turns it
    # off: a refiner with a loss and a decoder with "none" is the paper's deep residual VAE.
    loss: str = "l2"
    loss_weight: float = 1.0
    # Gaussian likelihood scale for loss == "l2": the term is loss_weight * mean((x - y)^2) / (2 sigma^2).
    # sigma^2 = 1/2 gives unit weight on the per-element MSE, which is what the official code uses.
    sigma: float = 0.7071067811865476
    # Stop the gradient between this stage and the previous one (the paper trains jointly: False).
    detach_input: bool = False


@dataclass
class ModelConfig:
    image_size: int = 128
    channels: int = 3
    latent_dim: int = 512
    norm: str = "batch"  # batch | group | none
    act_slope: float = 0.3  # LeakyReLU slope of the official code
    # Weight on KL(q(z|x) || N(0, I)), summed over latent dims and averaged over the batch, while the
    # reconstruction terms are per-element means. The official code's "KL / (batch * latent)" is
    # kl_weight = 1 / latent_dim; a true ELBO with per-pixel sigma is kl_weight = 2 sigma^2 / (C * H * W).
    kl_weight: float = 1.0 / 512
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(kind="decoder")])

    def validate(self) -> "ModelConfig":
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"model.{name}: {msg}")

        if self.image_size < 4:
            raise bad("image_size", f"must be >= 4, got {self.image_size}")
        if self.channels not in (1, 3):
            raise bad("channels", f"must be 1 or 3, got {self.channels}")
        if self.latent_dim < 1:
            raise bad("latent_dim", f"must be >= 1, got {self.latent_dim}")
        if self.norm not in NORMS:
            raise bad("norm", f"unknown norm {self.norm!r}; allowed: {', '.join(NORMS)}")
        if self.kl_weight < 0:
            raise bad("kl_weight", f"must be >= 0, got {self.kl_weight}")
        enc = self.encoder
        if not enc.channels or any(c < 1 for c in enc.channels):
            raise bad("encoder.channels", f"need at least one positive width, got {enc.channels}")
        if enc.convs_per_block not in (1, 2):
            raise bad("encoder.convs_per_block", f"must be 1 or 2, got {enc.convs_per_block}")
        if len(self.stages) < 1:
            raise bad("stages", "need N >= 1 stages (stage 1 is the decoder); got 0")
        res = None
        for i, s in enumerate(self.stages):
            where = f"stages[{i}]"
            if s.kind not in STAGE_KINDS:
                raise bad(f"{where}.kind", f"unknown kind {s.kind!r}; allowed: {', '.join(STAGE_KINDS)}")
            if (i == 0) != (s.kind == "decoder"):
                raise bad(f"{where}.kind", "stage 1 must be the 'decoder' and every later stage a 'refiner'")
            if s.loss not in LOSSES:
                raise bad(f"{where}.loss", f"unknown loss {s.loss!r}; allowed: {', '.join(LOSSES)}")
            if s.loss_weight < 0 or s.sigma <= 0:
                raise bad(where, f"loss_weight must be >= 0 and sigma > 0, got {s.loss_weight}, {s.sigma}")
            if s.kind == "decoder":
                if not s.channels or any(c < 1 for c in s.channels):
                    raise bad(f"{where}.channels", f"need at least one positive width, got {s.channels}")
                res = s.out_size or self.image_size
                if res < 2 ** len(s.channels):
                    raise bad(f"{where}.out_size", f"{res} px cannot come from {len(s.channels)} stride-2 "
                              f"steps; use at least {2 ** len(s.channels)} px or fewer channels")
            else:
                if s.width < 1 or s.num_blocks < 0:
                    raise bad(where, f"width must be >= 1 and num_blocks >= 0, got {s.width}, {s.num_blocks}")
                res = res * 2 if s.upsample else res
        if res != self.image_size:
            sizes = self.stage_sizes(check=False)
            raise bad("stages", f"the last stage outputs {res} px but image_size is {self.image_size} "
                      f"(stage sizes {sizes}); set stages[0].out_size or the refiners' upsample flags so they reach it")
        if not any(s.loss != "none" and s.loss_weight > 0 for s in self.stages):
            raise bad("stages", "every stage's loss is off; at least one stage needs a reconstruction loss")
        return self

    def stage_sizes(self, check: bool = True) -> list[int]:
        """Output resolution of every stage."""
        if check:
            self.validate()
        res = self.stages[0].out_size or self.image_size
        sizes = [res]
        for s in self.stages[1:]:
            res = res * 2 if s.upsample else res
            sizes.append(res)
        return sizes

    def encoder_out_size(self) -> int:
        size = self.image_size
        for _ in self.encoder.channels:
            size = math.ceil(size / 2)  # 3x3, stride 2, padding 1
        return size

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of `to_dict`; an unknown field is an error that names it."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"model config: unknown field(s) {sorted(extra)}; known: {sorted(known)}")
        # A section left out keeps its dataclass default (a missing "stages" is one decoder, not zero stages).
        if "encoder" in d:
            _check_fields(EncoderConfig, d["encoder"], "encoder")
            d["encoder"] = EncoderConfig(**d["encoder"])
        if "stages" in d:
            for i, s in enumerate(d["stages"]):
                _check_fields(StageConfig, s, f"stages[{i}]")
            d["stages"] = [StageConfig(**s) for s in d["stages"]]
        return cls(**d)


def _check_fields(klass, d: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(klass)}
    extra = set(d) - known
    if extra:
        raise ValueError(f"model.{where}: unknown field(s) {sorted(extra)}; known: {sorted(known)}")
