"""Stream uint8 image batches from WebDataset shards: split across ranks and workers, exactly resumable.

    from shards.stream import ShardStream
    stream = ShardStream("data/celeba128", "train", batch_size=32, rank=rank, world_size=world,
                         num_workers=4, seed=0)
    stream.load_state_dict(saved)            # optional: continue exactly where a checkpoint left off
    for batch in stream:                     # one epoch from the current position
        x = batch["image"].to(device).float() / 127.5 - 1   # (B, C, H, W) uint8 -> [-1, 1] on the device
        ...
        saved = stream.state_dict()          # JSON-serialisable

`shards` is a directory, or a URL prefix holding manifest.json: `http(s)://host/celeba128`, or a webdataset
`pipe:` command such as `pipe:curl -s https://host/celeba128` (the shard's name is appended after a '/'),
or any prefix holding `{name}`, which is replaced by the file name, e.g. `pipe:aws s3 cp s3://b/c/{name} -`.

How an epoch is laid out (everything below is a pure function of the manifest, seed, epoch and layout):
- The split's shards are permuted with a generator seeded by (seed, epoch) and laid end to end.
- That sequence of T samples is cut into S = world_size * max(1, num_workers) contiguous "slots" of
  L = floor(T / (S * batch_size)) * batch_size samples each: slot rank * max(1, num_workers) + worker.
  A slot boundary may fall inside a shard; the slot then reads only its part of that shard.
- The last T - S * L samples (fewer than S * batch_size) are dropped for that epoch. Which samples they
  are follows the shard permutation, so it changes from epoch to epoch; the count does not.
- Each slot passes its samples through a shuffle buffer of `shuffle_buffer` samples, seeded by
  (seed, epoch, slot), and yields L / batch_size batches. A DataLoader takes batches from its workers in
  turn, so every rank yields max(1, num_workers) * L / batch_size batches: the same on every rank.
- shuffle_buffer=0 turns all shuffling off: shards in manifest order, samples in shard order (for evaluation).
Within an epoch no sample is read twice.

Resume: the position is (epoch, batches this rank has consumed). Because the shuffle buffer's permutation is
computed on sample indices before any byte is read, a restored stream knows which samples each worker has
already produced: it never decodes them, and it never opens a shard whose needed samples were all consumed.

Faults: a missing, truncated or corrupt shard (or image) raises ShardError naming the shard. With
tolerant=True it is logged and counted instead; a lost sample's place in its batch is filled with a copy of a
good sample of the same worker, so batch shapes and counts stay the same on every rank (DDP never waits on a
rank), and more than max_errors errors in one epoch raise ShardError. Only the image entry of a sample is ever
decoded (with PIL, restricted to the manifest's format): pickles, .pth and other payloads are never touched.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from bisect import bisect_right

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_VERSION = 1
_PIL_FORMATS = {"jpeg": ["JPEG"], "png": ["PNG"]}


class ShardError(RuntimeError):
    """A shard could not be read as the manifest describes it."""


# ----------------------------------------------------------------------------- locations

def _is_remote(prefix: str) -> bool:
    return prefix.startswith("pipe:") or "://" in prefix


def shard_url(prefix: str, name: str) -> str:
    if "{name}" in prefix:
        return prefix.replace("{name}", name)
    if prefix.startswith("file://"):
        prefix = prefix[len("file://"):]
    if _is_remote(prefix):
        return prefix.rstrip("/") + "/" + name
    return os.path.join(prefix, name)


def _gopen(url: str):
    from webdataset.gopen import gopen  # only needed for URLs

    return gopen(url, "rb")


def load_manifest(shards: str) -> dict:
    """The manifest.json under a shard directory or URL prefix."""
    if not _is_remote(shards) and os.path.isfile(shards) and shards.endswith(MANIFEST):
        shards = os.path.dirname(shards) or "."
    url = shard_url(shards, MANIFEST)
    try:
        if _is_remote(url):
            stream = _gopen(url)
            try:
                data = stream.read()
            finally:
                stream.close()
        else:
            with open(url, "rb") as f:
                data = f.read()
        manifest = json.loads(data)
    except Exception as exc:
        raise ShardError(f"cannot read {url} ({type(exc).__name__}: {exc}); build the shards with "
                         f"`python -m shards.write ...` or check the path") from exc
    if manifest.get("version") != 1 or "splits" not in manifest or "image" not in manifest:
        raise ShardError(f"{url} is not a version-1 shard manifest")
    return manifest


# ----------------------------------------------------------------------------- the epoch plan

def plan_epoch(counts: list[int], *, epoch: int, seed: int, slots: int, batch_size: int, shuffle: bool = True):
    """(shard order, samples per slot L, per-slot segments [(shard index, start, end), ...])."""
    n = len(counts)
    order = np.random.default_rng([seed, epoch, 0]).permutation(n) if shuffle else np.arange(n)
    total = int(sum(counts))
    per_slot = (total // (slots * batch_size)) * batch_size
    if per_slot == 0:
        raise ValueError(f"the split has {total} samples, fewer than world_size * workers * batch_size = "
                         f"{slots} * {batch_size}: lower the batch size or the number of workers")
    starts = np.concatenate([[0], np.cumsum([counts[i] for i in order])])
    segments = []
    for s in range(slots):
        lo, hi = s * per_slot, (s + 1) * per_slot
        segs, j = [], bisect_right(starts, lo) - 1
        while j < n and starts[j] < hi:
            a, b = max(lo, starts[j]), min(hi, starts[j + 1])
            if b > a:
                segs.append((int(order[j]), int(a - starts[j]), int(b - starts[j])))
            j += 1
        segments.append(segs)
    return [int(i) for i in order], per_slot, segments


def buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a classic shuffle buffer over inputs 0..n-1, computed on indices alone."""
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    size = min(buffer, n)
    pool = list(range(size))
    out = np.empty(n, dtype=np.int64)
    picks = rng.integers(0, size, n - size)
    for j, p in enumerate(range(size, n)):
        i = picks[j]
        out[j] = pool[i]
        pool[i] = p
    out[n - size:] = rng.permutation(pool)
    return out


# ----------------------------------------------------------------------------- one slot (runs in a worker)

def decode_image(data: bytes, fmt: str, size: int, channels: int) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, C) uint8, checked against the manifest's size."""
    img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS[fmt])
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    a = np.asarray(img)
    if a.shape[:2] != (size, size):
        raise ValueError(f"image is {a.shape[1]}x{a.shape[0]}, the manifest says {size}x{size}")
    return a.reshape(size, size, channels)


def _read_needed(cfg: dict, segments: list, needed: np.ndarray):
    """Yield (slot position, key, image bytes, error) for every needed position, in increasing order.

    Samples that are not needed are passed over without reading their bytes where the source allows
    seeking (local files), and whole segments without a needed sample are never opened.
    """
    pos0 = 0
    for shard, start, end in segments:
        seg_needed = needed[pos0:pos0 + end - start]
        if not seg_needed.any():
            pos0 += end - start
            continue
        name = cfg["names"][shard]
        last = start + int(np.nonzero(seg_needed)[0][-1])  # last needed index inside the shard
        url = shard_url(cfg["prefix"], name)
        done, i, key, got_image, stream, tf = -1, -1, None, False, None, None
        error = None
        try:
            if _is_remote(url):
                stream = _gopen(url)
                tf = tarfile.open(fileobj=stream, mode="r|")
            else:
                tf = tarfile.open(url, mode="r:")
            for m in tf:
                if not m.isfile():
                    continue
                k, _, suffix = m.name.rsplit("/", 1)[-1].partition(".")
                if k != key:
                    if start <= i <= end - 1 and seg_needed[i - start] and not got_image:
                        yield pos0 + i - start, key, None, f"shard {name}: sample {key} has no .{cfg['ext']}"
                        done = i
                    if i >= last:
                        break
                    key, got_image, i = k, False, i + 1
                if suffix != cfg["ext"] or i < start or not seg_needed[i - start]:
                    continue  # never read: other entries (.json, .pth, .pyd, ...) and samples already consumed
                data = tf.extractfile(m).read()
                got_image, done = True, i
                yield pos0 + i - start, key, data, None
            else:
                if start <= i <= end - 1 and seg_needed[i - start] and not got_image:
                    yield pos0 + i - start, key, None, f"shard {name}: sample {key} has no .{cfg['ext']}"
                    done = i
            if done < last:
                error = (f"shard {name} ({url}) ended after {i + 1} samples, the manifest says "
                         f"{cfg['counts'][shard]}: it is truncated or replaced; run `python -m shards.verify`")
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            error = (f"shard {name} ({url}) is unreadable after {max(i, 0)} samples "
                     f"({type(exc).__name__}: {exc}); run `python -m shards.verify` on it")
        finally:
            if stream is not None and hasattr(stream, "ignore_errors"):
                stream.ignore_errors = error is None  # a pipe we stop reading early exits on SIGPIPE
            for closable in (tf, stream):
                try:
                    if closable is not None:
                        closable.close()
                except Exception as exc:  # the pipe's own exit status, e.g. curl's 22 for a 404
                    error = error or f"shard {name} ({url}): {exc}"
        if error is not None:
            if not cfg["tolerant"]:
                raise ShardError(error)
            lost = [pos0 + j for j in np.nonzero(seg_needed)[0] if start + j > done]
            for n, p in enumerate(lost):  # one error per shard event, however many samples it loses
                yield p, None, None, (f"{error}; {len(lost)} samples lost" if n == 0 else "")
        pos0 += end - start


def iter_slot(cfg: dict, epoch: int, slot: int, skip_batches: int):
    """Batches of one slot for one epoch, after skipping `skip_batches` of them without decoding."""
    B, size, C = cfg["batch_size"], cfg["size"], cfg["channels"]
    _, per_slot, segments = plan_epoch(cfg["counts"], epoch=epoch, seed=cfg["seed"], slots=cfg["slots"],
                                       batch_size=B, shuffle=cfg["shuffle_buffer"] > 0)
    rng = np.random.default_rng([cfg["seed"], epoch, 1, slot])
    order = buffer_order(per_slot, cfg["shuffle_buffer"], rng)
    remaining = order[skip_batches * B:]
    needed = np.zeros(per_slot, dtype=bool)
    needed[remaining] = True
    reader = _read_needed(cfg, segments[slot], needed)
    held: dict[int, tuple] = {}
    owed, owed_bad, last_good = 0, [], None
    for b in range(len(remaining) // B):
        x = np.empty((B, size, size, C), dtype=np.uint8)
        keys, ok, bad = [None] * B, [False] * B, []
        for j, p in enumerate(remaining[b * B:(b + 1) * B]):
            while p not in held:
                try:
                    q, key, data, err = next(reader)
                except StopIteration:
                    raise ShardError(f"slot {slot}: sample position {p} was never read") from None
                held[q] = (key, data, err)
            key, data, err = held.pop(p)
            if err and not cfg["tolerant"]:
                raise ShardError(err)
            if err is None:
                try:
                    x[j] = decode_image(data, cfg["format"], size, C)
                    keys[j], ok[j] = key, True
                    continue
                except Exception as exc:
                    err = f"sample {key} in a shard of split {cfg['split']!r} does not decode " \
                          f"({type(exc).__name__}: {exc})"
                    if not cfg["tolerant"]:
                        raise ShardError(err) from exc
            if err:
                bad.append(err)
        good = [j for j in range(B) if ok[j]]
        if not good:  # nothing to copy from: owe this batch until a good one arrives
            if last_good is None:
                owed, owed_bad = owed + 1, owed_bad + bad
                continue
            x, keys = last_good[0].copy(), list(last_good[1])
        else:
            for n, j in enumerate(j for j in range(B) if not ok[j]):
                x[j], keys[j] = x[good[n % len(good)]], keys[good[n % len(good)]]
            last_good = (x, keys)
        image = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        yield {"image": image, "key": keys, "_bad": owed_bad + bad}
        for _ in range(owed):
            yield {"image": image.clone(), "key": list(keys), "_bad": []}
        owed, owed_bad = 0, []
    if owed:
        raise ShardError(f"every sample of slot {slot} in epoch {epoch} was unreadable: {owed_bad[:1]}")


class _RankEpoch(torch.utils.data.IterableDataset):
    """This rank's slots for one epoch; DataLoader worker i serves logical worker (i + k) % W after k batches,
    so the loader's round-robin continues exactly where the interrupted one stopped."""

    def __init__(self, cfg: dict, epoch: int, rank: int, workers: int, consumed: int):
        self.cfg, self.epoch, self.rank, self.workers, self.consumed = cfg, epoch, rank, workers, consumed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i = info.id if info is not None else 0
        w = (i + self.consumed) % self.workers
        skip = len(range(w, self.consumed, self.workers))  # batches this logical worker already produced
        yield from iter_slot(self.cfg, self.epoch, self.rank * self.workers + w, skip)


# ----------------------------------------------------------------------------- the stream

class ShardStream:
    """One split of a shard directory as equal-length, exactly resumable per-rank batch streams."""

    def __init__(self, shards: str, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000, tolerant: bool = False,
                 max_errors: int = 10, manifest: dict | None = None):
        shards = str(shards)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"need batch_size >= 1, 0 <= rank < world_size, num_workers >= 0; got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"num_workers={num_workers}")
        self.manifest = manifest if manifest is not None else load_manifest(shards)
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} is not in the manifest of {shards} "
                             f"(it has {sorted(self.manifest['splits'])})")
        self.shards, self.split, self.batch_size = shards, split, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle_buffer, self.tolerant, self.max_errors = seed, shuffle_buffer, tolerant, max_errors
        entries = self.manifest["splits"][split]["shards"]
        image = self.manifest["image"]
        self._workers = max(1, num_workers)
        self._cfg = {
            "prefix": shards, "split": split, "names": [s["name"] for s in entries],
            "counts": [int(s["num_samples"]) for s in entries], "ext": image.get("ext", "jpg"),
            "format": image["format"], "size": int(image["size"]), "channels": int(image["channels"]),
            "batch_size": batch_size, "seed": seed, "shuffle_buffer": shuffle_buffer, "tolerant": tolerant,
            "slots": world_size * self._workers,
        }
        self.num_samples = sum(self._cfg["counts"])
        _, per_slot, _ = plan_epoch(self._cfg["counts"], epoch=0, seed=seed, slots=self._cfg["slots"],
                                    batch_size=batch_size)
        self._batches_per_epoch = (per_slot // batch_size) * self._workers
        self.dropped_per_epoch = self.num_samples - per_slot * self._cfg["slots"]
        self._epoch, self._batches = 0, 0
        self.errors, self._epoch_errors, self.error_messages = 0, 0, []

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int):  # jump to the start of that epoch
        self._epoch, self._batches, self._epoch_errors = int(value), 0, 0

    def __len__(self) -> int:
        """Batches per rank per epoch (the same for every epoch and every rank)."""
        return self._batches_per_epoch

    def __iter__(self):
        epoch, consumed = self._epoch, self._batches
        if self.num_workers == 0:
            batches = iter_slot(self._cfg, epoch, self.rank, consumed)
        else:
            loader = torch.utils.data.DataLoader(
                _RankEpoch(self._cfg, epoch, self.rank, self._workers, consumed),
                batch_size=None, num_workers=self.num_workers, prefetch_factor=2)
            batches = iter(loader)
        for batch in batches:
            bad = [m for m in batch.pop("_bad") if m]
            if bad:
                self._record_errors(bad)
            self._batches += 1
            yield batch
        if self._batches != self._batches_per_epoch:
            raise ShardError(f"epoch {epoch} ended after {self._batches} batches, expected "
                             f"{self._batches_per_epoch}")
        self.epoch = epoch + 1

    def _record_errors(self, messages: list[str]):
        for m in messages:
            log.warning("split %r epoch %d: skipped: %s", self.split, self._epoch, m)
        self.errors += len(messages)
        self._epoch_errors += len(messages)
        self.error_messages += messages
        if self._epoch_errors > self.max_errors:
            raise ShardError(f"{self._epoch_errors} shard errors in epoch {self._epoch} of split {self.split!r} "
                             f"exceed max_errors={self.max_errors}; last: {messages[-1]}")

    def state_dict(self) -> dict:
        """The position as plain JSON: the same on every rank, since every rank consumes the same batches."""
        return {"version": STATE_VERSION, "split": self.split, "epoch": self._epoch, "batches": self._batches,
                "samples_per_rank": self._batches * self.batch_size,
                "samples_per_worker": [len(range(w, self._batches, self._workers)) * self.batch_size
                                       for w in range(self._workers)], "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "seed": self.seed, "shuffle_buffer": self.shuffle_buffer, "num_samples": self.num_samples,
                "num_shards": len(self._cfg["counts"])}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position.

        Exact when the layout (split, world_size, max(1, num_workers), batch_size, seed, shuffle_buffer and
        the split's shards) is the one saved; rank may differ (the position is the same on every rank).
        At an epoch boundary (batches == 0) any layout is accepted: nothing of that epoch was consumed.
        Mid-epoch with another layout the position cannot be mapped without repeating or losing samples,
        so this raises ValueError; set `stream.epoch = state["epoch"] + 1` to continue from the next epoch.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r}, expected {STATE_VERSION}")
        epoch, batches = int(state["epoch"]), int(state["batches"])
        mine = self.state_dict()
        layout = ["split", "world_size", "batch_size", "seed", "shuffle_buffer", "num_samples", "num_shards"]
        diff = {k: (state.get(k), mine[k]) for k in layout if state.get(k) != mine[k]}
        if max(1, int(state.get("num_workers", 0))) != self._workers:
            diff["num_workers"] = (state.get("num_workers"), self.num_workers)
        if diff and batches != 0:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume mid-epoch ({batches} batches into epoch {epoch}) with a different "
                             f"data layout ({what}): the position depends on it. Resume with the saved layout, "
                             f"or start the next epoch with `stream.epoch = {epoch + 1}`")
        if batches == self._batches_per_epoch and not diff:
            # Saved right after the epoch's last batch, before the next epoch began: its start.
            epoch, batches = epoch + 1, 0
        if not 0 <= batches < self._batches_per_epoch:
            raise ValueError(f"saved position {batches} batches is outside this epoch's "
                             f"{self._batches_per_epoch} batches")
        if diff:
            log.info("stream layout changed at an epoch boundary (%s); starting epoch %d", diff, epoch)
        self.epoch = epoch
        self._batches = batches
