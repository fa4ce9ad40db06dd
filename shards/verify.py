"""Check every shard of a shard directory against its manifest.json.

    python -m shards.verify data/celeba128
    python -m shards.verify data/celeba128 --split train --workers 4

For each shard it checks: the file exists, its sha256 and sample count match the manifest, every sample
has an image that decodes at the manifest's size and channel count, and no key repeats. Prints one line
per problem and exits 1 if there is any (2 if the manifest itself is unreadable), 0 when all is well.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

MANIFEST = "manifest.json"
REQUIRED = ("version", "splits", "image", "crop", "source", "skipped")


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} not found: is {root} a shard directory written by `python -m shards.write`?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); rewrite the shards with --overwrite") from exc
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}; rewrite the shards with --overwrite")
    if manifest["version"] != 1:
        raise ValueError(f"{path} has version {manifest['version']}, this code reads version 1")
    return manifest


def check_shard(args: tuple) -> list[str]:
    """Problems found in one shard (empty list: fine)."""
    path, entry, image = args
    name = entry["name"]
    if not os.path.isfile(path):
        return [f"{name}: missing"]
    problems = []
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    if h.hexdigest() != entry["sha256"]:
        problems.append(f"{name}: sha256 {h.hexdigest()} != manifest {entry['sha256']}")
    size, mode, ext = image["size"], ("L" if image["channels"] == 1 else "RGB"), image["ext"]
    keys, n = set(), 0
    try:
        with tarfile.open(path, "r:") as tf:
            current, has_image = None, False
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, _, suffix = base.partition(".")
                if key != current:
                    if current is not None and not has_image:
                        problems.append(f"{name}: sample {current} has no .{ext}")
                    if key in keys:
                        problems.append(f"{name}: key {key} repeats")
                    keys.add(key)
                    current, has_image, n = key, False, n + 1
                if suffix != ext:
                    continue
                has_image = True
                data = tf.extractfile(m).read()  # a truncated tar fails here, reported below
                try:
                    img = Image.open(io.BytesIO(data))
                    img.load()
                except Exception as exc:
                    problems.append(f"{name}: {base} does not decode ({type(exc).__name__}: {exc})")
                    continue
                if img.size != (size, size) or img.mode != mode:
                    problems.append(f"{name}: {base} is {img.mode} {img.size[0]}x{img.size[1]}, "
                                    f"manifest says {mode} {size}x{size}")
            if current is not None and not has_image:
                problems.append(f"{name}: sample {current} has no .{ext}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{name}: unreadable tar after {n} samples ({type(exc).__name__}: {exc})")
    if n != entry["num_samples"]:
        problems.append(f"{name}: {n} samples, manifest says {entry['num_samples']}")
    return problems


def verify(root: str | Path, splits: list[str] | None = None, workers: int = 1) -> list[str]:
    """All problems found under root; an empty list means the shards match the manifest."""
    root = Path(root)
    manifest = load_manifest(root)
    problems, jobs = [], []
    for split, info in manifest["splits"].items():
        if splits and split not in splits:
            continue
        total = sum(s["num_samples"] for s in info["shards"])
        if total != info["num_samples"]:
            problems.append(f"split {split}: shards hold {total} samples, split says {info['num_samples']}")
        jobs += [(str(root / s["name"]), s, manifest["image"]) for s in info["shards"]]
    for want in splits or []:
        if want not in manifest["splits"]:
            problems.append(f"split {want}: not in manifest (has {sorted(manifest['splits'])})")
    if workers > 1:
        with Pool(workers) as pool:
            results = pool.map(check_shard, jobs, chunksize=1)
    else:
        results = map(check_shard, jobs)
    for r in results:
        problems += r
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="shard directory holding manifest.json")
    p.add_argument("--split", action="append", help="check only this split (repeatable)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    try:
        manifest = load_manifest(a.dir)
        problems = verify(a.dir, a.split, a.workers)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if problems:
        for line in problems:
            print(f"FAIL {line}")
        print(f"{len(problems)} problem(s) in {a.dir}")
        return 1
    counts = ", ".join(f"{k}={v['num_samples']}" for k, v in manifest["splits"].items()
                       if not a.split or k in a.split)
    print(f"OK {a.dir}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
