"""Small synthetic stand-ins with real data sets' file layouts, for tests and benchmarks (no download).

    python -m shards.synthetic celeba --out /tmp/celeba-fake --n 60 --corrupt 7
    python -m shards.write celeba --src /tmp/celeba-fake/img_align_celeba --out /tmp/celeba-fake-shards

`make_celeba_layout` writes CelebA's exact layout: `img_align_celeba/000001.jpg ...` (178x218 JPEGs of
face-like drawings), `list_eval_partition.txt` (train/valid/test in CelebA's proportions, in file order),
and the same images as `img_align_celeba.zip`. Files listed in `corrupt` are truncated to a few bytes.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CELEBA_W, CELEBA_H = 178, 218
# CelebA's official partition: 162770 train, 19867 valid, 19962 test (of 202599), in file order
CELEBA_FRACTIONS = (162770 / 202599, 19867 / 202599)


def face_image(rng: np.random.Generator, w: int = CELEBA_W, h: int = CELEBA_H) -> Image.Image:
    """A face-like drawing: gradient background, skin ellipse, eyes, mouth, hair, mild noise and blur."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    bg = (top * (1 - t) + bottom * t).repeat(w, axis=1)
    img = Image.fromarray(bg.astype(np.uint8))
    d = ImageDraw.Draw(img)
    cx, cy = w / 2 + rng.normal(0, 4), h / 2 + rng.normal(0, 4)
    fw, fh = rng.uniform(45, 60), rng.uniform(60, 78)
    hair = tuple(int(v) for v in rng.integers(0, 120, 3))
    d.ellipse([cx - fw - 8, cy - fh - 14, cx + fw + 8, cy + fh * 0.4], fill=hair)
    skin = tuple(int(v) for v in np.clip(np.array([210, 160, 130]) + rng.normal(0, 25, 3), 0, 255))
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    for sx in (-1, 1):
        ex, ey = cx + sx * fw * 0.42, cy - fh * 0.15
        d.ellipse([ex - 9, ey - 5, ex + 9, ey + 5], fill=(245, 245, 245))
        d.ellipse([ex - 4, ey - 4, ex + 4, ey + 4], fill=tuple(int(v) for v in rng.integers(20, 120, 3)))
    d.line([cx, cy - 5, cx - 4, cy + 18], fill=tuple(int(v * 0.8) for v in skin), width=3)
    d.chord([cx - 20, cy + 22, cx + 20, cy + 44], 0, 180, fill=(170, 60, 70))
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    a += rng.normal(0, 4, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_celeba_layout(root: str | Path, n: int = 60, *, corrupt: tuple[int, ...] = (), seed: int = 0,
                       quality: int = 90, zip_too: bool = True) -> dict:
    """Write n CelebA-layout images under root; return the paths (images dir, partition file, zip)."""
    root = Path(root)
    img_dir = root / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_train = max(1, int(round(n * CELEBA_FRACTIONS[0])))
    n_valid = max(1, int(round(n * CELEBA_FRACTIONS[1])))
    lines = []
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        buf = io.BytesIO()
        face_image(rng).save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        if i in corrupt:
            data = data[:20]  # a JPEG header and nothing else: PIL fails to load it
        (img_dir / name).write_bytes(data)
        lines.append(f"{name} {0 if i <= n_train else 1 if i <= n_train + n_valid else 2}")
    partition = root / "list_eval_partition.txt"
    partition.write_text("\n".join(lines) + "\n")
    paths = {"images": img_dir, "partition": partition, "n_train": n_train, "n_valid": n_valid,
             "n_test": n - n_train - n_valid}
    if zip_too:
        zpath = root / "img_align_celeba.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
            for i in range(1, n + 1):
                zf.write(img_dir / f"{i:06d}.jpg", f"img_align_celeba/{i:06d}.jpg")
        paths["zip"] = zpath
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("layout", choices=["celeba"])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--corrupt", type=int, nargs="*", default=[])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = make_celeba_layout(a.out, a.n, corrupt=tuple(a.corrupt), seed=a.seed)
    print({k: str(v) for k, v in paths.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
