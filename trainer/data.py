"""The trainer's data: the WebDataset shard stream per rank, or a deterministic synthetic stream.

Both yield `{"image": uint8 (B, C, H, W)}` one epoch per `iter()`, have equal batch counts on every
rank, and expose `state_dict()` / `load_state_dict()` (plain JSON) for exact resume. Normalisation to
[-1, 1] happens on the device (`to_model_input`), never in the workers.
"""
from __future__ import annotations

import os

import torch

from .config import Config


class SyntheticStream:
    """Deterministic smooth random images. Global batch i of epoch e is a pure function of
    (seed, e, i), and rank r takes rows [r*B, (r+1)*B), so a 2-process run sees exactly the samples
    of a 1-process run with twice the batch: what the DDP parity test and the benchmarks need."""

    def __init__(self, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 image_size: int = 28, channels: int = 1, size: int = 4096):
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.image_size, self.channels = image_size, channels
        self.batches = size // (batch_size * world_size)
        if self.batches < 1:
            raise ValueError(f"data.synthetic_size={size} is smaller than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self._epoch, self.position = 0, 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:  # jump to the start of that epoch, as ShardStream does
        self._epoch, self.position = int(value), 0

    def __len__(self) -> int:
        return self.batches

    def global_batch(self, epoch: int, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63)
        n, s = self.batch_size * self.world_size, max(2, self.image_size // 4)
        low = torch.rand(n, self.channels, s, s, generator=g).mul_(255).round_().to(torch.uint8)  # (N, C, s, s)
        # Quantised at the coarse size and upsampled as uint8: 8x cheaper on the host than upsampling floats
        # (the stream runs in the training process, so its cost is the step's).
        return torch.nn.functional.interpolate(low, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)

    def __iter__(self):
        while self.position < self.batches:
            x = self.global_batch(self.epoch, self.position)
            self.position += 1
            yield {"image": x[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]}
        self.epoch += 1

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "epoch": self.epoch, "position": self.position,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["world_size"], state["batch_size"]) != (self.world_size, self.batch_size):
            raise ValueError(f"synthetic stream position was saved with world_size={state['world_size']}, "
                             f"batch_size={state['batch_size']}; now {self.world_size}, {self.batch_size}")
        self.epoch = state["epoch"]
        self.position = state["position"]
        if self.position == self.batches:  # saved right after an epoch's last batch: the next one's start
            self.epoch += 1


def ensure_shards(cfg: Config, is_main: bool) -> None:
    """Build the MNIST shards on the main process when they are missing (`data.auto_build`), but only at
    the preset's own path (`data.auto_build_at`): a mistyped data.shards fails instead of building there."""
    if cfg.data.synthetic or "://" in cfg.data.shards or cfg.data.shards.startswith("pipe:"):
        return
    manifest = os.path.join(cfg.data.shards, "manifest.json")
    if os.path.exists(manifest):
        return
    if cfg.data.auto_build != "mnist":
        raise FileNotFoundError(f"{manifest} not found: write shards first (python -m shards.write ...) "
                                f"and point data.shards at them, or use data.synthetic=true")
    if os.path.abspath(cfg.data.shards) != os.path.abspath(cfg.data.auto_build_at):
        size = "" if cfg.model.image_size == 28 else f" --size {cfg.model.image_size}"
        raise FileNotFoundError(f"{manifest} not found. data.auto_build builds MNIST only at the preset's own "
                                f"path {cfg.data.auto_build_at}, not at a data.shards given in its place: fix "
                                f"data.shards, or build MNIST there first with "
                                f"`python -m shards.write mnist --out {cfg.data.shards}{size}`")
    if is_main:
        from shards.write import write_mnist
        print(f"[nstage-vae] {cfg.data.shards} is missing: building MNIST shards from the packaged data", flush=True)
        write_mnist(cfg.data.shards, size=cfg.model.image_size)


def held_out_workers(cfg: Config, manifest: dict, split: str, world_size: int) -> int:
    """Workers for a held-out split: as many as it can feed, up to data.num_workers (0, in-process, stays 0).

    ShardStream cuts a split into world_size x max(1, workers) slots of whole batches, so a small split
    cannot fill the training stream's workers."""
    samples = sum(int(s["num_samples"]) for s in manifest["splits"][split]["shards"])
    fit = samples // (world_size * cfg.train.batch_size)
    if fit < 1:
        raise ValueError(f"the held-out split {split!r} of {cfg.data.shards} has {samples} samples, fewer than one "
                         f"batch per rank ({world_size} ranks x train.batch_size={cfg.train.batch_size}): use a "
                         f"smaller train.batch_size, fewer processes, or a bigger split")
    return min(cfg.data.num_workers, fit)


def build_stream(cfg: Config, split: str, rank: int, world_size: int, *, train: bool):
    if cfg.data.synthetic:
        return SyntheticStream(cfg.train.batch_size, rank=rank, world_size=world_size,
                               seed=cfg.train.seed + (0 if train else 7919), image_size=cfg.model.image_size,
                               channels=cfg.model.channels, size=cfg.data.synthetic_size)
    from shards.stream import ShardStream, load_manifest
    manifest = load_manifest(cfg.data.shards)
    workers = cfg.data.num_workers
    if not train and split in manifest["splits"]:  # else ShardStream names the splits there are
        workers = held_out_workers(cfg, manifest, split, world_size)
    stream = ShardStream(cfg.data.shards, split, cfg.train.batch_size, rank=rank, world_size=world_size,
                         num_workers=workers, seed=cfg.train.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer if train else 0,
                         tolerant=cfg.data.tolerant, max_errors=cfg.data.max_errors, manifest=manifest)
    image = manifest["image"]
    if (image.get("size"), image.get("channels")) != (cfg.model.image_size, cfg.model.channels):
        raise ValueError(f"{cfg.data.shards} holds {image.get('size')} px, {image.get('channels')}-channel images "
                         f"but the model expects model.image_size={cfg.model.image_size}, "
                         f"model.channels={cfg.model.channels}; rebuild the shards or change the model")
    return stream


class Prefetcher:
    """Hands out training batches already on the device, and loads the next one while the step runs.

    The trainer calls `take()` for a micro-batch's input and `fetch()` once its backward is queued: the
    next batch is read, copied from pinned memory and normalised while the GPU works, instead of after
    the step's host sync. `state_dict()` is the stream's position after the batches handed out, not
    after the one held, so a checkpoint resumes exactly where the optimizer left off."""

    def __init__(self, stream, device, dtype: torch.dtype | None, channels_last: bool):
        self.stream, self.device, self.dtype, self.channels_last = stream, torch.device(device), dtype, channels_last
        self._it = forever(stream)
        self._held: torch.Tensor | None = None
        self._state: dict | None = None

    def fetch(self) -> None:
        if self._held is not None:
            return
        self._state = self.stream.state_dict()
        batch = next(self._it)
        if self.device.type == "cuda":
            batch = {**batch, "image": batch["image"].pin_memory()}
        self._held = to_model_input(batch, self.device, self.dtype, self.channels_last)

    def take(self) -> torch.Tensor:
        self.fetch()
        x, self._held = self._held, None
        return x

    def state_dict(self) -> dict:
        return self._state if self._held is not None else self.stream.state_dict()


def forever(stream):
    """Epoch after epoch of a stream; an epoch without a batch is an error, not an endless loop."""
    while True:
        yielded = False
        for batch in stream:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training stream yielded no batch in a whole epoch: too few samples for "
                               "train.batch_size x world size x data.num_workers")


def to_model_input(batch: dict, device, dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1] on the device; the one place data is normalised."""
    x = batch["image"].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if dtype is not None:
        x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
