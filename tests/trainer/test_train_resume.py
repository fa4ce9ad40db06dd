"""Stop and resume for real: SIGTERM to the trainer and to `accelerate launch`, kill -9 in the middle of a
checkpoint save, and resuming with a different number of processes.

    pytest tests/trainer/test_train_resume.py        # ~2-3 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from train_helpers import (GLOBAL_BATCH, Launch, assert_curves_close, assert_steps_once, assert_tensors_equal,
                           checkpoints, copy_run, max_abs_diff, ok, read_metrics, reference_1proc, reference_ddp,
                           tensors, train, train_rows)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REF1 = [f"train.batch_size={GLOBAL_BATCH}", "train.ckpt_every=5", "train.keep_ckpts=3"]  # as reference_1proc
SLOW_SAVE_PY = Path(__file__).with_name("slow_save.py")  # the trainer with one save made to hang
REF_DDP = [f"train.batch_size={GLOBAL_BATCH // 2}", "train.ckpt_every=10"]  # as reference_ddp


def stop_after(launch: Launch, step: int, how) -> int:
    """Stop a run once metrics.jsonl shows `step`; returns the step it was seen at."""
    seen = launch.wait_for_step(step)
    how(launch)
    return seen


def assert_preempted(run, max_steps: int = 20) -> int:
    status = run.status()
    assert status["state"] == "preempted", status
    k = status["step"]
    assert 10 <= k < max_steps, f"the stop landed at step {k}; it must fall inside the run"
    assert f"step-{k:07d}" in checkpoints(run.dir)
    assert (run.dir / "checkpoints" / f"step-{k:07d}" / "COMMITTED").is_file()
    assert not (run.dir / "export").exists(), "a stopped run must not write the final export"
    assert not (run.dir / "STOP").exists()
    assert [r["step"] for r in train_rows(run.rows)] == list(range(1, k + 1))
    return k


def test_sigterm_then_same_command_is_bitwise_equal_1proc(tmp_path, tmp_path_factory):
    ref = reference_1proc(tmp_path_factory)
    launch = Launch(tmp_path / "run", *REF1)
    stop_after(launch, 10, lambda l: l.signal(signal.SIGTERM))
    first = launch.wait()
    assert first.rc == 0, first.log[-3000:]
    k = assert_preempted(first)
    assert "stopped by SIGTERM" in first.log

    second = ok(train(tmp_path / "run", *REF1))
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step-{k:07d}'} at step {k}" in second.log
    assert second.status()["state"] == "finished"
    assert_steps_once(second.rows, 20)
    assert_curves_close(second.rows, ref.rows, rtol=0.0)  # bitwise: every number equal
    assert_tensors_equal(tensors(second.dir / "export" / "model.safetensors"),
                         tensors(ref.dir / "export" / "model.safetensors"))
    for f in ("model.safetensors", "ema.safetensors"):
        assert_tensors_equal(tensors(second.dir / "checkpoints" / "step-0000020" / f),
                             tensors(ref.dir / "checkpoints" / "step-0000020" / f))


def test_sigterm_to_accelerate_launch_checkpoints_and_resumes_ddp(tmp_path, tmp_path_factory):
    """The elastic launcher forwards SIGTERM to both workers and gives them 30 s: they agree at the next
    step boundary, commit a checkpoint and exit 0 (the launcher itself exits non-zero, as torch's does)."""
    ref = reference_ddp(tmp_path_factory)
    launch = Launch(tmp_path / "run", *REF_DDP, procs=2)
    t_signal = [0.0]

    def term(l):
        t_signal[0] = time.monotonic()
        l.signal(signal.SIGTERM)

    stop_after(launch, 10, term)
    first = launch.wait()
    took = time.monotonic() - t_signal[0]
    k = assert_preempted(first)
    assert "stopped by SIGTERM" in first.log
    assert took < 30, f"workers needed {took:.0f} s after SIGTERM; the launcher kills them at 30 s"
    assert first.rc != 0  # torch's launcher re-raises the signal as its own failure after forwarding it

    second = ok(train(tmp_path / "run", *REF_DDP, procs=2))
    assert f"at step {k}" in second.log
    assert_steps_once(second.rows, 20)
    assert_curves_close(second.rows, ref.rows, rtol=1e-6)
    assert max_abs_diff(tensors(second.dir / "export" / "model.safetensors"),
                        tensors(ref.dir / "export" / "model.safetensors")) < 1e-6


@pytest.mark.parametrize("phase", ["tmp", "marker"])
def test_kill_9_mid_save_resumes_from_the_previous_commit(tmp_path, tmp_path_factory, phase):
    """SIGKILL while step 10's checkpoint is written (`tmp`: files in .tmp-step-0000010; `marker`: renamed to
    step-0000010 but no COMMITTED yet). The relaunch resumes from step 5, removes the leftover, and ends
    bitwise equal to the straight run. keep_ckpts=1 also shows that step 5 survives until step 10 commits."""
    ref = reference_1proc(tmp_path_factory)
    args = [f"train.batch_size={GLOBAL_BATCH}", "train.ckpt_every=5", "train.keep_ckpts=1"]
    run_dir = tmp_path / "run"
    launch = Launch(run_dir, *args, entry=SLOW_SAVE_PY,
                    extra_env={"SLOW_SAVE": f"{phase}:10"})
    leftover = run_dir / "checkpoints" / (".tmp-step-0000010" if phase == "tmp" else "step-0000010")
    launch.wait_for(lambda: (leftover / "trainer_state.json").is_file(), 120, f"{leftover.name} to be written")
    time.sleep(0.2)
    launch.kill()
    assert launch.proc.returncode == -signal.SIGKILL
    assert not (leftover / "COMMITTED").exists()
    assert sorted(checkpoints(run_dir)) == sorted(["step-0000005", leftover.name])
    assert (run_dir / "checkpoints" / "step-0000005" / "COMMITTED").is_file()

    second = ok(train(run_dir, *args))
    assert f"step-0000005 at step 5" in second.log
    assert checkpoints(run_dir) == ["step-0000020"], "the half-written folder must be removed"
    assert_steps_once(second.rows, 20)
    assert_curves_close(second.rows, ref.rows, rtol=0.0)
    assert_tensors_equal(tensors(run_dir / "export" / "model.safetensors"),
                         tensors(ref.dir / "export" / "model.safetensors"))


@pytest.mark.parametrize("direction", ["2->1", "1->2"])
def test_changed_world_size_restores_model_optimizer_and_ema(tmp_path, tmp_path_factory, direction):
    """Resume step 10 (an epoch boundary: 160 samples = 10 global batches) with the other process count and
    the same global batch. The trainer says so, re-derives the data position (the next epoch), and the rest
    of the run matches the straight run of either world size: weights, Adam moments and EMA came back.
    (Checked by hand: emptying the checkpoint's Adam state fails the curve comparison from step 12 on.)"""
    if direction == "2->1":
        src, procs, args, saved, now = reference_ddp(tmp_path_factory), 1, [f"train.batch_size={GLOBAL_BATCH}"], 2, 1
    else:
        src, procs, args, saved, now = reference_1proc(tmp_path_factory), 2, [f"train.batch_size={GLOBAL_BATCH // 2}"], 1, 2
    other = reference_1proc(tmp_path_factory) if procs == 1 else reference_ddp(tmp_path_factory)
    run_dir = copy_run(src.dir, tmp_path / "run", keep_ckpt="step-0000010")
    state = json.loads((run_dir / "checkpoints" / "step-0000010" / "trainer_state.json").read_text())
    assert state["world_size"] == saved

    # Zero steps to go: the export is the EMA exactly as restored (at 20 steps the EMA's warm-up has
    # forgotten most of step 10, so the end-of-run export alone could not tell a reset EMA apart).
    zero = ok(train(run_dir, *args, "train.ckpt_every=10", "train.max_steps=10", procs=procs))
    assert f"world size changed {saved} -> {now}" in zero.log
    assert_tensors_equal(tensors(run_dir / "export" / "model.safetensors"),
                         tensors(run_dir / "checkpoints" / "step-0000010" / "ema.safetensors"))

    run = ok(train(run_dir, *args, "train.ckpt_every=10", procs=procs))
    assert f"world size changed {saved} -> {now}" in run.log
    assert "at step 10" in run.log
    assert_steps_once(run.rows, 20)
    trained = json.loads((run_dir / "checkpoints" / "step-0000020" / "trainer_state.json").read_text())
    assert (trained["step"], trained["updates"], trained["world_size"]) == (20, 20, now)
    assert_curves_close(run.rows, src.rows, rtol=1e-4, grad_rtol=5e-3)
    assert_curves_close(run.rows, other.rows, rtol=1e-4, grad_rtol=5e-3)
    ema = tensors(run_dir / "export" / "model.safetensors")  # the export holds the EMA weights
    assert max_abs_diff(ema, tensors(src.dir / "export" / "model.safetensors")) < 1e-4
    raw = tensors(run_dir / "checkpoints" / "step-0000020" / "model.safetensors")
    assert max_abs_diff(raw, tensors(src.dir / "checkpoints" / "step-0000020" / "model.safetensors")) < 1e-4


def test_rerunning_a_finished_run_never_deletes_its_newest_checkpoint(tmp_path, tmp_path_factory):
    """The same command after the end resumes at max_steps and trains nothing. Its final save must not
    remove the committed step-0000020 before a replacement is committed: here that save would hang
    (SLOW_SAVE) and be killed, and with keep_ckpts=1 nothing would be left to resume from."""
    ref = reference_1proc(tmp_path_factory)
    run_dir = copy_run(ref.dir, tmp_path / "run", keep_ckpt="step-0000020")
    launch = Launch(run_dir, f"train.batch_size={GLOBAL_BATCH}", "train.ckpt_every=5", "train.keep_ckpts=1",
                    entry=SLOW_SAVE_PY,
                    extra_env={"SLOW_SAVE": "tmp:20"})
    tmp = run_dir / "checkpoints" / ".tmp-step-0000020"
    deadline = time.monotonic() + 120
    while launch.proc.poll() is None and not (tmp / "trainer_state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    launch.kill()
    assert (run_dir / "checkpoints" / "step-0000020" / "COMMITTED").is_file(), checkpoints(run_dir)
    assert_tensors_equal(tensors(run_dir / "checkpoints" / "step-0000020" / "model.safetensors"),
                         tensors(ref.dir / "checkpoints" / "step-0000020" / "model.safetensors"))
    assert launch.proc.returncode == 0, launch.text()[-3000:]
    assert [r["step"] for r in train_rows(read_metrics(run_dir))] == list(range(1, 21))


def test_sigusr1_stops_a_direct_launch_and_a_stale_stop_file_does_not(tmp_path):
    """SIGUSR1 works like SIGTERM for a trainer started without the elastic launcher (which would die on it).
    A STOP file left from an earlier launch is removed at start-up instead of stopping the new run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    launch = Launch(run_dir, f"train.batch_size={GLOBAL_BATCH}", "train.ckpt_every=100")
    stop_after(launch, 10, lambda l: l.signal(signal.SIGUSR1))
    run = launch.wait()
    assert run.rc == 0, run.log[-3000:]
    k = assert_preempted(run)
    assert run.status()["reason"] == "SIGUSR1"
    assert checkpoints(run_dir) == [f"step-{k:07d}"]


def test_batch_norm_run_stopped_and_resumed_matches_uninterrupted_bitwise(tmp_path):
    """With batch norm the checkpoint holds running statistics (the tiny config elsewhere uses group norm,
    which has none): they are saved, loaded and restored on skipped steps like every other tensor."""
    args = (f"train.batch_size={GLOBAL_BATCH}", "model.norm=batch", "train.max_steps=8", "train.eval_every=4",
            "train.sample_every=8", "train.ckpt_every=100")
    straight = ok(train(tmp_path / "straight", *args))
    # The clock is read with each step's inputs: the first step read after 1 ms is the last, step 1 or 2.
    first = ok(train(tmp_path / "run", *args, "train.max_time=0.001"))
    status = first.status()
    assert (status["state"], status["reason"]) == ("preempted", "train.max_time") and status["step"] in (1, 2), status
    resumed = ok(train(tmp_path / "run", *args))
    assert "resumed from" in resumed.log and resumed.status()["state"] == "finished"
    assert_steps_once(resumed.rows, 8)
    assert_curves_close(resumed.rows, straight.rows, rtol=0.0)
    for f in ("export/model.safetensors", "checkpoints/step-0000008/ema.safetensors"):
        assert_tensors_equal(tensors(resumed.dir / f), tensors(straight.dir / f))
