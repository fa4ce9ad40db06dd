"""Model presets: a dict of functions returning the architecture schema (`ModelConfig`).

`vae` is one stage; `resvae` is the decoder plus a 5-block refiner with a single loss on the final
image (the paper's deep residual VAE); `msvae` is two stages, l2 then l1; `msvae3` adds a third
stage and raises resolution on the way (coarse at half size, x2 refiner, then a full-size refiner).
Any other N comes from config alone: edit `stages`.

    model = NStageVAE(MODEL_PRESETS["celeba128_msvae"]())
"""
from __future__ import annotations

from .config import EncoderConfig, ModelConfig, StageConfig


def _decoder(channels, out_size=0, loss="l2"):
    return StageConfig(kind="decoder", channels=list(channels), out_size=out_size, loss=loss)


def _refiner(width, loss="l1", upsample=False, num_blocks=5):
    return StageConfig(kind="refiner", width=width, num_blocks=num_blocks, upsample=upsample, loss=loss)


# --- CelebA 128x128: the official code's layer list (about 103M parameters for msvae) ---
def _celeba(stages):
    return ModelConfig(image_size=128, channels=3, latent_dim=512, norm="batch", kl_weight=1.0 / 512,
                       encoder=EncoderConfig(channels=[64, 128, 256], convs_per_block=2), stages=stages)


def celeba128_vae():
    return _celeba([_decoder([256, 128, 64])])


def celeba128_resvae():
    return _celeba([_decoder([256, 128, 64], loss="none"), _refiner(64, loss="l2")])


def celeba128_msvae():
    return _celeba([_decoder([256, 128, 64]), _refiner(64)])


def celeba128_msvae3():
    return _celeba([_decoder([256, 128, 64], out_size=64), _refiner(64, upsample=True), _refiner(64)])


# --- MNIST 28x28: three stride-2 convs, latent 128, three transposed convs ---
def _mnist(stages):
    return ModelConfig(image_size=28, channels=1, latent_dim=128, norm="batch", kl_weight=1.0 / 128,
                       encoder=EncoderConfig(channels=[32, 64, 128], convs_per_block=1), stages=stages)


def mnist_vae():
    return _mnist([_decoder([128, 64, 32])])


def mnist_resvae():
    return _mnist([_decoder([128, 64, 32], loss="none"), _refiner(32, loss="l2")])


def mnist_msvae():
    return _mnist([_decoder([128, 64, 32]), _refiner(32)])


def mnist_msvae3():
    return _mnist([_decoder([128, 64, 32], out_size=14), _refiner(32, upsample=True), _refiner(32)])


MODEL_PRESETS = {
    "mnist_vae": mnist_vae,
    "mnist_resvae": mnist_resvae,
    "mnist_msvae": mnist_msvae,
    "mnist_msvae3": mnist_msvae3,
    "celeba128_vae": celeba128_vae,
    "celeba128_resvae": celeba128_resvae,
    "celeba128_msvae": celeba128_msvae,
    "celeba128_msvae3": celeba128_msvae3,
}
