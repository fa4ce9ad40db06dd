"""Data-path benchmark: the shard stream against a plain DataLoader over raw CelebA-layout JPEGs.

    python bench/data.py                      # ~1 minute on 2 cores; last line: ratio=<stream/baseline per core>
    python bench/data.py --n 5000 --workers 0 1 2 4 --batch 64 --keep /tmp/bench-data

It makes its own CelebA-layout fixture (178x218 JPEGs, see shards/synthetic.py), writes it as 128x128 JPEG
shards with `shards.write celeba`, then measures on the train split, in one run:
  baseline  torch DataLoader reading the raw JPEGs with PIL: decode, centre 140 crop, resize to 128, uint8
  stream    shards.stream.ShardStream (uint8 batches, shuffle buffer 1000)
  pil128    bare PIL decoding of the same 128x128 JPEG bytes held in memory (one core): the floor under the stream
for 0/1/2 loader workers. Rates are images/s after the first batch (steady state; worker start-up excluded).
Per core = rate / max(1, workers). The ratio compares the two single-core (workers=0) rates.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from shards.stream import ShardStream  # noqa: E402
from shards.synthetic import make_celeba_layout  # noqa: E402
from shards.write import CELEBA_CROP, write_celeba  # noqa: E402

# Projection inputs (labelled assumptions, not measurements here)
FLOP_PER_IMAGE = 75e9  # celeba128 forward + backward per image (our count from the official architecture)
H100_BF16_PEAK = 989e12
ASSUMED_MFU = 0.40


class RawJpegs(torch.utils.data.Dataset):
    """The baseline: one raw CelebA JPEG per item, decoded, centre-cropped and resized with PIL."""

    def __init__(self, files: list[Path], size: int = 128, crop: int = CELEBA_CROP):
        self.files, self.size, self.crop = files, size, crop

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = Image.open(self.files[i]).convert("RGB")
        w, h = img.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + self.crop, top + self.crop))
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (C, H, W) uint8


def steady_rate(batches, epochs: int = 1) -> float:
    """Images/s over all batches after the first of each epoch."""
    n, seconds = 0, 0.0
    for _ in range(epochs):
        it = iter(batches)
        next(it)
        t = time.perf_counter()
        for b in it:
            n += (b["image"] if isinstance(b, dict) else b).shape[0]
        seconds += time.perf_counter() - t
    return n / seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="fixture images (80%% land in train)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2, help="stream epochs per measurement")
    p.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-data-"))
    t = time.perf_counter()
    src = make_celeba_layout(work / "src", a.n, quality=90, zip_too=False)
    shards = work / "celeba128"
    manifest = write_celeba(str(shards), str(src["images"]), size=128, quality=95, shard_samples=500,
                            overwrite=True, progress=False)
    train = manifest["splits"]["train"]
    files = sorted(src["images"].glob("*.jpg"))[: src["n_train"]]
    raw_kb = np.mean([f.stat().st_size for f in files]) / 1024
    shard_kb = sum(s["bytes"] for s in train["shards"]) / train["num_samples"] / 1024
    print(f"fixture: {len(files)} train JPEGs 178x218 (mean {raw_kb:.1f} KiB) -> {train['num_samples']} samples "
          f"128x128 q95 (mean {shard_kb:.1f} KiB/sample) in {len(train['shards'])} shards; "
          f"setup {time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs visible")

    rows = []
    for w in a.workers:
        loader = torch.utils.data.DataLoader(RawJpegs(files), batch_size=a.batch, shuffle=True, num_workers=w,
                                             drop_last=True)
        base = steady_rate(loader)
        stream = ShardStream(str(shards), "train", a.batch, num_workers=w, seed=0, shuffle_buffer=1000)
        fast = steady_rate(stream, a.epochs)
        cores = max(1, w)
        rows.append({"workers": w, "baseline": base, "stream": fast, "baseline_per_core": base / cores,
                     "stream_per_core": fast / cores})
        print(f"workers={w}: baseline {base:7.0f} img/s ({base / cores:6.0f}/core)   "
              f"stream {fast:7.0f} img/s ({fast / cores:6.0f}/core)   stream/baseline {fast / base:4.2f}")

    blobs = []
    for s in train["shards"]:
        with tarfile.open(shards / s["name"]) as tf:
            blobs += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    t = time.perf_counter()
    for _ in range(2):
        for b in blobs:
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    pil = 2 * len(blobs) / (time.perf_counter() - t)
    single = next(r for r in rows if r["workers"] == min(a.workers))
    overhead = pil / single["stream_per_core"] - 1
    print(f"pil128: bare PIL decode of the shards' 128x128 JPEGs {pil:7.0f} img/s on one core; the stream "
          f"(workers={single['workers']}) reaches {single['stream_per_core'] / pil:.0%} of it "
          f"(pipeline overhead {overhead:+.0%} time per image)")

    need = ASSUMED_MFU * H100_BF16_PEAK / FLOP_PER_IMAGE
    best_core = max(r["stream_per_core"] for r in rows)
    print(f"projection: one H100 at an ASSUMED {ASSUMED_MFU:.0%} of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 and "
          f"{FLOP_PER_IMAGE / 1e9:.0f} GFLOP/image (fwd+bwd, celeba128) trains {need:.0f} img/s; at "
          f"{best_core:.0f} img/s per core the stream needs {need / best_core:.1f} cores; 16 cores give "
          f"{16 * best_core:.0f} img/s ({16 * best_core / need:.1f}x)")
    ratio = single["stream_per_core"] / single["baseline_per_core"]
    print(json.dumps({"rows": rows, "pil128": pil, "h100_need": need}), file=sys.stderr)
    print(f"ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
