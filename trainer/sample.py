"""Sample from an exported model, or reconstruct held-out images, as a grid with one row block per stage.

    python -m trainer.sample runs/mnist/export --n 64 --out samples.png
    python -m trainer.sample runs/mnist/export --n 64 --out samples.png --seed 1 --temperature 0.8 --stages last
    python -m trainer.sample runs/mnist/export --n 32 --out recon.png --recon data/mnist28 --split test

Samples: coarse stage-1 images above each refinement, as in the paper's figures 6 and 7.
`--recon`: the inputs above each stage's reconstruction (from the posterior mean).
Runs on a CPU or a GPU (`--device cuda`).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from models import load_pretrained

from .images import stage_grid


def real_images(shards: str, split: str, n: int) -> torch.Tensor:
    """The first n images of a split, in manifest order, as [-1, 1] floats."""
    from shards.stream import ShardStream

    stream = ShardStream(shards, split, batch_size=min(n, 64), shuffle_buffer=0, num_workers=0)
    got = []
    for batch in stream:
        got.append(batch["image"])
        if sum(len(b) for b in got) >= n:
            break
    if not got:
        raise ValueError(f"{shards} split {split!r} yielded no images")
    return torch.cat(got)[:n].float() / 127.5 - 1


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="export directory (model.safetensors + config.json)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the prior noise")
    p.add_argument("--stages", choices=["all", "last"], default="all")
    p.add_argument("--recon", metavar="SHARDS", default=None, help="reconstruct images from these shards instead")
    p.add_argument("--split", default="test")
    p.add_argument("--nrow", type=int, default=0, help="images per row (default: about sqrt(n))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be >= 1")

    model = load_pretrained(a.export, device=a.device)
    if a.recon:
        x = real_images(a.recon, a.split, a.n).to(a.device)
        stages = model.reconstruct(x)
        blocks = [x] + (stages if a.stages == "all" else stages[-1:])
    else:
        g = torch.Generator(device=a.device).manual_seed(a.seed)
        stages = model.sample(a.n, generator=g, temperature=a.temperature)
        blocks = stages if a.stages == "all" else stages[-1:]
    nrow = a.nrow or int(math.ceil(math.sqrt(a.n)))
    stage_grid([b.cpu() for b in blocks], nrow=nrow).save(a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
