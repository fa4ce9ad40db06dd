import functools
import http.server
import io
import json
import logging
import pickle
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch

import shards.stream as stream_mod
from shards.stream import ShardError, ShardStream, plan_epoch

TRAIN = 47  # the fixture's train split: 48 images, one corrupt


def _train_keys(root, shard_keys):
    m = json.loads((Path(root) / "manifest.json").read_text())
    return shard_keys(root, [s["name"] for s in m["splits"]["train"]["shards"]])


def _epoch_keys(stream):
    return [k for batch in stream for k in batch["key"]]


@pytest.mark.parametrize("world,workers", [(1, 0), (3, 0), (2, 2)])
def test_ranks_cover_the_split_once_with_equal_batches(celeba_shards, shard_keys, world, workers):
    B = 2
    streams = [ShardStream(celeba_shards, "train", B, rank=r, world_size=world, num_workers=workers, seed=1,
                           shuffle_buffer=5) for r in range(world)]
    per_rank = [[batch for batch in s] for s in streams]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(streams[0])
    for batches in per_rank:
        assert all(b["image"].shape == (B, 3, 32, 32) and b["image"].dtype == torch.uint8 for b in batches)
    seen = [k for batches in per_rank for b in batches for k in b["key"]]
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    assert set(seen) <= set(_train_keys(celeba_shards, shard_keys))
    dropped = TRAIN - len(seen)
    assert dropped == streams[0].dropped_per_epoch and 0 <= dropped < world * max(1, workers) * B
    assert all(s.epoch == 1 for s in streams)


@pytest.mark.slow
def test_real_two_ranks_two_workers(celeba_shards, shard_keys, tmp_path):
    """Two real processes (gloo), two DataLoader workers each, over uneven shards (7 x 6 + 5)."""
    out = tmp_path / "report.json"
    script = Path(__file__).with_name("shards_dist_check.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(celeba_shards), str(out)], capture_output=True, text=True, timeout=300,
                       cwd=Path(stream_mod.__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    reports = json.loads(out.read_text())
    train = set(_train_keys(celeba_shards, shard_keys))
    for tag in ("epoch0", "epoch0_again", "epoch1"):
        counts = [len(rep[tag]["keys"]) for rep in reports]
        assert counts[0] == counts[1] == reports[0][tag]["len"] == 10  # 47 // (2 ranks * 2 workers * 2) * 2
        seen = [k for rep in reports for batch in rep[tag]["keys"] for k in batch]
        assert len(seen) == len(set(seen)) == 40 and set(seen) <= train
        assert len(train - set(seen)) == reports[0][tag]["dropped"] == 7 <= 2 * 2 * 2
    assert [rep["epoch0"]["keys"] for rep in reports] == [rep["epoch0_again"]["keys"] for rep in reports]
    assert [rep["epoch0"]["keys"] for rep in reports] != [rep["epoch1"]["keys"] for rep in reports]
    # the dropped remainder follows the shard permutation, so it moves between epochs
    e0 = {k for rep in reports for b in rep["epoch0"]["keys"] for k in b}
    e1 = {k for rep in reports for b in rep["epoch1"]["keys"] for k in b}
    assert train - e0 != train - e1


@pytest.mark.parametrize("workers,k", [(0, 3), (2, 5), (2, 4)])
def test_resume_is_exact(celeba_shards, workers, k):
    make = functools.partial(ShardStream, celeba_shards, "train", 2, num_workers=workers, seed=7, shuffle_buffer=9)
    ref = make()
    full = list(ref) + list(ref)  # two uninterrupted epochs
    n = len(ref)
    for start in (k, n + k):  # inside epoch 0, and inside epoch 1
        s = make()
        consumed = 0
        while consumed < start:
            for _ in s:
                consumed += 1
                if consumed == start:
                    break
        state = json.loads(json.dumps(s.state_dict()))
        assert state["epoch"] == start // n and state["batches"] == start % n
        resumed = make()
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == n - start % n
        for got, want in zip(rest, full[start:]):
            assert torch.equal(got["image"], want["image"]) and got["key"] == want["key"]
        assert resumed.epoch == start // n + 1


def test_position_at_the_end_of_an_epoch_resumes_at_the_next(celeba_shards):
    """A checkpoint taken right after an epoch's last batch saves (epoch e, all batches consumed)."""
    make = functools.partial(ShardStream, celeba_shards, "train", 2, seed=7, shuffle_buffer=9)
    ref = make()
    first, second = list(ref), list(ref)
    state = dict(make().state_dict(), epoch=0, batches=len(first))
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.epoch == 1
    got = list(resumed)
    assert len(got) == len(second)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, second))


def test_resume_decodes_only_what_it_yields(celeba_shards, monkeypatch):
    calls = []
    real = stream_mod.decode_image
    monkeypatch.setattr(stream_mod, "decode_image", lambda *a: calls.append(1) or real(*a))
    s = ShardStream(celeba_shards, "train", 2, seed=3, shuffle_buffer=6)
    s.load_state_dict(dict(s.state_dict(), batches=15))
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda name=None, *a, **kw: opened.append(name) or real_open(name, *a, **kw))
    batches = list(s)
    assert len(batches) == len(s) - 15 == 8
    assert len(calls) == 8 * 2  # the 30 skipped samples were never decoded
    assert len(opened) < 7  # shards whose samples were all consumed are not even opened


def test_no_shuffle_is_manifest_order(celeba_shards, shard_keys):
    s = ShardStream(celeba_shards, "train", 4, shuffle_buffer=0)
    assert _epoch_keys(s) == _train_keys(celeba_shards, shard_keys)[:44]
    assert _epoch_keys(s) == _train_keys(celeba_shards, shard_keys)[:44]  # every epoch alike


def test_seed_and_epoch_change_the_order(celeba_shards):
    def keys(seed, epoch):
        s = ShardStream(celeba_shards, "train", 2, seed=seed, shuffle_buffer=10)
        s.epoch = epoch
        return _epoch_keys(s)

    assert keys(0, 0) == keys(0, 0)
    assert keys(0, 0) != keys(0, 1) and keys(0, 0) != keys(1, 0)


def test_layout_mismatch_mid_epoch_is_refused(celeba_shards):
    s = ShardStream(celeba_shards, "train", 2, num_workers=0, world_size=2)
    it = iter(s)
    next(it)
    state = s.state_dict()
    other = ShardStream(celeba_shards, "train", 2, num_workers=2, world_size=1)
    with pytest.raises(ValueError, match=r"world_size 2 -> 1.*num_workers 0 -> 2.*stream.epoch = 1"):
        other.load_state_dict(state)
    other.load_state_dict(dict(state, batches=0, epoch=4))  # at an epoch boundary nothing is lost
    assert other.epoch == 4 and other.state_dict()["batches"] == 0
    # a different rank of the same layout may load it: the position is the same on every rank
    ShardStream(celeba_shards, "train", 2, rank=1, world_size=2).load_state_dict(state)


def test_too_few_samples_and_unknown_split(celeba_shards):
    with pytest.raises(ValueError, match="fewer than world_size"):
        ShardStream(celeba_shards, "valid", 4, world_size=2)
    with pytest.raises(ValueError, match="split 'val' is not in the manifest"):
        ShardStream(celeba_shards, "val", 2)
    with pytest.raises(ShardError, match="shards.write"):
        ShardStream(celeba_shards / "nope", "train", 2)


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_error_and_tolerant_skip(shards_copy, workers, caplog):
    _truncate(shards_copy / "train-000002.tar")
    with pytest.raises(ShardError, match=r"shard train-000002\.tar .*(truncated|unreadable)"):
        list(ShardStream(shards_copy, "train", 2, num_workers=workers))
    s = ShardStream(shards_copy, "train", 2, num_workers=workers, tolerant=True)
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        batches = list(s)
    assert len(batches) == len(s) and all(b["image"].shape == (2, 3, 32, 32) for b in batches)
    assert s.errors == 1 and "train-000002.tar" in s.error_messages[0] and "samples lost" in s.error_messages[0]
    assert "train-000002.tar" in caplog.text
    with pytest.raises(ShardError, match="exceed max_errors=0"):
        list(ShardStream(shards_copy, "train", 2, num_workers=workers, tolerant=True, max_errors=0))


def _rewrite_shard(path: Path, edit):
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(path, "w") as tf:
        for m, data in edit(members):
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def test_corrupt_image_is_named_or_counted(shards_copy):
    def spoil(members):
        return [(m, b"\xff\xd8\xff\xe0garbage" if m.name == "000003.jpg" else d) for m, d in members]

    _rewrite_shard(shards_copy / "train-000000.tar", spoil)
    with pytest.raises(ShardError, match="sample 000003 .* does not decode"):
        list(ShardStream(shards_copy, "train", 1, shuffle_buffer=0))
    s = ShardStream(shards_copy, "train", 1, shuffle_buffer=0, tolerant=True)
    keys = _epoch_keys(s)
    assert s.errors == 1 and len(keys) == TRAIN and "000003" not in keys


class _Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this touches the marker file
        return (Path.touch, (Path(self.marker),))


def test_pickle_and_pth_payloads_are_never_loaded(shards_copy, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(marker))
    pickle.loads(payload)  # the trap works ...
    assert marker.exists()
    marker.unlink()

    def add_payloads(members):
        out = []
        for m, d in members:
            out.append((m, d))
            if m.name.endswith(".json"):
                key = m.name.split(".")[0]
                for ext in ("pyd", "pth", "pickle"):
                    out.append((tarfile.TarInfo(f"{key}.{ext}"), payload))
        return out

    _rewrite_shard(shards_copy / "train-000000.tar", add_payloads)
    batches = list(ShardStream(shards_copy, "train", 2, num_workers=2, shuffle_buffer=0))
    assert batches[0]["key"] == ["000001", "000002"] and set(batches[0]) == {"image", "key"}
    assert not marker.exists()  # ... and streaming never sprang it


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def http_shards(celeba_shards):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=celeba_shards))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_and_pipe_urls_stream_the_same_batches(celeba_shards, http_shards):
    local = list(ShardStream(celeba_shards, "train", 2, seed=4, shuffle_buffer=6, num_workers=2))
    for prefix in (http_shards, f"pipe:cat {celeba_shards}", "pipe:cat " + str(celeba_shards) + "/{name}"):
        s = ShardStream(prefix, "train", 2, seed=4, shuffle_buffer=6, num_workers=2)
        s.load_state_dict(dict(s.state_dict(), batches=5))  # partial shards over a pipe close it early
        got = list(s)
        assert len(got) == len(local) - 5
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, local[5:]))
    with pytest.raises(ShardError, match="cannot read .*manifest.json"):
        ShardStream(http_shards + "/missing", "train", 2)
