"""`train.sync_free=true`: the host reads each step's numbers one step late, while the next step's forward
and backward are queued. The weights, the optimizer, the buffers and the EMA go through the same
operations in the same order as by default, so on the CPU a sync-free run is bitwise the default run.
These tests hold it so where the lag matters:

- batch norm: the EMA of step k runs after step k+1's forward has moved the running statistics, so it
  reads them from the backup that step k+1 saved (reading the live ones fails the first test);
- a skipped step read late (an fp16 overflow; NaN on one rank of two until the abort);
- a stop request, seen one step late: the checkpoint comes after the step queued meanwhile;
- adv.start: whether a step trains the discriminators depends on the previous step's count, so the
  steps before the start are read at once (without that rule the adversarial test fails).

    pytest tests/trainer/test_train_sync_free.py        # ~2 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_helpers import (GLOBAL_BATCH, Launch, assert_checkpoints_equal, assert_rows_equal, assert_steps_once,
                           assert_tensors_equal, checkpoints, ok, shared_run, tensors, train, train_rows)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SYNC_FREE = "train.sync_free=true"
# Batch norm; checkpoints every 5 steps, evaluation every 10: steps 1-4, 6-9, ... are read a step late.
BN = (f"train.batch_size={GLOBAL_BATCH}", "model.norm=batch", "train.ckpt_every=5", "train.keep_ckpts=5")


def assert_runs_bitwise_equal(a: Path, b: Path, *, models=("model.safetensors", "ema.safetensors"),
                              optimizers=("optimizer.bin",), export: bool = True, ignore_groups=("lr",)) -> None:
    """Every checkpoint the two runs share (weights, EMA, optimizer state but `ignore_groups` of its param
    groups, counters) and the export."""
    ckpts = sorted(set(checkpoints(a)) & set(checkpoints(b)))
    assert ckpts, f"no checkpoint in common: {checkpoints(a)} vs {checkpoints(b)}"
    for name in ckpts:
        ca, cb = a / "checkpoints" / name, b / "checkpoints" / name
        assert_checkpoints_equal(ca, cb, models, optimizers, ignore_groups)
        state = lambda c: json.loads((c / "trainer_state.json").read_text())  # noqa: E731
        assert state(ca) == state(cb), name
    if export:
        assert_tensors_equal(tensors(a / "export" / "model.safetensors"), tensors(b / "export" / "model.safetensors"))


def bn_default(tmp_path_factory):
    return shared_run("sync_free_bn_default", tmp_path_factory, lambda d: ok(train(d / "run", *BN)))


def test_batch_norm_run_is_bitwise_the_default_run(tmp_path, tmp_path_factory):
    ref = bn_default(tmp_path_factory)
    run = ok(train(tmp_path / "run", *BN, SYNC_FREE))
    assert run.status()["state"] == "finished"
    assert_steps_once(run.rows, 20)
    assert_rows_equal(run.rows, ref.rows)  # training and validation rows, in the same order
    assert checkpoints(run.dir) == checkpoints(ref.dir) == [f"step-{k:07d}" for k in (5, 10, 15, 20)]
    assert_runs_bitwise_equal(run.dir, ref.dir)


def test_a_stop_is_seen_a_step_late_and_the_resumed_run_is_bitwise_the_default(tmp_path, tmp_path_factory):
    """The STOP file is read with step k's numbers, while step k+1 is already queued: the run checkpoints
    after step k+1 (not a step it had to throw away) and exits 0; the same command resumes it."""
    ref = bn_default(tmp_path_factory)
    launch = Launch(tmp_path / "run", *BN, SYNC_FREE)
    launch.wait_for_step(6)
    (tmp_path / "run" / "STOP").touch()
    first = launch.wait()
    assert first.rc == 0, first.log[-3000:]
    status = first.status()
    assert status["state"] == "preempted" and status["reason"] == "STOP file", status
    k = status["step"]
    assert 6 < k < 20, f"stopped at step {k}"
    assert f"step-{k:07d}" in checkpoints(first.dir)
    assert [r["step"] for r in train_rows(first.rows)] == list(range(1, k + 1))  # every step logged once
    resumed = ok(train(tmp_path / "run", *BN, SYNC_FREE))
    assert f"at step {k}" in resumed.log and resumed.status()["state"] == "finished"
    assert_steps_once(resumed.rows, 20)
    assert_rows_equal(resumed.rows, ref.rows)
    assert_runs_bitwise_equal(resumed.dir, ref.dir)


def test_an_fp16_overflow_read_a_step_late_is_bitwise_the_default(tmp_path):
    """CPU fp16 with torch's GradScaler; step 7's backward overflows for real (train.inject_overflow). Step 7
    is read during step 8: by then step 8's update is queued with the LR of step 6's count, as by default."""
    args = (*BN, "train.max_steps=10", "train.inject_overflow=7", "train.warmup_steps=20", "train.max_bad_steps=1")
    fp16 = {"ACCELERATE_MIXED_PRECISION": "fp16"}
    ref = ok(train(tmp_path / "default", *args, extra_env=fp16))
    run = ok(train(tmp_path / "sync_free", *args, SYNC_FREE, extra_env=fp16))
    rows = {r["step"]: r for r in train_rows(run.rows)}
    assert rows[7].get("overflow") and rows[8]["loss_scale"] < rows[6]["loss_scale"]
    assert rows[7]["lr"] == rows[6]["lr"] < rows[8]["lr"]  # the skipped update did not advance the warm-up
    assert_rows_equal(run.rows, ref.rows)
    assert_runs_bitwise_equal(run.dir, ref.dir)


def test_nan_on_one_rank_read_a_step_late_skips_on_both_and_aborts_at_the_same_step(tmp_path):
    """As tests/trainer/test_train_faults.py's first test, sync-free: 2 gloo processes, NaN in rank 1's
    batches from step 3, checkpoints every 2 steps (odd steps are read late). The abort names step 5 on
    both ranks while step 6 is queued, and nothing non-finite reached a checkpoint."""
    run = train(tmp_path / "run", f"train.batch_size={GLOBAL_BATCH // 2}", "train.inject_nan=3:1",
                "train.max_bad_steps=3", "train.ckpt_every=2", "train.keep_ckpts=5", SYNC_FREE, procs=2)
    assert run.rc != 0
    msg = ("aborting at step 5: 3 non-finite steps in a row (train.max_bad_steps=3); non-finite on some rank: "
           "kl, loss, rec_1, rec_2")
    for rank in (0, 1):
        assert f"[rank{rank}]: FloatingPointError: {msg}" in run.log, run.log[-3000:]
    status = run.status()
    assert (status["state"], status["step"], status["reason"]) == ("failed", 5, msg), status
    rows = train_rows(run.rows)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [bool(r.get("skipped")) for r in rows] == [False, False, True, True, True]
    ck = tmp_path / "run" / "checkpoints"
    for f in ("model.safetensors", "ema.safetensors"):
        assert_tensors_equal(tensors(ck / "step-0000004" / f), tensors(ck / "step-0000002" / f))
    state = json.loads((ck / "step-0000004" / "trainer_state.json").read_text())
    assert (state["step"], state["updates"], state["bad_streak"]) == (4, 2, 2)


def test_the_adversarial_start_is_exact_when_read_late(tmp_path, tmp_path_factory):
    """The discriminators switch on at update 5. With checkpoints every 4 steps, step 5 is read late, so
    step 6 must read it first to know that it trains them. Compared with the default run of the same
    config (checkpoints every 5: when checkpoints fall changes no number)."""
    from test_train_adv import ADV, ADV_KEYS, MODELS, OPTIMIZERS, REF1, adv_1proc

    ref = adv_1proc(tmp_path_factory)
    run = ok(train(tmp_path / "run", *ADV, *REF1, "train.ckpt_every=4", SYNC_FREE))
    rows = train_rows(run.rows)
    assert [bool(set(ADV_KEYS) & set(r)) for r in rows] == [False] * 5 + [True] * 15
    assert_rows_equal(run.rows, ref.rows)
    assert_runs_bitwise_equal(run.dir, ref.dir, models=MODELS, optimizers=OPTIMIZERS)
