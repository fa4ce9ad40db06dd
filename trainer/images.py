"""Image grids as PNG (no torchvision): one row block per stage, as in the paper's figures 6 and 7."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid(x: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """uint8 (B, C, H, W) -> (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) array, white padding."""
    B, C, H, W = x.shape
    rows = math.ceil(B / nrow)
    out = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    arr = x.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(B):
        r, c = divmod(i, nrow)
        out[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = arr[i]
    return out


def stage_grid(blocks: list[torch.Tensor], nrow: int, gap: int = 6) -> Image.Image:
    """Stack one grid per block ([-1, 1] tensors, e.g. inputs then each stage) vertically.

    Lower-resolution stages are shown nearest-upsampled to the largest size, so pixels stay honest."""
    size = max(b.shape[-1] for b in blocks)
    parts = []
    for b in blocks:
        if b.shape[-1] != size:
            b = F.interpolate(b.float(), size=(size, size), mode="nearest")
        parts.append(grid(to_uint8(b), nrow))
    width = max(p.shape[1] for p in parts)
    sep = np.full((gap, width, parts[0].shape[2]), 255, dtype=np.uint8)
    stacked = np.concatenate([q for p in parts for q in (p, sep)][:-1], axis=0)
    if stacked.shape[2] == 1:
        return Image.fromarray(stacked[:, :, 0], mode="L")
    return Image.fromarray(stacked, mode="RGB")
