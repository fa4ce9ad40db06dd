"""Train an N-stage VAE.

    accelerate launch trainer/run.py                                   # the embedded default: 2-stage MNIST
    accelerate launch trainer/run.py --config celeba128 data.shards=/data/celeba128
    accelerate launch trainer/run.py --config mnist train.max_steps=200 run.dir=runs/x
    accelerate launch --config_file trainer/accelerate/zero2.yaml trainer/run.py --config celeba128
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 trainer/run.py

Running the same command again resumes from the newest committed checkpoint in run.dir
(default runs/<config name>). Mixed precision comes from accelerate (`--mixed_precision bf16`).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # `python trainer/run.py` / `accelerate launch trainer/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import DEFAULT_CONFIG, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train an N-stage VAE", usage="%(prog)s [--config NAME_OR_PATH] [key=value ...]")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="preset name in trainer/configs/ or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 model.norm=group")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
    except (KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"config error: {msg}", file=sys.stderr)
        return 2
    from trainer.loop import ADV_DEEPSPEED_ERROR, train
    if cfg.adv.stages and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1"):
        print(f"config error: {ADV_DEEPSPEED_ERROR}", file=sys.stderr)
        return 2
    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
