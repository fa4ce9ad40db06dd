"""trainer/step_graph.py's StepGraph on the CPU, in-process: the warm-up, capture and replay phases, static
inputs and outputs, a new capture when the key changes, and the refusal of a host read inside a part. (On
the CPU a "capture" runs the part once and a replay runs it again; the GPU suite runs the real graphs.)

    pytest tests/trainer/test_step_graph.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train_helpers import TINY
from trainer.config import load_config
from trainer.loop import lr_at, setup, train_step
from trainer.step_graph import WARMUP, StepGraph


class Recorder:
    """Two parts, `double` (x -> 2x, and x's sum) and `add` (the sum + 1, from double's output): each call
    records the tensors it was given."""

    def __init__(self):
        self.calls: list[tuple[str, list[torch.Tensor]]] = []

    def double(self, inputs):
        self.calls.append(("double", inputs))
        return (inputs[0] * 2, inputs[0].sum()), ["y", "total"]

    def add(self, inputs):
        self.calls.append(("add", inputs))
        return (inputs[0] + 1,), None


def step(g: StepGraph, r: Recorder, x: torch.Tensor, key=False):
    g.begin(key)
    phase = g.phase
    (y, total), names = g.run("double", r.double, [x])
    (plus,), _ = g.run("add", r.add, [total])
    g.end()
    return phase, y, total, plus, names


def test_warmup_then_one_capture_then_replays_with_static_inputs_and_outputs():
    g, r = StepGraph(torch.device("cpu")), Recorder()
    phases, outs = [], []
    for i in range(WARMUP + 3):
        x = torch.full((3,), float(i))
        phase, y, total, plus, names = step(g, r, x)
        phases.append(phase)
        outs.append((y, total, plus))
        assert torch.equal(y, 2 * x) and total.item() == 3 * i and plus.item() == 3 * i + 1
        assert names == ["y", "total"]
    assert phases == ["warmup"] * WARMUP + ["capture", "replay", "replay"]
    assert g.captures == 1
    # Warm-up calls get the caller's tensors; from the capture on, the part reads its static input.
    static = r.calls[2 * WARMUP][1][0]
    assert all(inp[0] is static for name, inp in r.calls[2 * WARMUP:] if name == "double")
    assert all(inp[0] is not static for name, inp in r.calls[:2 * WARMUP] if name == "double")
    # The replays' outputs are the capture's tensors, overwritten: what a step needs must be read before
    # the next replay (the trainer copies its numbers to the host at once).
    captured = outs[WARMUP]
    for later in outs[WARMUP + 1:]:
        assert all(a is b for a, b in zip(later, captured))
    # `add` reads `double`'s output as it is (already static), not a copy of it.
    assert r.calls[-1][0] == "add" and r.calls[-1][1][0] is captured[1]


def test_a_new_key_warms_up_and_captures_anew():
    g, r = StepGraph(torch.device("cpu")), Recorder()
    phases = [step(g, r, torch.ones(2), key=False)[0] for _ in range(WARMUP + 1)]
    phases += [step(g, r, torch.ones(2), key=True)[0] for _ in range(WARMUP + 2)]
    assert phases == (["warmup"] * WARMUP + ["capture"]) * 2 + ["replay"]
    assert g.captures == 2


def test_a_part_that_reads_a_tensor_on_the_host_is_refused_at_capture():
    g = StepGraph(torch.device("cpu"), warmup=1)

    def branchy(inputs):
        x = inputs[0]
        return ((x * 2 if x.sum() > 0 else x),), None  # bool(tensor): a host read

    g.begin(None)
    g.run("branchy", branchy, [torch.ones(2)])  # warm-up: eager, allowed
    g.end()
    g.begin(None)
    with pytest.raises(RuntimeError, match="the step's branchy part reads a tensor on the host"):
        g.run("branchy", branchy, [torch.ones(2)])


def test_the_trainer_captures_after_the_warmup_with_a_capturable_optimizer_and_a_tensor_lr(tmp_path, fresh_accelerate):
    cfg = load_config("mnist", [*TINY, f"run.dir={tmp_path / 'run'}", "run.tensorboard=false", "train.cuda_graph=true"])
    s = setup(cfg)
    try:
        s.model.train()
        for _ in range(WARMUP + 2):
            out = train_step(s)
            assert not out.skipped
        assert s.graph.captures == 1 and s.graph.phase == "replay"
        for group in s.optimizer.param_groups:
            assert group["capturable"] is True
            assert isinstance(group["lr"], torch.Tensor) and group["lr"].dtype == torch.float32
            # the next update's LR, as _set_lr left it before the last update: of the count before it
            assert group["lr"].item() == float(np.float32(lr_at(s.counters.updates - 1, cfg)))
    finally:
        s.stop.close()
        s.accelerator.end_training()


def test_fp16_is_refused_before_the_run_directory_is_written(tmp_path, fresh_accelerate):
    fresh_accelerate.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    cfg = load_config("mnist", [*TINY, f"run.dir={tmp_path / 'run'}", "train.cuda_graph=true"])
    with pytest.raises(ValueError, match=r"train.cuda_graph=true needs one CUDA process in bf16 or fp32 without "
                                         r"DeepSpeed \(fp16's GradScaler decides its scale on the host\); run "
                                         r"without train.cuda_graph"):
        setup(cfg)
    assert not (tmp_path / "run").exists()
