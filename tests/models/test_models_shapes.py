"""Shapes, sampling and reconstruction of the N-stage VAE on tiny CPU configs."""
from __future__ import annotations

import pytest
import torch

from models import MODEL_PRESETS, ModelConfig, NStageVAE, nstage_loss


def _check_forward(model: NStageVAE, x: torch.Tensor) -> dict:
    cfg = model.config
    out = model(x)
    B = x.shape[0]
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (B, cfg.latent_dim)
    assert len(out["images"]) == cfg.num_stages
    for img, size in zip(out["images"], cfg.stage_sizes()):
        assert img.shape == (B, cfg.channels, size, size)
        assert img.abs().max() <= 1.0  # tanh output, the data's range
    assert out["images"][-1].shape == x.shape
    return out


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_mnist_size_shapes_n_stages(make_config, images, n, size):
    torch.manual_seed(0)
    cfg = make_config(n_stages=n, image_size=size)
    model = NStageVAE(cfg)
    x = images(2, 1, size)
    out = _check_forward(model, x)
    loss, terms = nstage_loss(out, x, cfg)
    assert sorted(terms) == sorted(["kl"] + [f"rec_{i}" for i in range(1, n + 1)])
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_128px_shapes_n_stages(make_config, images, n):
    torch.manual_seed(0)
    # Reduced widths, the CelebA layout otherwise: 3 channels, two convs per down block, 128 -> 16 px.
    cfg = make_config(n_stages=n, image_size=128, channels=3, convs_per_block=2, enc=(4, 8, 8), dec=(8, 8, 4),
                      width=4)
    _check_forward(NStageVAE(cfg), images(2, 3, 128))


def test_128px_stage_raises_resolution(make_config, images):
    """Coarse 64 px, a x2 refiner to 128, then a full-size refiner (the msvae3 layout)."""
    cfg = make_config(n_stages=3, image_size=128, channels=3, out_size=64, upsample=(2,), enc=(4, 8, 8),
                      dec=(8, 8, 4), width=4)
    assert cfg.stage_sizes() == [64, 128, 128]
    _check_forward(NStageVAE(cfg), images(2, 3, 128))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_n_stages_from_config_alone_forward_backward_128px(images, n):
    """Any N comes from a plain dict (what a YAML/JSON config gives), with no code change."""
    torch.manual_seed(n)
    d = {
        "image_size": 128, "channels": 3, "latent_dim": 16, "norm": "group", "kl_weight": 1.0 / 16,
        "encoder": {"channels": [4, 8, 8], "convs_per_block": 2},
        "stages": [{"kind": "decoder", "channels": [8, 8, 4], "loss": "l2"}]
        + [{"kind": "refiner", "width": 4, "num_blocks": 1, "loss": "l1"} for _ in range(n - 1)],
    }
    cfg = ModelConfig.from_dict(d)
    model = NStageVAE(cfg)
    assert len(model.stages) == n
    x = images(2, 3, 128)
    out = _check_forward(model, x)
    loss, _ = nstage_loss(out, x, cfg)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_output_shapes(name):
    """Real preset widths; the CelebA ones run on the meta device (shapes without the 25 GFLOP)."""
    cfg = MODEL_PRESETS[name]()
    device = "meta" if cfg.image_size == 128 else "cpu"
    with torch.device(device):
        model = NStageVAE(cfg)
        x = torch.zeros(2, cfg.channels, cfg.image_size, cfg.image_size)
    out = model(x)
    assert [img.shape[-1] for img in out["images"]] == cfg.stage_sizes()
    assert all(img.shape[:2] == (2, cfg.channels) for img in out["images"])
    assert out["mu"].shape == (2, cfg.latent_dim)


@pytest.mark.parametrize("size", [28, 20, 36, 17, 32])
def test_decoder_lands_exactly_on_size(make_config, images, size):
    """Three stride-2 steps retrace the encoder's ceil-halving: 28 -> 14 -> 7 -> 4 comes back to 28, not 32."""
    cfg = make_config(n_stages=1, image_size=size)
    model = NStageVAE(cfg)
    assert model.encoder.features(images(1, 1, size)).shape[-1] == cfg.encoder_out_size()
    img = model.decode(torch.zeros(1, cfg.latent_dim))[0]
    assert img.shape == (1, 1, size, size)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_norm_variants_build_and_run(make_config, images, norm):
    torch.manual_seed(0)
    cfg = make_config(n_stages=2, norm=norm, enc=(8, 16, 24), dec=(24, 16, 8), width=12)
    model = NStageVAE(cfg)
    kinds = {type(m) for m in model.modules()}
    assert (torch.nn.BatchNorm2d in kinds) == (norm == "batch")
    assert (torch.nn.GroupNorm in kinds) == (norm == "group")
    if norm == "none":  # without a norm's shift the convs need their own bias
        convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        assert all(c.bias is not None for c in convs)
    x = images(2, 1, 28)
    out = _check_forward(model, x)
    nstage_loss(out, x, cfg)[0].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        _check_forward(model, x)


def test_seeded_sampling_is_deterministic(make_config):
    torch.manual_seed(0)
    model = NStageVAE(make_config(n_stages=3)).eval()
    a = model.sample(4, generator=torch.Generator().manual_seed(123))
    b = model.sample(4, generator=torch.Generator().manual_seed(123))
    c = model.sample(4, generator=torch.Generator().manual_seed(124))
    assert len(a) == 3 and all(img.shape == (4, 1, 28, 28) for img in a)
    assert all(torch.equal(i, j) for i, j in zip(a, b))
    assert not torch.equal(a[-1], c[-1])
    assert not a[-1].requires_grad


def test_forward_with_given_eps_is_deterministic(make_config, images):
    torch.manual_seed(0)
    model = NStageVAE(make_config(n_stages=2)).eval()
    x = images(3, 1, 28)
    eps = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    a, b = model(x, eps=eps), model(x, eps=eps)
    c = model(x, eps=torch.randn(3, 8, generator=torch.Generator().manual_seed(8)))
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["images"][-1], b["images"][-1])
    assert not torch.equal(a["z"], c["z"])
    # z is the reparameterised sample mu + eps * exp(logvar / 2).
    torch.testing.assert_close(a["z"], a["mu"] + eps * torch.exp(0.5 * a["logvar"]))
    assert not torch.equal(model(x)["z"], model(x)["z"])  # no eps: a fresh draw each call


def test_reconstruct_uses_mu_and_decode_returns_every_stage(make_config, images):
    torch.manual_seed(0)
    cfg = make_config(n_stages=3, out_size=14, upsample=(2,))
    model = NStageVAE(cfg).eval()
    x = images(2, 1, 28)
    r1, r2 = model.reconstruct(x), model.reconstruct(x)
    assert len(r1) == 3 and all(torch.equal(i, j) for i, j in zip(r1, r2))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        assert mu.shape == logvar.shape == (2, cfg.latent_dim)
        from_mu = model.decode(mu)
        sampled = model(x)["images"]
        at_mean = model(x, eps=torch.zeros(2, cfg.latent_dim))["images"]
    assert all(torch.equal(i, j) for i, j in zip(r1, from_mu))
    assert all(torch.equal(i, j) for i, j in zip(r1, at_mean))
    assert not torch.equal(r1[-1], sampled[-1])  # forward samples z; reconstruct does not
    assert [img.shape[-1] for img in from_mu] == [14, 28, 28]


def test_bf16_autocast_forward_and_backward(make_config, images):
    torch.manual_seed(0)
    cfg = make_config(n_stages=3, out_size=14, upsample=(2,), losses={3: "charbonnier"})
    model = NStageVAE(cfg)
    x = images(2, 1, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss, terms = nstage_loss(out, x, cfg)
    assert out["images"][-1].dtype == torch.bfloat16  # autocast really ran the convs in bf16
    assert all(torch.isfinite(img.float()).all() for img in out["images"])
    assert torch.isfinite(out["mu"].float()).all() and torch.isfinite(out["logvar"].float()).all()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
