"""`load_pretrained`: a hand-written export (safetensors + config.json) loads back exactly, and broken ones fail by name."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from models import NStageVAE, load_pretrained
from models.pretrained import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME


@pytest.fixture
def export(tmp_path, make_config, images):
    """A trained-looking tiny 2-stage model written as an export; returns (dir, model)."""
    torch.manual_seed(0)
    model = NStageVAE(make_config(n_stages=2))
    model(images(4, 1, 28))  # train-mode forward: the BN running stats move away from their init
    model.eval()

    def write(state=None, meta=None):
        state = model.state_dict() if state is None else state
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp_path, WEIGHTS_NAME))
        meta = {"format_version": FORMAT_VERSION, "model": model.config.to_dict()} if meta is None else meta
        with open(os.path.join(tmp_path, CONFIG_NAME), "w") as f:
            json.dump(meta, f)
        return str(tmp_path)

    write()
    return write, model


def test_round_trip_gives_the_same_model(export, images):
    write, model = export
    loaded = load_pretrained(write())
    assert not loaded.training and loaded.config == model.config
    x = images(2, 1, 28)
    assert all(torch.equal(a, b) for a, b in zip(model.reconstruct(x), loaded.reconstruct(x)))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(loaded.sample(2, generator=g)[-1], model.sample(2, generator=torch.Generator().manual_seed(3))[-1])
    assert load_pretrained(write(), dtype=torch.bfloat16).stages[1].tail[-2].weight.dtype == torch.bfloat16


def _bad_state(model, kind):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = "stages.1.head.0.weight"
    if kind == "shape":
        state[name] = state[name][:, :, :3, :3].contiguous()
    elif kind == "nan":
        state[name][0, 0, 0, 0] = float("nan")
    elif kind == "missing":
        del state[name]
    return state


@pytest.mark.parametrize("kind,needles", [
    ("shape", ["stages.1.head.0.weight", "shape"]),
    ("nan", ["stages.1.head.0.weight", "non-finite"]),
    ("missing", ["missing tensors", "stages.1.head.0.weight"]),
])
def test_weights_that_do_not_fit_are_named(export, kind, needles):
    write, model = export
    path = write(state=_bad_state(model, kind))
    with pytest.raises(ValueError) as err:
        load_pretrained(path)
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_broken_files_fail_clearly(export):
    write, model = export
    path = write()
    weights = os.path.join(path, WEIGHTS_NAME)
    with open(weights, "r+b") as f:  # a copy cut short
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_pretrained(path)

    write(meta={"format_version": 99, "model": model.config.to_dict()})
    with pytest.raises(ValueError, match="format_version 99"):
        load_pretrained(path)

    d = model.config.to_dict()
    d["stages"][1]["loss"] = "mse"
    write(meta={"format_version": FORMAT_VERSION, "model": d})
    with pytest.raises(ValueError, match=r"model\.stages\[1\]\.loss"):
        load_pretrained(path)

    os.remove(os.path.join(path, CONFIG_NAME))
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_pretrained(path)
