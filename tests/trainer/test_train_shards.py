"""The trainer on real WebDataset shards (`shards.stream.ShardStream`, one DataLoader worker): resuming from a
mid-epoch checkpoint and from one taken right at the end of an epoch gives the straight run's numbers bitwise.

    pytest tests/trainer/test_train_shards.py
"""
from __future__ import annotations

import numpy as np
import pytest

from train_helpers import (assert_curves_close, assert_steps_once, assert_tensors_equal, copy_run, ok, shared_run,
                           tensors, train)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

stream = pytest.importorskip("shards.stream", reason="shards.stream (the shard reader) is not importable yet")

# 160 training images, batch 16, 1 rank x 1 worker: an epoch is 10 steps, so step 10 ends one exactly.
ARGS = ["data.synthetic=false", "model.channels=3", "data.num_workers=1", "data.shuffle_buffer=64",
        "train.batch_size=16", "train.ckpt_every=5", "train.keep_ckpts=4"]


def _make_shards(d):
    from PIL import Image

    from shards.write import write_folder

    rng = np.random.default_rng(0)
    src = d / "images"
    src.mkdir()
    for i in range(200):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(low).resize((32, 32), Image.BILINEAR).save(src / f"img{i:03d}.png")
    write_folder(str(d / "shards"), str(src), size=28, fmt="png", test_fraction=0.2, shard_samples=50,
                 workers=1, progress=False)
    return d / "shards"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    def build(d):
        shards = _make_shards(d)
        return shards, ok(train(d / "run", *ARGS, f"data.shards={shards}"))
    return shared_run("shards_straight", tmp_path_factory, build)


@pytest.mark.parametrize("ckpt", ["step-0000015", "step-0000010"], ids=["mid-epoch", "end-of-epoch"])
def test_resume_on_shards_is_bitwise_equal(straight, tmp_path, ckpt):
    shards, ref = straight
    assert ref.status()["state"] == "finished"
    run_dir = copy_run(ref.dir, tmp_path / "run", keep_ckpt=ckpt)
    run = ok(train(run_dir, *ARGS, f"data.shards={shards}"))
    assert f"at step {int(ckpt.split('-')[1])}" in run.log
    assert_steps_once(run.rows, 20)
    assert_curves_close(run.rows, ref.rows, rtol=0.0)
    assert_tensors_equal(tensors(run_dir / "export" / "model.safetensors"),
                         tensors(ref.dir / "export" / "model.safetensors"))
