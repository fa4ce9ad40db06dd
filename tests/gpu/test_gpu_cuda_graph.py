"""`train.cuda_graph=true` on one GPU: the step captured as two CUDA graphs after 3 eager steps, then
replayed (trainer/step_graph.py). On the CPU these runs are bitwise the default (tests/trainer); here the
replay itself is on trial:

- bf16, alone and with train.sync_free: within the run-to-run noise of the default run, same LRs (a graph
  that froze the LR, the batch or the noise would be far outside it);
- NaN in the input after the capture: each replayed step is skipped on the device, so the checkpoints
  of the skipped steps hold the last good step's weights and EMA, until the abort;
- the adversarial refiner switching on at update 5: a second capture, with both models' updates;
- with torch.compile: Inductor's kernels inside the captured graphs (skipped in the CPU dry run).

    python -m pytest -m gpu tests/gpu/test_gpu_cuda_graph.py -v -rA
"""
from __future__ import annotations

import json

import pytest

from gpu_helpers import GRAPH_NAN_STEP, LONG_STEPS, assert_finished, assert_steps_once, tensors, train_rows
from test_gpu_resume import assert_within_noise

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

WARMUP = 3  # trainer.step_graph.WARMUP: the eager steps before the first capture


def captures(log: str) -> list[str]:
    return [line.split("train.cuda_graph: ", 1)[1] for line in log.splitlines() if "train.cuda_graph: step" in line]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.gpu_runs(n, "bf16", "bf16_again"), id=n)
                                  for n in ("bf16_cuda_graph", "bf16_cuda_graph_sync_free")])
def test_replayed_steps_match_the_default_within_run_to_run_noise(pool, name):
    run, straight, again = pool.result(name), pool.result("bf16"), pool.result("bf16_again")
    assert_finished(run, LONG_STEPS)
    assert_steps_once(run.rows, LONG_STEPS)
    assert captures(run.log) == [f"step {WARMUP + 1} captured; the steps after it replay it"], run.log[-3000:]
    assert_finished(straight, LONG_STEPS)
    assert_finished(again, LONG_STEPS)
    assert_within_noise(name, run, straight, again)


@pytest.mark.gpu_runs("cuda_graph_nan")
def test_a_nan_step_replayed_from_the_graph_changes_nothing(pool):
    run = pool.result("cuda_graph_nan")
    abort = GRAPH_NAN_STEP + 2
    assert run.rc != 0 and f"aborting at step {abort}: 3 non-finite steps in a row" in run.log, run.log[-3000:]
    assert captures(run.log) == [f"step {WARMUP + 1} captured; the steps after it replay it"]
    rows = train_rows(run.rows)
    assert [r["step"] for r in rows] == list(range(1, abort + 1))
    assert [bool(r.get("skipped")) for r in rows] == [r["step"] >= GRAPH_NAN_STEP for r in rows]
    ck = run.dir / "checkpoints"
    good = ck / f"step-{GRAPH_NAN_STEP - 1:07d}"
    for k in (GRAPH_NAN_STEP, abort - 1):
        for f in ("model.safetensors", "ema.safetensors"):
            a, b = tensors(good / f), tensors(ck / f"step-{k:07d}" / f)
            diff = [n for n in a if not a[n].equal(b[n])]
            assert not diff, f"step {k}'s skipped update changed {f}: {diff[:3]}"
        state = json.loads((ck / f"step-{k:07d}" / "trainer_state.json").read_text())
        assert state["updates"] == GRAPH_NAN_STEP - 1, state


@pytest.mark.gpu_runs("cuda_graph_adv")
def test_the_adversarial_start_captures_again_and_trains_both_models(pool):
    run = pool.result("cuda_graph_adv")
    assert_finished(run, 20)
    assert captures(run.log) == [f"step {WARMUP + 1} captured; the steps after it replay it",
                                 f"step {5 + WARMUP + 1} captured with the discriminators; the steps after it "
                                 f"replay it"], run.log[-3000:]
    rows = train_rows(run.rows)
    d_norms = [r["d_grad_norm"] for r in rows if "d_grad_norm" in r]
    assert len(d_norms) == 15 and len(set(d_norms)) > 1, d_norms  # steps 6-20, each its own gradients


@pytest.mark.real_gpu
@pytest.mark.gpu_runs("cuda_graph_compile")
def test_compiled_and_captured_trains_to_the_end(pool):
    run = pool.result("cuda_graph_compile")
    assert_finished(run, 20)
    assert len(captures(run.log)) == 1, run.log[-3000:]
