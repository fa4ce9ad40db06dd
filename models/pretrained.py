"""Load an exported model: `model.safetensors` plus `config.json`. The package's only file I/O.

    from models import load_pretrained
    model = load_pretrained("runs/mnist/export", device="cpu")
    images = model.sample(16)  # one (16, C, H, W) tensor per stage, in [-1, 1]

Uses only `models` and safetensors: no trainer import and no pickle, so an export from an untrusted
source can be loaded safely. Every check names the tensor or field at fault.
"""
from __future__ import annotations

import json
import os

import torch

from .config import ModelConfig
from .vae import NStageVAE

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def read_export_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: an export directory holds {WEIGHTS_NAME} and {CONFIG_NAME} "
                                "(write one with `python -m trainer.export RUN_DIR`)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {version!r} is not supported (this version reads "
                         f"{FORMAT_VERSION}); re-export the run with this version of nstage-vae")
    if "model" not in cfg:
        raise ValueError(f"{cfg_path}: field 'model' (the architecture) is missing")
    return cfg


def load_pretrained(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> NStageVAE:
    """Build the exported `NStageVAE` in eval mode, with its weights checked tensor by tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_export_config(path)
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"]).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: bad field in 'model': {e}") from e
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} not found")
    try:
        state = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} cannot be read (truncated or corrupt?): {e}") from e

    model = NStageVAE(model_cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{weights_path} does not match config.json's architecture: "
                         f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected tensors {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for name, ref in expected.items():
        t = state[name]
        if t.shape != ref.shape:
            raise ValueError(f"{weights_path}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"config.json's architecture needs {tuple(ref.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{weights_path}: tensor {name!r} holds non-finite values (NaN or Inf)")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
