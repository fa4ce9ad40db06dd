"""Unit tests of the trainer's pieces, in-process: the EMA class and one optimizer step (`train_step`).

    pytest tests/trainer/test_train_step.py
"""
from __future__ import annotations

import copy

import pytest
import torch

from models import NStageVAE
from train_helpers import TINY
from trainer.config import load_config
from trainer.ema import EMA
from trainer.loop import BufferBackup, StopRequest, setup, train_step


def reference_ema_update(ema: dict, model: torch.nn.Module, decay: float, updates: int) -> None:
    """The trainer's EMA update before it became a class: a Python loop of lerp_ per tensor."""
    d = min(decay, (1 + updates) / (10 + updates))
    for k, v in model.state_dict().items():
        k = k.removeprefix("_orig_mod.")
        if v.is_floating_point():
            ema[k].lerp_(v.detach().float(), 1 - d)
        else:
            ema[k].copy_(v)


def _bn_model() -> NStageVAE:
    cfg = load_config("mnist", [o for o in TINY if o.startswith("model.")] + ["model.norm=batch"])
    torch.manual_seed(0)
    return NStageVAE(cfg.model.architecture())


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for v in model.state_dict().values():
        if v.is_floating_point():
            v.add_(torch.randn(v.shape, generator=g) * 0.1)
        else:
            v.add_(1)  # BN's num_batches_tracked


@pytest.mark.parametrize("stable", [False, True], ids=["reread", "stable_tensors"])
def test_ema_update_matches_the_reference_exactly(stable):
    model = _bn_model()
    ema = EMA(model, decay=0.999, stable_tensors=stable)
    ref = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
           for k, v in model.state_dict().items()}
    for updates in range(1, 40):
        _perturb(model, updates)
        ema.update(model, updates)
        reference_ema_update(ref, model, 0.999, updates)
    got = ema.tensors()
    assert got.keys() == ref.keys()
    diff = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not diff, f"{len(diff)} tensors differ from the reference update, e.g. {diff[:3]}"
    ints = [k for k, v in ref.items() if not v.is_floating_point()]
    assert ints and all(torch.equal(got[k], model.state_dict()[k]) for k in ints), "integer buffers are copied"


def test_ema_is_fp32_on_the_models_device_whatever_the_models_dtype():
    model = _bn_model().to(torch.bfloat16)
    ema = EMA(model, decay=0.9)
    device = next(model.parameters()).device
    assert all(v.device == device for v in ema.shadow.values())
    assert all(v.dtype == torch.float32 for v in ema.shadow.values() if v.is_floating_point())
    before = copy.deepcopy(ema.shadow)
    _perturb(model, 1)
    ema.update(model, 100)
    changed = [k for k, v in ema.shadow.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed and all(ema.shadow[k].dtype == torch.float32 for k in changed)


def test_ema_state_dict_round_trip_and_mismatch():
    model = _bn_model()
    a = EMA(model, decay=0.99)
    _perturb(model, 3)
    a.update(model, 5)
    state = a.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())
    b = EMA(_bn_model(), decay=0.99)
    b.load_state_dict(state)
    assert all(torch.equal(b.shadow[k], a.shadow[k]) for k in a.shadow)
    state["encoder.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected"):
        b.load_state_dict(state)


def test_buffer_backup_restores_in_place_written_buffers_even_after_load_state_dict():
    model, other = _bn_model(), _bn_model()
    _perturb(other, 7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backup = BufferBackup(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "re-pointing changed a value"
    model.load_state_dict(other.state_dict())  # in place: the buffers stay views of the flat copy
    backup.save()
    model.train()
    model(torch.randn(4, 1, 28, 28))  # batch norm updates its running statistics
    changed = [k for k, v in model.named_buffers() if not torch.equal(v, other.state_dict()[k])]
    assert changed
    backup.restore()
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.named_buffers())


def test_stop_request_gives_the_signals_back(tmp_path):
    """bench/train.py runs train() in its own process: after the run, SIGTERM must end that process again."""
    import signal
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    stop = StopRequest(str(tmp_path))
    assert all(signal.getsignal(sig) == stop._handle for sig in before)
    stop.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ----------------------------------------------------------------------------- one optimizer step
def _setup(tmp_path, *overrides):
    cfg = load_config("mnist", [*TINY, "train.batch_size=8", "run.tensorboard=false", "model.norm=batch",
                                f"run.dir={tmp_path / 'run'}", *overrides])
    return setup(cfg)


def _snapshot(s) -> dict:
    opt = s.optimizer.state_dict()
    return {"model": {k: v.clone() for k, v in s.accelerator.unwrap_model(s.model).state_dict().items()},
            "opt": copy.deepcopy(opt["state"]), "ema": {k: v.clone() for k, v in s.ema.tensors().items()},
            "updates": s.counters.updates}


def _assert_unchanged(before: dict, after: dict) -> None:
    assert after["updates"] == before["updates"]
    for part in ("model", "ema"):
        diff = [k for k in before[part] if not torch.equal(before[part][k], after[part][k])]
        assert not diff, f"{part}: {diff[:3]} changed on a skipped step"
    for i, st in before["opt"].items():
        for k, v in st.items():
            assert torch.equal(v, after["opt"][i][k]), f"optimizer state {i}.{k} changed on a skipped step"


def test_a_non_finite_step_changes_nothing_and_the_next_one_updates(tmp_path, fresh_accelerate):
    s = _setup(tmp_path)
    for _ in range(2):
        assert not train_step(s).skipped
    assert s.ema.device == s.accelerator.device  # built after prepare, on the model's device
    before = _snapshot(s)
    s.cfg.train.inject_nan = f"{s.counters.step + 1}:0"
    out = train_step(s)
    assert out.skipped and not out.overflow and s.counters.step == 3 and s.counters.bad_streak == 1
    _assert_unchanged(before, _snapshot(s))
    s.cfg.train.inject_nan = ""
    out = train_step(s)
    assert not out.skipped and s.counters.updates == 3 and s.counters.bad_streak == 0


def test_an_fp16_overflow_step_changes_nothing_and_lowers_the_scale(tmp_path, fresh_accelerate):
    fresh_accelerate.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    s = _setup(tmp_path, "train.inject_overflow=3")
    assert s.scaler is not None, "CPU fp16 runs with torch's GradScaler"
    for _ in range(2):
        assert not train_step(s).overflow
    before, scale = _snapshot(s), s.scaler.get_scale()
    out = train_step(s)
    assert out.overflow and not out.skipped and s.counters.overflow_streak == 1
    _assert_unchanged(before, _snapshot(s))
    assert s.scaler.get_scale() == scale / 2
    out = train_step(s)
    assert not out.overflow and s.counters.updates == 3 and s.counters.overflow_streak == 0


def test_buffer_backup_restore_where_decides_on_the_device():
    model = _bn_model()
    backup = BufferBackup(model)
    backup.save()
    before = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    model(torch.randn(4, 1, 28, 28))
    moved = {k: v.clone() for k, v in model.named_buffers()}
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    backup.restore_where(torch.tensor(False))
    assert all(torch.equal(v, moved[k]) for k, v in model.named_buffers()), "kept where not skipped"
    for _, v in model.named_buffers():  # a NaN batch's statistics, and a counter moved on
        v.fill_(float("nan")) if v.is_floating_point() else v.add_(5)
    backup.restore_where(torch.tensor(True))
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers()), "put back where skipped"
    saved = backup.saved_by_name(model)
    assert set(saved) == {k for k, v in before.items() if v.is_floating_point()}
    assert all(torch.equal(saved[k], before[k]) for k in saved)


def test_ema_update_reads_the_replacements_instead_of_the_models_entries():
    model = _bn_model()
    ema, ref = EMA(model, decay=0.9, stable_tensors=True), EMA(model, decay=0.9, stable_tensors=True)
    replace = {k: v.clone() for k, v in model.named_buffers() if v.is_floating_point()}
    _perturb(model, 1)
    ema.update(model, 5, replace)
    twin = copy.deepcopy(model)
    twin.load_state_dict({**model.state_dict(), **replace})
    ref.update(twin, 5)
    assert all(torch.equal(ema.shadow[k], ref.shadow[k]) for k in ref.shadow)


def test_sync_free_reads_each_step_while_the_next_is_queued(tmp_path, fresh_accelerate):
    """advance() leaves step k queued and returns it from the next call; a step due for a checkpoint is
    read at once; a non-finite step read late changed nothing, as by default."""
    from trainer.loop import advance, flush
    s = _setup(tmp_path, "train.sync_free=true", "train.ckpt_every=4", "train.eval_every=100",
               "train.sample_every=100", "train.max_steps=100")
    assert advance(s) == [] and s.pending.step == 1 and s.counters.step == 0
    outs = advance(s)
    assert [o.step for o in outs] == [1] and s.pending.step == 2 and (s.counters.step, s.counters.updates) == (1, 1)
    outs = advance(s)
    assert [o.step for o in outs] == [2] and s.pending.step == 3
    outs = advance(s)  # step 4 is due for a checkpoint: read at once, after step 3
    assert [o.step for o in outs] == [3, 4] and s.pending is None and s.counters.step == 4
    before = _snapshot(s)
    s.cfg.train.inject_nan = "5:0"
    assert advance(s) == [] and s.pending.step == 5
    s.cfg.train.inject_nan = ""
    (out,) = flush(s)
    assert out.step == 5 and out.skipped and out.bad_streak == 1 and s.pending is None
    _assert_unchanged(before, _snapshot(s))
    assert flush(s) == []
