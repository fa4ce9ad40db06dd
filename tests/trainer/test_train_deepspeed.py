"""DeepSpeed ZeRO-2 with 2 processes on CPU (gloo): trains, stops through the STOP file, resumes, exports.

    pytest tests/trainer/test_train_deepspeed.py      # DeepSpeed's start-up makes this the slowest file

ZeRO-2 partitions the optimizer state and gradients but computes the same fp32 update as DDP, so its
weights equal a DDP run's under the same seed, to a tight tolerance.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from train_helpers import (GLOBAL_BATCH, REPO, Launch, assert_curves_close, assert_steps_once, checkpoints,
                           copy_run, env, max_abs_diff, ok, reference_ddp, shared_run, tensors, train, train_rows)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")

ARGS = [f"train.batch_size={GLOBAL_BATCH // 2}", "train.ckpt_every=10"]  # as reference_ddp


def _stopped_and_resumed(d):
    launch = Launch(d / "run", *ARGS, procs=2, deepspeed=True)
    launch.wait_for_step(10, timeout=300)
    (d / "run" / "STOP").touch()
    first = launch.wait(300)
    first_status = first.status()  # before the relaunch rewrites it
    snapshot = copy_run(first.dir, d / "stopped", keep_ckpt=f"step-{first_status['step']:07d}") \
        if first.rc == 0 and first_status["state"] == "preempted" else None
    # train.sync_free is ignored under DeepSpeed (the engine steps inside backward), saying so.
    second = train(d / "run", *ARGS, "train.sync_free=true", procs=2, deepspeed=True, timeout=300)
    return (first, first_status), second, snapshot


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return shared_run("zero2", tmp_path_factory, _stopped_and_resumed)


def test_zero2_trains_stops_on_the_stop_file_and_resumes(zero2):
    (first, status), second, _ = zero2
    assert first.rc == 0, first.log[-4000:]
    assert status["state"] == "preempted" and status["reason"] == "STOP file", status
    k = status["step"]
    assert 10 <= k < 20
    ck = zero2[2] / "checkpoints" / f"step-{k:07d}"  # the snapshot taken before the relaunch
    assert (ck / "COMMITTED").is_file() and (ck / "data_rank0.json").is_file() and (ck / "data_rank1.json").is_file()
    assert (ck / "pytorch_model").is_dir(), "a ZeRO checkpoint holds DeepSpeed's per-rank shards"
    ok(second)
    assert f"at step {k}" in second.log
    assert "train.sync_free is ignored under DeepSpeed" in second.log
    assert second.status()["state"] == "finished"
    assert_steps_once(second.rows, 20)
    assert not (second.dir / "STOP").exists()
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in train_rows(second.rows))


def test_zero2_matches_ddp_under_the_same_seed(zero2, tmp_path_factory):
    _, second, _ = zero2
    ddp = reference_ddp(tmp_path_factory)
    ok(second)
    assert_curves_close(second.rows, ddp.rows, rtol=1e-4, grad_rtol=5e-3)


def test_export_raw_consolidates_zero_shards_close_to_ddp(zero2, tmp_path_factory, tmp_path):
    _, second, _ = zero2
    ddp = reference_ddp(tmp_path_factory)
    ok(second)
    done = subprocess.run([sys.executable, "-m", "trainer.export", str(second.dir), "--weights", "raw",
                           "--out", str(tmp_path / "raw")], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = tensors(tmp_path / "raw" / "model.safetensors")
    ddp_raw = tensors(ddp.dir / "checkpoints" / "step-0000020" / "model.safetensors")
    assert max_abs_diff(raw, ddp_raw) < 1e-3
    # the trainer's own end-of-run export (EMA) against the DDP run's
    assert max_abs_diff(tensors(second.dir / "export" / "model.safetensors"),
                        tensors(ddp.dir / "export" / "model.safetensors")) < 1e-3
    from models import load_pretrained
    assert load_pretrained(str(tmp_path / "raw")).config.latent_dim == 16


def test_zero2_checkpoint_with_another_process_count_stops_with_a_clear_message(zero2, tmp_path):
    _, _, snapshot = zero2
    assert snapshot is not None, "the first ZeRO-2 launch did not stop cleanly"
    run_dir = copy_run(snapshot, tmp_path / "run", keep_ckpt=checkpoints(snapshot)[0])
    run = train(run_dir, f"train.batch_size={GLOBAL_BATCH}", deepspeed=True, timeout=300,
                procs=1)
    assert run.rc != 0
    assert "was written by 2 DeepSpeed ranks; resume it with 2 processes" in run.log


def test_zero2_checkpoint_resumed_without_deepspeed_stops_with_a_clear_message(zero2, tmp_path):
    _, _, snapshot = zero2
    assert snapshot is not None, "the first ZeRO-2 launch did not stop cleanly"
    run_dir = copy_run(snapshot, tmp_path / "run", keep_ckpt=checkpoints(snapshot)[0])
    run = train(run_dir, *ARGS, procs=2, timeout=300)  # the same processes, plain DDP
    assert run.rc != 0
    assert "was written under DeepSpeed; resume it with the accelerate config it was written with" in run.log
    assert "python -m trainer.export" in run.log and "train.init_from" in run.log
