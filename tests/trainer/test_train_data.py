"""The trainer's data set-up: the held-out stream on a small split, and where `data.auto_build` may build.

    pytest tests/trainer/test_train_data.py
"""
from __future__ import annotations

import os

import pytest

import shards.write
from shards.synthetic import make_celeba_layout
from shards.write import write_celeba
from trainer.config import load_config
from trainer.data import build_stream, ensure_shards

N_TRAIN, N_TEST = 12, 10


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """28 px RGB shards: 12 train images, a 10-image test split in shards of 3."""
    root = tmp_path_factory.mktemp("train_data")
    src = make_celeba_layout(root / "src", N_TRAIN + N_TEST, zip_too=False)
    src["partition"].write_text("".join(f"{i:06d}.jpg {2 if i <= N_TEST else 0}\n"
                                        for i in range(1, N_TRAIN + N_TEST + 1)))
    out = root / "shards"
    write_celeba(str(out), str(src["images"]), size=28, shard_samples=3, workers=1, progress=False)
    return out


def _cfg(shards, *overrides):
    return load_config("mnist", [f"data.shards={shards}", "model.channels=3", *overrides])


def test_held_out_stream_uses_the_workers_a_small_split_can_feed(small_shards):
    """8 workers x batch 4 would need 32 held-out images per rank; the 10 feed 2 workers (1 per rank for 2)."""
    cfg = _cfg(small_shards, "data.num_workers=8", "train.batch_size=4")
    val = build_stream(cfg, cfg.data.val_split, 0, 1, train=False)
    assert val.num_workers == 2 and len(val) == 2
    keys = [k for batch in val for k in batch["key"]]
    assert len(keys) == len(set(keys)) == 8 and all(int(k) <= N_TEST for k in keys)  # test images only
    ranks = [build_stream(cfg, cfg.data.val_split, r, 2, train=False) for r in (0, 1)]
    assert [(s.num_workers, len(s)) for s in ranks] == [(1, 1), (1, 1)]
    keys = [k for s in ranks for batch in s for k in batch["key"]]
    assert len(set(keys)) == 8
    with pytest.raises(ValueError, match="fewer than world_size"):  # the training stream keeps its workers
        build_stream(cfg, cfg.data.train_split, 0, 1, train=True)


def test_held_out_stream_in_process_stays_in_process(small_shards):
    cfg = _cfg(small_shards, "data.num_workers=0", "train.batch_size=4")
    val = build_stream(cfg, cfg.data.val_split, 0, 1, train=False)
    assert val.num_workers == 0 and len(val) == 2


def test_held_out_split_smaller_than_one_batch_per_rank_says_what_to_do(small_shards):
    cfg = _cfg(small_shards, "data.num_workers=8", "train.batch_size=4")
    with pytest.raises(ValueError) as e:
        build_stream(cfg, cfg.data.val_split, 0, 3, train=False)  # 3 ranks x 4 > 10
    msg = str(e.value)
    for part in ("'test'", "10 samples", "3 ranks", "train.batch_size=4", "smaller train.batch_size",
                 "fewer processes", "bigger split"):
        assert part in msg, msg


@pytest.fixture
def builds(monkeypatch, tmp_path):
    """Run in an empty directory and record MNIST builds instead of writing 70,000 images."""
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(shards.write, "write_mnist", lambda out, size: calls.append((out, size)))
    return calls


def test_auto_build_refuses_a_path_given_in_place_of_the_presets(builds, tmp_path):
    typo = tmp_path / "dta" / "mnist28"
    cfg = load_config("mnist", [f"data.shards={typo}"])
    for is_main in (True, False):  # every rank stops, not only the one that would build
        with pytest.raises(FileNotFoundError) as e:
            ensure_shards(cfg, is_main)
        assert str(typo / "manifest.json") in str(e.value)
        assert f"python -m shards.write mnist --out {typo}" in str(e.value)
    assert builds == [] and not typo.exists()


@pytest.mark.parametrize("overrides", [[], ["data.shards=data/mnist28"], ["data.shards=./data/mnist28/"]])
def test_auto_build_builds_at_the_presets_own_path(builds, overrides):
    ensure_shards(load_config("mnist", overrides), is_main=True)
    ensure_shards(load_config("mnist", overrides), is_main=False)  # the other ranks wait for the main one
    assert [(os.path.abspath(out), size) for out, size in builds] == [(os.path.abspath("data/mnist28"), 28)]


def test_auto_build_at_an_absolute_path_to_the_presets_own(builds, tmp_path):
    ensure_shards(load_config("mnist", [f"data.shards={tmp_path / 'data' / 'mnist28'}"]), is_main=True)
    assert builds == [(str(tmp_path / "data" / "mnist28"), 28)]
