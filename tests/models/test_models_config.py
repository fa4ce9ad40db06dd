"""The architecture schema: presets, round-trips, and bad values failing when the model is built."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from models import MODEL_PRESETS, ModelConfig, NStageVAE, StageConfig


def _set(**kw):
    def edit(cfg):
        for k, v in kw.items():
            setattr(cfg, k, v)
    return edit


def _stage(i, **kw):
    def edit(cfg):
        for k, v in kw.items():
            setattr(cfg.stages[i], k, v)
    return edit


# (edit of a valid 2-stage 28 px config, text the error must contain: the field, then what is allowed)
BAD = {
    "zero_stages": (_set(stages=[]), ["model.stages", "N >= 1"]),
    "unreachable_size": (_stage(0, out_size=14), ["model.stages", "outputs 14 px but image_size is 28",
                                                  "upsample"]),
    "too_few_px_for_strides": (_stage(0, out_size=4), ["model.stages[0].out_size", "3 stride-2", "at least 8 px"]),
    "unknown_loss": (_stage(1, loss="mse"), ["model.stages[1].loss", "'mse'", "allowed: l2, l1, charbonnier, none"]),
    "unknown_norm": (_set(norm="layer"), ["model.norm", "'layer'", "allowed: batch, group, none"]),
    "refiner_as_stage_1": (_set(stages=[StageConfig(kind="refiner")]),
                           ["model.stages[0].kind", "stage 1 must be the 'decoder'"]),
    "decoder_as_stage_2": (_stage(1, kind="decoder"), ["model.stages[1].kind", "every later stage a 'refiner'"]),
    "unknown_kind": (_stage(1, kind="unet"), ["model.stages[1].kind", "'unet'", "allowed: decoder, refiner"]),
    "every_loss_off": (lambda c: [setattr(s, "loss", "none") for s in c.stages],
                       ["model.stages", "at least one stage needs a reconstruction loss"]),
    "bad_channels": (_set(channels=2), ["model.channels", "1 or 3"]),
    "bad_latent": (_set(latent_dim=0), ["model.latent_dim", ">= 1"]),
    "negative_kl_weight": (_set(kl_weight=-1.0), ["model.kl_weight", ">= 0"]),
    "bad_convs_per_block": (lambda c: setattr(c.encoder, "convs_per_block", 3),
                            ["model.encoder.convs_per_block", "1 or 2"]),
    "no_encoder_blocks": (lambda c: setattr(c.encoder, "channels", []), ["model.encoder.channels", "at least one"]),
    "no_decoder_steps": (_stage(0, channels=[]), ["model.stages[0].channels", "at least one"]),
    "zero_sigma": (_stage(0, sigma=0.0), ["model.stages[0]", "sigma > 0"]),
    "negative_weight": (_stage(1, loss_weight=-1.0), ["model.stages[1]", "loss_weight must be >= 0"]),
    "negative_blocks": (_stage(1, num_blocks=-1), ["model.stages[1]", "num_blocks >= 0"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_fails_when_the_model_is_built(make_config, case):
    edit, needles = BAD[case]
    cfg = make_config(n_stages=2)
    edit(cfg)
    with pytest.raises(ValueError) as err:
        NStageVAE(cfg)
    for needle in needles:
        assert needle in str(err.value), f"{case}: {needle!r} not in {str(err.value)!r}"


def test_unreachable_128px_resolution_names_the_fix():
    """The issue's example: a 64 px coarse stage and no upsampling refiner cannot make 128 px."""
    cfg = MODEL_PRESETS["celeba128_msvae3"]()
    cfg.stages[1].upsample = False
    with pytest.raises(ValueError, match=re.escape("model.stages: the last stage outputs 64 px but image_size is 128")):
        NStageVAE(cfg)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_round_trip_through_dict_and_json(name):
    cfg = MODEL_PRESETS[name]()
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg  # what an export's config.json holds
    assert ModelConfig.from_dict(d) is not cfg and ModelConfig.from_dict(d).stages[0] is not cfg.stages[0]


def test_round_trip_keeps_non_default_values(make_config):
    cfg = make_config(n_stages=3, out_size=14, upsample=(2,), detach=(3,), losses={3: "charbonnier"}, norm="group")
    cfg.stages[2].loss_weight, cfg.stages[0].sigma, cfg.act_slope = 0.5, 0.25, 0.2
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.stages[2].detach_input and back.stages[1].upsample


@pytest.mark.parametrize("where", ["top", "encoder", "stage"])
def test_unknown_field_is_rejected_by_name(where):
    d = MODEL_PRESETS["mnist_msvae"]().to_dict()
    if where == "top":
        d["latent_size"] = 64
        expect = ["latent_size"]
    elif where == "encoder":
        d["encoder"]["widths"] = [1]
        expect = ["model.encoder", "widths"]
    else:
        d["stages"][1]["blocks"] = 3
        expect = ["model.stages[1]", "blocks"]
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dict(d)
    assert all(e in str(err.value) for e in expect), str(err.value)


def test_presets_match_the_paper_variants():
    assert sorted(MODEL_PRESETS) == sorted(
        f"{data}_{kind}" for data in ("mnist", "celeba128") for kind in ("vae", "resvae", "msvae", "msvae3"))
    for data, size, latent in (("mnist", 28, 128), ("celeba128", 128, 512)):
        presets = {k: MODEL_PRESETS[f"{data}_{k}"]() for k in ("vae", "resvae", "msvae", "msvae3")}
        for cfg in presets.values():
            cfg.validate()
            assert cfg.image_size == size and cfg.latent_dim == latent
            assert cfg.kl_weight == pytest.approx(1.0 / latent)  # the official KL / (batch * latent)
            assert cfg.stage_sizes()[-1] == size
            assert not any(s.detach_input for s in cfg.stages)  # the paper trains jointly
        vae, res, ms, ms3 = presets["vae"], presets["resvae"], presets["msvae"], presets["msvae3"]
        assert vae.num_stages == 1 and vae.stages[0].loss == "l2"
        # Deep residual VAE: decoder + 5-block refiner, one loss on the final image.
        assert [s.loss for s in res.stages] == ["none", "l2"] and res.stages[1].num_blocks == 5
        assert [s.loss for s in ms.stages] == ["l2", "l1"] and ms.stages[1].num_blocks == 5
        assert ms3.num_stages == 3 and ms3.stage_sizes() == [size // 2, size, size]
    celeba = MODEL_PRESETS["celeba128_msvae"]()
    assert celeba.encoder.channels == [64, 128, 256] and celeba.encoder.convs_per_block == 2
    assert celeba.encoder_out_size() == 16 and celeba.stages[0].channels == [256, 128, 64]
    mnist = MODEL_PRESETS["mnist_msvae"]()
    assert len(mnist.encoder.channels) == 3 and mnist.encoder.convs_per_block == 1


def test_presets_return_fresh_objects():
    a, b = MODEL_PRESETS["mnist_msvae"](), MODEL_PRESETS["mnist_msvae"]()
    a.stages[0].loss = "l1"
    assert b.stages[0].loss == "l2"


def test_config_dataclasses_are_plain():
    """The trainer embeds the schema as-is: plain dataclasses with a default for every field."""
    for klass in (ModelConfig, StageConfig):
        assert dataclasses.is_dataclass(klass)
        klass()  # every field has a default
    assert ModelConfig().validate().num_stages == 1


def test_from_dict_fills_missing_sections_with_the_defaults():
    """A partial dict (a hand-written config.json, say) keeps the dataclass defaults for what it leaves out."""
    assert ModelConfig.from_dict({}) == ModelConfig()
    cfg = ModelConfig.from_dict({"latent_dim": 64, "kl_weight": 1 / 64})
    assert cfg.stages == ModelConfig().stages and cfg.encoder == ModelConfig().encoder
    with torch.device("meta"):
        assert len(NStageVAE(cfg).stages) == 1  # builds: the default single decoder stage
