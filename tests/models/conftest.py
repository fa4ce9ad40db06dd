"""Shared helpers for the model tests: tiny architectures that run in milliseconds on a CPU."""
from __future__ import annotations

import pytest
import torch

from models import EncoderConfig, ModelConfig, StageConfig


def tiny_config(n_stages: int = 2, image_size: int = 28, channels: int = 1, norm: str = "batch",
                out_size: int = 0, upsample: tuple[int, ...] = (), detach: tuple[int, ...] = (),
                losses: dict[int, str] | None = None, latent_dim: int = 8, enc=(8, 16, 16), convs_per_block: int = 1,
                dec=(16, 8, 8), width: int = 8, num_blocks: int = 1) -> ModelConfig:
    """A small N-stage config. `upsample`/`detach` hold 1-based stage indices; `losses` maps index -> loss."""
    losses = losses or {}
    stages = [StageConfig(kind="decoder", channels=list(dec), out_size=out_size, loss=losses.get(1, "l2"))]
    for i in range(2, n_stages + 1):
        stages.append(StageConfig(kind="refiner", width=width, num_blocks=num_blocks, upsample=i in upsample,
                                  detach_input=i in detach, loss=losses.get(i, "l1")))
    return ModelConfig(image_size=image_size, channels=channels, latent_dim=latent_dim, norm=norm,
                       kl_weight=1.0 / latent_dim, encoder=EncoderConfig(channels=list(enc), convs_per_block=convs_per_block),
                       stages=stages)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs on a shared 2-core machine run ~40x faster on one intra-op thread than on two contended
    ones; restore the setting so that other test folders are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture
def images():
    """`images(B, C, S)`: a seeded batch in [-1, 1], the models' pixel range."""
    def make(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(batch, channels, size, size, generator=g) * 2 - 1
    return make
