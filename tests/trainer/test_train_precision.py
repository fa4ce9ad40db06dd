"""Mixed precision on the paths a GPU takes, shown on the CPU through the real trainer.

    pytest tests/trainer/test_train_precision.py

- DeepSpeed bf16 with batch norm: DeepSpeed casts the parameters and (by default) not the buffers, and
  batch norm then refused bf16 weights with fp32 running statistics in the first forward.
- fp16 with a GradScaler: accelerate has none on CPU, so the trainer uses torch's there. A real overflow
  (`train.inject_overflow`) is skipped by the scaler without advancing the LR or the EMA, and a
  non-finite loss under the scaler skips and aborts cleanly (the skip path used to leave the scaler
  half-way through a step, so the next clip raised `unscale_() has already been called`).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from train_helpers import GLOBAL_BATCH, assert_tensors_equal, ok, tensors, train, train_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _state(run_dir, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").read_text())


def test_zero2_bf16_with_batch_norm_trains_resumes_and_exports(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    from models import load_pretrained

    args = (f"train.batch_size={GLOBAL_BATCH // 2}", "model.norm=batch", "train.max_steps=8", "train.ckpt_every=4",
            "train.eval_every=4", "train.sample_every=8")
    # The first launch stops after its first step (train.max_time), the second resumes and finishes.
    first = ok(train(tmp_path / "run", *args, "train.max_time=0.001", procs=2, deepspeed=True,
                     extra_env={"ACCELERATE_MIXED_PRECISION": "bf16"}, timeout=300))
    assert first.status()["state"] == "preempted", first.log[-3000:]
    run = ok(train(tmp_path / "run", *args, procs=2, deepspeed=True, extra_env={"ACCELERATE_MIXED_PRECISION": "bf16"},
                   timeout=300))
    assert run.status()["state"] == "finished"
    assert "resumed from" in run.log
    rows = train_rows(run.rows)
    assert rows[-1]["step"] == 8 and all(math.isfinite(r["loss"]) for r in rows)
    model = load_pretrained(run.dir / "export")
    bn = model.encoder.features[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert torch.isfinite(bn.running_var).all() and not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@pytest.fixture(scope="module")
def fp16_overflow(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp16")
    return ok(train(d / "run", f"train.batch_size={GLOBAL_BATCH}", "train.inject_overflow=4", "train.max_steps=6",
                    "train.ckpt_every=3", "train.warmup_steps=10", "train.max_bad_steps=1",
                    extra_env={"ACCELERATE_MIXED_PRECISION": "fp16"}))


def test_fp16_overflow_is_skipped_by_the_scaler_and_advances_neither_lr_nor_ema(fp16_overflow):
    run = fp16_overflow
    rows = train_rows(run.rows)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [bool(r.get("overflow")) for r in rows] == [False, False, False, True, False, False]
    assert not any(r.get("skipped") for r in rows), "an overflow is the scaler's routine, not a bad step"
    # Not counted toward max_bad_steps=1: the run finished.
    assert run.status()["state"] == "finished"
    assert math.isfinite(rows[3]["loss"]) and not math.isfinite(rows[3]["grad_norm"])
    # The LR (logged: the last applied update's) does not advance over the overflow step.
    lrs = [r["lr"] for r in rows]
    assert lrs[3] == lrs[2] and lrs[4] > lrs[3] and lrs[2] > lrs[1]
    # The scale backs off once, as after a natural overflow, then stays.
    scales = [r["loss_scale"] for r in rows]
    assert scales[:3] == [65536.0] * 3 and scales[3:] == [32768.0] * 3, scales
    assert _state(run.dir, 6)["updates"] == 5
    assert _state(run.dir, 3)["updates"] == 3


def test_fp16_overflow_step_changes_no_weight(tmp_path, fp16_overflow):
    """The same run stopped right after the overflow step: weights, EMA and the update count are step 3's."""
    run = ok(train(tmp_path / "run", f"train.batch_size={GLOBAL_BATCH}", "train.inject_overflow=4",
                   "train.max_steps=4", "train.ckpt_every=3", "train.warmup_steps=10", "train.max_bad_steps=1",
                   extra_env={"ACCELERATE_MIXED_PRECISION": "fp16"}))
    ck = run.dir / "checkpoints"
    for f in ("model.safetensors", "ema.safetensors"):
        assert_tensors_equal(tensors(ck / "step-0000004" / f), tensors(ck / "step-0000003" / f))
    assert _state(run.dir, 4)["updates"] == 3
    # ... and the 6-step run agrees with it up to there (the hook is deterministic).
    a, b = train_rows(run.rows), train_rows(fp16_overflow.rows)[:4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_fp16_non_finite_loss_skips_and_aborts_with_the_terms_named(tmp_path):
    run = train(tmp_path / "run", f"train.batch_size={GLOBAL_BATCH}", "train.inject_nan=3:0", "train.max_bad_steps=3",
                "train.max_steps=10", extra_env={"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert run.rc != 0
    assert "unscale_() has already been called" not in run.log
    assert "aborting at step 5: 3 non-finite steps in a row" in run.log, run.log[-3000:]
    assert run.status()["state"] == "failed"
    rows = train_rows(run.rows)
    assert [bool(r.get("skipped")) for r in rows] == [False, False, True, True, True]


def test_inject_overflow_without_a_scaler_is_refused(tmp_path):
    run = train(tmp_path / "run", "train.inject_overflow=2", "train.max_steps=3")
    assert run.rc != 0 and "train.inject_overflow needs fp16 with a GradScaler" in run.log
