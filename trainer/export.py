"""Export a run or a checkpoint as safetensors weights plus `config.json`, for `models.load_pretrained`.

    python -m trainer.export runs/mnist                       # newest committed checkpoint -> runs/mnist/export/
    python -m trainer.export runs/mnist/checkpoints/step-0000600 --out exported/ --weights raw --dtype bf16

    python -m trainer.export runs/mnist_msvae_adv --discriminator   # also the adversarial run's discriminators

`--weights ema` (default) takes the EMA weights; `raw` takes the optimised weights, consolidating a
DeepSpeed ZeRO checkpoint's shards into full fp32 weights first. The trainer writes the same export
to `<run>/export/` at the end of every run. `--discriminator` adds `discriminator.safetensors` and
`discriminator.json` beside the VAE (for fine-tuning: `train.init_from` loads them when `adv.stages` is
set; `models.discriminator.load_discriminators` rebuilds them); `model.safetensors` never holds them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

from models import ModelConfig, NStageVAE
from models.pretrained import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME

from .checkpoint import latest_checkpoint, read_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def manifest_sha256(shards: str) -> str | None:
    path = os.path.join(shards, "manifest.json")
    if "://" in shards or shards.startswith("pipe:") or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def clean_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (torch.compile's `_orig_mod.`, DDP's `module.`)."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def write_export(state: dict[str, torch.Tensor], arch: ModelConfig, out_dir: str, *, dtype: str = "fp32",
                 provenance: dict | None = None) -> str:
    """Write `model.safetensors` and `config.json` (written last) into out_dir; returns out_dir."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    state = clean_state(state)
    expected = NStageVAE(arch).state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"weights do not match the architecture: missing {missing[:5]}, unexpected {extra[:5]}")
    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(DTYPES[dtype])
        tensors[k] = v.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    weights, config = os.path.join(out_dir, WEIGHTS_NAME), os.path.join(out_dir, CONFIG_NAME)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    size, channels = arch.image_size, arch.channels
    meta = {
        "format_version": FORMAT_VERSION,
        "model": arch.to_dict(),
        "preprocessing": {"size": size, "channels": channels, "dtype": dtype,
                          "normalization": "x_uint8 / 127.5 - 1, outputs in [-1, 1]"},
        "provenance": provenance or {},
    }
    with open(config + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(config + ".tmp", config)
    return out_dir


def resolve_checkpoint(path: str) -> str:
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with a committed checkpoint")
    return ckpt


def raw_state_from_checkpoint(ckpt: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    plain = os.path.join(ckpt, "model.safetensors")
    if os.path.isfile(plain):
        return load_file(plain)
    ds_dirs = [d for d in os.listdir(ckpt) if d.startswith("pytorch_model") and os.path.isdir(os.path.join(ckpt, d))]
    if ds_dirs:  # DeepSpeed: consolidate the ZeRO shards into full fp32 weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        # accelerate saves the engine with tag "pytorch_model" inside the checkpoint folder
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=ds_dirs[0])
        return {k: v for k, v in state.items()}
    raise FileNotFoundError(f"{ckpt} holds neither model.safetensors nor a DeepSpeed pytorch_model folder")


def discriminators_file(ckpt: str, cfg) -> str:
    """An adversarial checkpoint's discriminator weights (accelerate's `model_1.safetensors`), or a clear error."""
    if not cfg.adv.stages:
        raise ValueError(f"{ckpt} is not an adversarial run (its adv.stages is empty): it has no discriminators")
    f = os.path.join(ckpt, "model_1.safetensors")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f} not found: the checkpoint holds no discriminators")
    return f


def export_checkpoint(path: str, out: str | None = None, weights: str = "ema", dtype: str = "fp32",
                      discriminator: bool = False) -> str:
    from safetensors.torch import load_file

    from .config import from_yaml_file

    ckpt = resolve_checkpoint(path)
    cfg = from_yaml_file(os.path.join(ckpt, "config.yaml"))
    # Refused before anything is written (out may be the run's own export).
    disc_file = discriminators_file(ckpt, cfg) if discriminator else None
    state_info = read_json(os.path.join(ckpt, "trainer_state.json"))
    if weights == "ema":
        f = os.path.join(ckpt, "ema.safetensors")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} not found (was train.ema_decay 0?); use --weights raw")
        state = load_file(f)
    elif weights == "raw":
        state = raw_state_from_checkpoint(ckpt)
    else:
        raise ValueError(f"--weights must be ema or raw, got {weights!r}")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    out = out or os.path.join(run_dir, "export")
    run_config = _yaml_to_dict(os.path.join(ckpt, "config.yaml"))
    provenance = {"step": state_info["step"], "weights": weights, "checkpoint": os.path.abspath(ckpt),
                  "run_config": run_config, "dataset_manifest_sha256": state_info.get("manifest_sha256")}
    write_export(state, cfg.model.architecture(), out, dtype=dtype, provenance=provenance)
    if disc_file is not None:  # the discriminators' weights (accelerate's model_1.safetensors) beside the VAE
        from models.discriminator import save_discriminators
        save_discriminators(clean_state(load_file(disc_file)), cfg.disc_config(), cfg.adv_sizes(), out,
                            extra={"adv": run_config.get("adv", {})})
    return out


def _yaml_to_dict(path: str) -> dict:
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a run directory (newest committed checkpoint) or a checkpoint folder")
    p.add_argument("--out", default=None, help="output directory (default: <run>/export)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--discriminator", action="store_true",
                   help="also write an adversarial run's discriminators (discriminator.safetensors/.json) beside it")
    a = p.parse_args(argv)
    try:
        out = export_checkpoint(a.path, a.out, a.weights, a.dtype, a.discriminator)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
