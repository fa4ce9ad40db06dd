"""`train.cuda_graph=true` through the real command line, on the CPU. There the step's two parts run
uncaptured over the static buffers a CUDA graph would replay (trainer/step_graph.py): the batches, the
noise and the host's flags copied in, the outputs overwritten each step, the LR read from a tensor, Adam
in capturable mode. Runs are bitwise the default run wherever that plumbing could go wrong:

- batch norm, alone and with train.sync_free (whose EMA reads a step late, between the two parts);
- NaN in the input from a step after the capture, until the abort: the skip replays as it runs eagerly;
- adv.start: the discriminators switch on after the first capture, so the step is captured anew;
- resume across the setting, both ways (a checkpoint holds the LR as a float or as a tensor).
The replay itself, and the speed, need a GPU: tests/gpu/test_gpu_train.py and bench/train.py --cuda-graph.

    pytest tests/trainer/test_train_cuda_graph.py        # ~2 minutes on 2 CPU cores
"""
from __future__ import annotations

import json

import pytest

from test_train_sync_free import BN, assert_runs_bitwise_equal, bn_default
from train_helpers import (GLOBAL_BATCH, assert_rows_equal, assert_steps_once, assert_tensors_equal, checkpoints,
                           copy_run, ok, shared_run, tensors, train, train_rows)
from trainer.step_graph import WARMUP

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GRAPH = "train.cuda_graph=true"
# A capturable Adam says so in its param groups; nothing else in the optimizer state differs.
IGNORE = ("lr", "capturable")


def captured(log: str) -> list[str]:
    return [line.split("train.cuda_graph: ", 1)[1] for line in log.splitlines() if "train.cuda_graph: step" in line]


def bn_graph(tmp_path_factory):
    return shared_run("cuda_graph_bn", tmp_path_factory, lambda d: ok(train(d / "run", *BN, GRAPH)))


@pytest.mark.parametrize("sync_free", [False, True], ids=["cuda_graph", "cuda_graph_sync_free"])
def test_batch_norm_run_is_bitwise_the_default_run(tmp_path, tmp_path_factory, sync_free):
    ref = bn_default(tmp_path_factory)
    run = bn_graph(tmp_path_factory) if not sync_free else ok(train(tmp_path / "run", *BN, GRAPH,
                                                                      "train.sync_free=true"))
    assert "train.cuda_graph: no CUDA device; the step's parts run uncaptured" in run.log
    assert captured(run.log) == [f"step {WARMUP + 1} captured; the steps after it replay it"]
    assert_steps_once(run.rows, 20)
    assert_rows_equal(run.rows, ref.rows)
    assert_runs_bitwise_equal(run.dir, ref.dir, ignore_groups=IGNORE)


def test_nan_after_the_capture_skips_each_step_and_aborts_as_the_default_does(tmp_path):
    """NaN in the batches from step 6 (after the capture at step 4), 3 bad steps allowed: both runs abort at
    step 8 with the same message; the skipped steps changed nothing (checkpoint 7 holds step 5's weights)."""
    args = (f"train.batch_size={GLOBAL_BATCH}", "train.inject_nan=6:0", "train.max_bad_steps=3",
            "train.ckpt_every=1", "train.keep_ckpts=10")
    ref = train(tmp_path / "default", *args)
    run = train(tmp_path / "graph", *args, GRAPH)
    msg = "aborting at step 8: 3 non-finite steps in a row (train.max_bad_steps=3); non-finite on some rank: "
    for r in (ref, run):
        assert r.rc != 0 and msg in r.log, r.log[-3000:]
        assert r.status()["state"] == "failed" and r.status()["step"] == 8
    assert [bool(r.get("skipped")) for r in train_rows(run.rows)] == [False] * 5 + [True] * 3
    assert_rows_equal(run.rows, ref.rows)
    assert checkpoints(run.dir) == checkpoints(ref.dir) == [f"step-{k:07d}" for k in range(1, 8)]
    assert_runs_bitwise_equal(run.dir, ref.dir, export=False, ignore_groups=IGNORE)
    ck = run.dir / "checkpoints"
    for f in ("model.safetensors", "ema.safetensors"):
        assert_tensors_equal(tensors(ck / "step-0000007" / f), tensors(ck / "step-0000005" / f))
    state = json.loads((ck / "step-0000007" / "trainer_state.json").read_text())
    assert (state["step"], state["updates"], state["bad_streak"]) == (7, 5, 2)


def test_the_adversarial_start_captures_the_step_anew(tmp_path, tmp_path_factory):
    """The discriminators switch on at update 5, after the first capture (step 4): steps 6-8 warm the new
    step up and step 9 captures it, with both models' masked updates."""
    from test_train_adv import ADV, MODELS, OPTIMIZERS, REF1, adv_1proc

    ref = adv_1proc(tmp_path_factory)
    run = ok(train(tmp_path / "run", *ADV, *REF1, GRAPH))
    assert captured(run.log) == [f"step {WARMUP + 1} captured; the steps after it replay it",
                                 f"step {5 + WARMUP + 1} captured with the discriminators; the steps after it "
                                 f"replay it"]
    assert_rows_equal(run.rows, ref.rows)
    assert_runs_bitwise_equal(run.dir, ref.dir, models=MODELS, optimizers=OPTIMIZERS, ignore_groups=IGNORE)


@pytest.mark.parametrize("direction", ["into_cuda_graph", "out_of_cuda_graph"])
def test_resume_across_the_setting_is_bitwise_the_default(tmp_path, tmp_path_factory, direction):
    """A default checkpoint resumed with train.cuda_graph (its float LR becomes the tensor a capture reads,
    Adam becomes capturable), and a cuda_graph checkpoint resumed without it (the tensor LR is filled in
    place, uncaptured)."""
    ref = bn_default(tmp_path_factory)
    src = ref if direction == "into_cuda_graph" else bn_graph(tmp_path_factory)
    d = copy_run(src.dir, tmp_path / "run", keep_ckpt="step-0000010")
    run = ok(train(d, *BN, *([GRAPH] if direction == "into_cuda_graph" else [])))
    assert "resumed from" in run.log and "at step 10" in run.log
    assert [r["step"] for r in train_rows(run.rows)] == list(range(1, 21))
    assert_rows_equal(run.rows, ref.rows)
    assert_runs_bitwise_equal(run.dir, ref.dir, ignore_groups=IGNORE)


def test_two_processes_are_refused_before_the_run_directory_is_written(tmp_path):
    run = train(tmp_path / "run", f"train.batch_size={GLOBAL_BATCH // 2}", GRAPH, procs=2)
    assert run.rc != 0
    assert ("train.cuda_graph=true needs one CUDA process in bf16 or fp32 without DeepSpeed (2 processes: the "
            "graphs hold one process's step, not DDP's all-reduce); run without train.cuda_graph") in run.log
    assert not (tmp_path / "run" / "config.yaml").exists()
