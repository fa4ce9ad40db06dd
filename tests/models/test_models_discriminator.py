"""The adversarial stages' discriminators (models/discriminator.py): shapes at 28 and 128 px, the size check,
the hinge and non-saturating losses, feature matching, spectral norm, and the discriminator files.

    pytest tests/models/test_models_discriminator.py       # seconds
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from models.discriminator import (ADV_LOSSES, DISC_CONFIG_NAME, DISC_WEIGHTS_NAME, DiscriminatorConfig,
                                  PatchDiscriminator, StageDiscriminators, discriminator_loss, feature_matching,
                                  generator_loss, has_discriminators, load_discriminators, save_discriminators)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _convs(net: PatchDiscriminator) -> list[torch.nn.Module]:
    return [*net.layers, net.head]


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("size, channels, num_layers, feat_sizes, side", [
    (28, 1, 2, [14, 7, 6], 5),  # MNIST: mnist_msvae_adv.yaml's 5 x 5 map
    (28, 1, 3, [14, 7, 3, 2], 1),  # the most stride-2 convs that fit at 28 px
    (128, 3, 3, [64, 32, 16, 15], 14),  # the celeba128/photo128 presets
])
def test_patch_logits_and_feature_shapes(images, size, channels, num_layers, feat_sizes, side):
    cfg = DiscriminatorConfig(channels=channels, width=8, num_layers=num_layers)
    assert cfg.out_size(size) == side
    logits, feats = PatchDiscriminator(cfg)(images(2, channels, size))
    assert logits.shape == (2, 1, side, side)
    widths = [8 * min(2 ** i, 8) for i in range(num_layers)] + [8 * min(2 ** num_layers, 8)]
    assert [tuple(f.shape) for f in feats] == [(2, w, s, s) for w, s in zip(widths, feat_sizes)]
    assert torch.isfinite(logits).all()


def test_width_doubles_per_stride_2_conv_up_to_8x():
    net = PatchDiscriminator(DiscriminatorConfig(channels=3, width=4, num_layers=5, spectral_norm=False))
    assert [c.out_channels for c in _convs(net)] == [4, 8, 16, 32, 32, 32, 1]
    assert [c.stride for c in _convs(net)] == [(2, 2)] * 5 + [(1, 1)] * 2


def test_stage_discriminators_judge_each_stage_at_its_own_size(images):
    cfg = DiscriminatorConfig(channels=3, width=8, num_layers=3)
    disc = StageDiscriminators(cfg, {2: 64, 3: 128})
    assert sorted(disc.nets) == ["stage_2", "stage_3"]
    out = disc({2: images(2, 3, 64), 3: images(2, 3, 128, seed=1)})
    assert sorted(out) == [2, 3]
    assert out[2][0].shape == (2, 1, cfg.out_size(64), cfg.out_size(64)) == (2, 1, 6, 6)
    assert out[3][0].shape == (2, 1, 14, 14)
    # one independent network per stage
    heads = [disc.nets[f"stage_{i}"].head.parametrizations.weight.original for i in (2, 3)]
    assert not torch.equal(*heads)


# ----------------------------------------------------------------------------- the size check
def test_validate_names_the_largest_num_layers_that_fits():
    with pytest.raises(ValueError) as e:
        DiscriminatorConfig(num_layers=4).validate(28)
    assert str(e.value) == "adv: num_layers=4 leaves no patch to judge at 28 px; use adv.num_layers <= 3"
    with pytest.raises(ValueError, match=r"num_layers=6 leaves no patch to judge at 128 px; use adv.num_layers <= 5"):
        DiscriminatorConfig(num_layers=6).validate(128, where="adv (stage 2, 128 px)")
    assert DiscriminatorConfig(num_layers=5).validate(128).num_layers == 5


def test_validate_rejects_zero_width_or_layers_and_too_small_stages():
    with pytest.raises(ValueError, match=r"width and num_layers must be >= 1, got 0, 3"):
        DiscriminatorConfig(width=0).validate(28)
    with pytest.raises(ValueError, match=r"width and num_layers must be >= 1, got 64, 0"):
        DiscriminatorConfig(num_layers=0).validate(28)
    with pytest.raises(ValueError, match=r"at 4 px; the stage is too small for a discriminator"):
        DiscriminatorConfig(num_layers=1).validate(4)


def test_stage_discriminators_validate_every_stage_naming_it():
    with pytest.raises(ValueError, match=r"adv \(stage 3, 28 px\): num_layers=4 leaves no patch"):
        StageDiscriminators(DiscriminatorConfig(num_layers=4), {2: 128, 3: 28})


# ----------------------------------------------------------------------------- losses
REAL, FAKE = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])


def test_hinge_losses_on_simple_logits():
    # D: mean(relu(1 - real)) + mean(relu(1 + fake)) = (0 + 0.5) / 2 + (0 + 1.5) / 2
    assert discriminator_loss("hinge", REAL, FAKE).item() == pytest.approx(1.0)
    assert generator_loss("hinge", FAKE).item() == pytest.approx(0.75)  # -mean(fake)
    # beyond the margin on both sides: nothing left to learn for D
    assert discriminator_loss("hinge", torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0


def test_nonsat_losses_on_simple_logits():
    want_d = (_softplus(-2.0) + _softplus(-0.5)) / 2 + (_softplus(-2.0) + _softplus(0.5)) / 2
    assert discriminator_loss("nonsat", REAL, FAKE).item() == pytest.approx(want_d, rel=1e-6)
    assert generator_loss("nonsat", FAKE).item() == pytest.approx((_softplus(2.0) + _softplus(-0.5)) / 2, rel=1e-6)
    # undecided logits: log 2 for each half
    zero = torch.zeros(4)
    assert discriminator_loss("nonsat", zero, zero).item() == pytest.approx(2 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("kind", ADV_LOSSES)
def test_losses_are_fp32_scalars_for_half_logits(kind):
    real, fake = REAL.to(torch.bfloat16), FAKE.to(torch.float16)
    for got in (discriminator_loss(kind, real, fake), generator_loss(kind, fake)):
        assert got.dtype == torch.float32 and got.shape == ()


def test_unknown_loss_names_the_allowed_ones():
    for fn, args in ((discriminator_loss, (REAL, FAKE)), (generator_loss, (FAKE,))):
        with pytest.raises(ValueError, match=r"unknown adversarial loss 'wgan'; allowed: hinge, nonsat"):
            fn("wgan", *args)


def test_feature_matching_is_zero_for_identical_features_and_l1_otherwise():
    feats = [torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert feature_matching(feats, [f.clone() for f in feats]).item() == 0.0
    real = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 6, 2, 2)]
    fake = [torch.ones(2, 3, 4, 4, requires_grad=True), torch.full((2, 6, 2, 2), -3.0, requires_grad=True)]
    real = [r.requires_grad_() for r in real]
    fm = feature_matching(real, fake)
    assert fm.item() == pytest.approx(2.0)  # the mean over layers of mean |fake - real|: (1 + 3) / 2
    fm.backward()
    assert all(f.grad is not None for f in fake)
    assert all(r.grad is None for r in real), "the real features are the target: no gradient into them"


# ----------------------------------------------------------------------------- spectral norm
def test_spectral_norm_vectors_are_buffers_and_normalise_every_conv(images):
    torch.manual_seed(0)
    cfg = DiscriminatorConfig(channels=1, width=8, num_layers=2)
    net = PatchDiscriminator(cfg)
    buffers = dict(net.named_buffers())
    assert len(buffers) == 2 * (cfg.num_layers + 2)  # _u and _v of each conv, the head included
    assert all(k.endswith(("parametrizations.weight.0._u", "parametrizations.weight.0._v")) for k in buffers)
    assert set(buffers) <= set(net.state_dict()), "checkpointed with the weights"
    before = {k: v.clone() for k, v in buffers.items()}
    x = images(2, 1, 28)
    net.eval()
    net(x)
    assert all(torch.equal(before[k], v) for k, v in net.named_buffers()), "eval mode runs no power iteration"
    net.train()
    for _ in range(30):
        net(x)
    assert not all(torch.equal(before[k], v) for k, v in net.named_buffers())
    for conv in _convs(net):
        w = conv.weight.detach()
        assert torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item() == pytest.approx(1.0, abs=5e-3)


def test_without_spectral_norm_there_are_plain_convs():
    net = PatchDiscriminator(DiscriminatorConfig(channels=1, width=8, num_layers=2, spectral_norm=False))
    assert list(net.named_buffers()) == []
    assert not any("parametrizations" in k for k in net.state_dict())


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path, images):
    torch.manual_seed(0)
    cfg, sizes = DiscriminatorConfig(channels=1, width=8, num_layers=2), {2: 28, 3: 56}
    disc = StageDiscriminators(cfg, sizes)
    disc({2: images(2, 1, 28), 3: images(2, 1, 56)})  # moves the power-iteration vectors off their start
    assert not has_discriminators(str(tmp_path))
    out = save_discriminators(disc.state_dict(), cfg, sizes, str(tmp_path), extra={"adv": {"loss": "hinge"}})
    assert out == str(tmp_path) and has_discriminators(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DISC_CONFIG_NAME, DISC_WEIGHTS_NAME])
    meta = json.loads((tmp_path / DISC_CONFIG_NAME).read_text())
    assert meta == {"format_version": 1, "discriminator": dataclasses.asdict(cfg), "stage_sizes": {"2": 28, "3": 56},
                    "adv": {"loss": "hinge"}}

    back = load_discriminators(out)
    assert back.config == cfg and back.sizes == sizes
    want, got = disc.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    disc.eval(), back.eval()
    x = {2: images(3, 1, 28, seed=5), 3: images(3, 1, 56, seed=6)}
    with torch.no_grad():
        a, b = disc(x), back(x)
    assert all(torch.equal(a[i][0], b[i][0]) for i in sizes)


def test_save_refuses_weights_that_do_not_match_the_config(tmp_path):
    cfg = DiscriminatorConfig(channels=1, width=8, num_layers=2)
    state = StageDiscriminators(cfg, {2: 28}).state_dict()
    with pytest.raises(ValueError, match=r"discriminator weights do not match adv\.\*"):
        save_discriminators(state, cfg, {3: 28}, str(tmp_path))  # another stage
    with pytest.raises(ValueError, match=r"do not match adv\.\*"):
        save_discriminators(state, dataclasses.replace(cfg, num_layers=3), {2: 28}, str(tmp_path))
    assert not has_discriminators(str(tmp_path))


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m trainer.export RUN_DIR --discriminator"):
        load_discriminators(str(tmp_path))
    cfg = DiscriminatorConfig(channels=1, width=8, num_layers=2)
    save_discriminators(StageDiscriminators(cfg, {2: 28}).state_dict(), cfg, {2: 28}, str(tmp_path))
    meta = json.loads((tmp_path / DISC_CONFIG_NAME).read_text())
    (tmp_path / DISC_CONFIG_NAME).write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(ValueError, match=r"format_version 2 is not supported \(this version reads 1\)"):
        load_discriminators(str(tmp_path))
