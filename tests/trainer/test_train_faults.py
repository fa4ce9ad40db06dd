"""Non-finite steps for real: `train.inject_nan=STEP:RANK` puts a NaN into that rank's batch from STEP on.

    pytest tests/trainer/test_train_faults.py
"""
from __future__ import annotations

import json
import math

import pytest

from train_helpers import (GLOBAL_BATCH, assert_curves_close, assert_tensors_equal, ok, reference_1proc, tensors,
                           train, train_rows)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_nan_on_one_rank_skips_the_step_on_both_and_aborts_after_the_limit(tmp_path):
    run = train(tmp_path / "run", f"train.batch_size={GLOBAL_BATCH // 2}", "train.inject_nan=3:1",
                "train.max_bad_steps=3", "train.ckpt_every=2", "train.keep_ckpts=5", procs=2)
    assert run.rc != 0
    msg = "aborting at step 5: 3 non-finite steps in a row (train.max_bad_steps=3); non-finite on some rank: "
    assert msg in run.log
    # The reduced flag makes both ranks skip, and both abort at the same step naming the same terms.
    for rank in (0, 1):
        assert f"[rank{rank}]: FloatingPointError: {msg}kl, loss, rec_1, rec_2" in run.log, run.log[-3000:]
    status = run.status()
    assert status["state"] == "failed" and status["step"] == 5 and "aborting at step 5" in status["reason"]
    assert status["reason"].endswith("non-finite on some rank: kl, loss, rec_1, rec_2")  # the terms, named
    rows = train_rows(run.rows)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [bool(r.get("skipped")) for r in rows] == [False, False, True, True, True]
    assert all(math.isfinite(r["loss"]) for r in rows[:2]) and all(math.isnan(r["loss"]) for r in rows[2:])
    assert not (tmp_path / "run" / "export").exists()
    # Step 4's checkpoint (written after two skipped steps) holds rank 0's weights: the healthy rank did
    # not step either, and nothing non-finite reached the weights or the EMA.
    ck = tmp_path / "run" / "checkpoints"
    for f in ("model.safetensors", "ema.safetensors"):
        assert_tensors_equal(tensors(ck / "step-0000004" / f), tensors(ck / "step-0000002" / f))
    state = json.loads((ck / "step-0000004" / "trainer_state.json").read_text())
    assert (state["step"], state["updates"], state["bad_streak"]) == (4, 2, 2)


def test_a_skipped_step_advances_neither_the_lr_schedule_nor_the_ema(tmp_path, tmp_path_factory):
    """The finite-check gate that an fp16 overflow also goes through (accelerate has no GradScaler on CPU):
    steps 6-8 are non-finite and skipped, so the weights, the EMA, the update count and the lr stay at
    step 5, while `step` counts on."""
    ref = reference_1proc(tmp_path_factory)
    run = ok(train(tmp_path / "run", f"train.batch_size={GLOBAL_BATCH}", "train.inject_nan=6:0",
                   "train.max_bad_steps=10", "train.max_steps=8", "train.ckpt_every=5"))
    rows = train_rows(run.rows)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [bool(r.get("skipped")) for r in rows] == [False] * 5 + [True] * 3
    assert_curves_close(rows[:5], train_rows(ref.rows)[:5], rtol=0.0)  # warmup: lr independent of max_steps
    assert [r["lr"] for r in rows[5:]] == [rows[4]["lr"]] * 3
    ck = tmp_path / "run" / "checkpoints"
    state = json.loads((ck / "step-0000008" / "trainer_state.json").read_text())
    assert (state["step"], state["updates"], state["bad_streak"]) == (8, 5, 3)
    for f in ("model.safetensors", "ema.safetensors"):
        assert_tensors_equal(tensors(ck / "step-0000008" / f), tensors(ck / "step-0000005" / f))
    assert_tensors_equal(tensors(tmp_path / "run" / "export" / "model.safetensors"),
                         tensors(ck / "step-0000005" / "ema.safetensors"))
    assert run.status()["state"] == "finished"
