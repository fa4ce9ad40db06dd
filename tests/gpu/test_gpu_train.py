"""Training on one GPU through the real command lines: bf16, fp16 with a real overflow, DeepSpeed ZeRO-1/2/3
from the shipped configs, torch.compile and SyncBatchNorm.

    python -m pytest -m gpu tests/gpu/test_gpu_train.py -v -rA
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from gpu_helpers import (DEVICE, LONG_STEPS, OVERFLOW_STEP, assert_all_finite, assert_finished, by_step,
                         load_export, ok, precision, train_rows)

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


@pytest.mark.gpu_runs("bf16")
def test_bf16_trains_checkpoints_and_exports(pool):
    run = pool.result("bf16")
    model = assert_finished(run, LONG_STEPS)
    assert json.loads((run.dir / "run.json").read_text())["mixed_precision"] == precision("bf16")
    ckpts = sorted(p.name for p in (run.dir / "checkpoints").iterdir())
    assert ckpts == ["step-0000150", "step-0000200"], ckpts  # ckpt_every=50, keep_ckpts=2
    assert any(r["step"] == LONG_STEPS and "val_loss" in r for r in run.rows)
    with torch.no_grad():
        images = model.sample(4, generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert len(images) == 2 and all(bool(x.isfinite().all()) for x in images)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.gpu_runs(n), id=n)
                                  for n in ("fp16_overflow", "fp16_overflow_sync_free")])
def test_fp16_overflow_is_skipped_without_advancing_lr_or_updates(pool, name):
    """`train.inject_overflow=12` inflates the loss scale before step 12's backward, so that backward
    overflows for real. The scaler skips the step and backs off; the row says `overflow`; the update
    counter, and with it the LR, does not advance (warm-up over 100 steps, so every update raises the LR);
    overflows are not bad steps (train.max_bad_steps=1 would abort at the first).

    The scaler's own first back-offs (it starts at 2**16) may overflow a step or two at the start: those
    are counted like the injected one, and printed. Whether a row logs the LR of its own step or of the
    last applied update, the LR stays flat across exactly one pair of rows per overflow. The same with
    train.sync_free=true, where the skip is read a step late."""
    run = pool.result(name)
    ok(run)
    assert run.status()["state"] == "finished", run.status()
    rows = by_step(run.rows)
    max_steps = max(rows)
    assert sorted(rows) == list(range(1, max_steps + 1))
    assert all("loss_scale" in r for r in rows.values()), "fp16 rows must log loss_scale"
    overflows = sorted(s for s, r in rows.items() if r.get("overflow"))
    lrs = [rows[s]["lr"] for s in range(1, max_steps + 1)]
    print(f"\nfp16: overflow rows at steps {overflows}\n  loss_scale by step "
          f"{[rows[s]['loss_scale'] for s in rows]}\n  lr by step {lrs}")
    assert OVERFLOW_STEP in overflows, f"no overflow row at step {OVERFLOW_STEP}: {rows[OVERFLOW_STEP]}"
    natural = [s for s in overflows if s != OVERFLOW_STEP]
    assert all(s < OVERFLOW_STEP for s in natural), \
        f"overflows after the injected one ({natural}): the loss scale did not recover"
    state = json.loads((run.dir / "checkpoints" / f"step-{max_steps:07d}" / "trainer_state.json").read_text())
    assert state["updates"] == max_steps - len(overflows), (state, overflows)

    assert all(b >= a for a, b in zip(lrs, lrs[1:])), "the warm-up LR fell"
    flat = [s for s in range(1, max_steps) if lrs[s] == lrs[s - 1]]  # rows s and s + 1 log the same LR
    assert len(flat) == len(overflows), f"LR flat after steps {flat}, overflows at {overflows}"
    assert {OVERFLOW_STEP - 1, OVERFLOW_STEP} & set(flat), \
        f"the LR advanced across the overflow at step {OVERFLOW_STEP}: {lrs[OVERFLOW_STEP - 2:OVERFLOW_STEP + 1]}"

    before, after = rows[OVERFLOW_STEP - 1]["loss_scale"], rows[OVERFLOW_STEP + 1]["loss_scale"]
    assert math.isfinite(after) and after < before, f"loss_scale {before} before step {OVERFLOW_STEP}, {after} after"
    assert all(math.isfinite(r["loss"]) for r in rows.values())
    load_export(run.dir / "export")


@pytest.mark.parametrize("stage", [pytest.param(n, marks=pytest.mark.gpu_runs(f"zero{n}"), id=f"zero{n}")
                                   for n in (1, 2, 3)])
def test_deepspeed_zero_bf16_trains_and_exports(pool, stage):
    run = pool.result(f"zero{stage}")
    assert_finished(run, 20, grad_norm=False)  # DeepSpeed reports no grad norm on some stages
    info = json.loads((run.dir / "run.json").read_text())
    assert info["distributed_type"].endswith("DEEPSPEED") and info["mixed_precision"] == precision("bf16"), info
    assert (run.dir / "checkpoints" / "step-0000020" / "pytorch_model").is_dir(), "not a DeepSpeed checkpoint"


@pytest.mark.gpu_runs("zero3_export")
def test_export_cli_on_a_zero3_run(pool):
    """`python -m trainer.export RUN_DIR --out DIR` (the EMA) and `--weights raw` (ZeRO-3's parameter shards
    consolidated into full fp32 weights) both load with load_pretrained."""
    ema, raw = pool.result("zero3_export")
    for done in (ema, raw):
        ok(done)
        model = load_export(done.dir)
        assert model.config.latent_dim == 16
    from safetensors.torch import load_file
    assert_all_finite(load_file(str(raw.dir / "model.safetensors")), "raw export")


@pytest.mark.real_gpu
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.gpu_runs(n), id=n) for n in ("compile", "sync_bn")])
def test_compile_and_sync_bn_train_to_the_end(pool, name):
    run = pool.result(name)
    assert_finished(run, 20)
    assert len(train_rows(run.rows)) == 20


@pytest.mark.gpu_runs("adv_bf16", "adv_fp16")
def test_adversarial_refiner_trains_in_bf16_and_fp16_and_exports_the_vae_only(pool):
    """Two models on the GPU: the spectral-norm discriminator beside the VAE, both stepping from update 0.
    bf16 finishes with finite discriminator terms on every row; fp16's injected overflow skips both
    models' steps (the run finishes with train.max_bad_steps=1); the exports hold the VAE only."""
    from safetensors.torch import load_file

    bf16, fp16 = pool.result("adv_bf16"), pool.result("adv_fp16")
    assert_finished(bf16, 20)
    ok(fp16)
    assert fp16.status()["state"] == "finished", fp16.status()  # its overflow row's grad norm is inf
    for run in (bf16, fp16):
        rows = train_rows(run.rows)
        assert all(k in r and math.isfinite(r[k]) for r in rows if not r.get("overflow")
                   for k in ("d_loss", "g_adv_2", "fm_2", "d_real_2", "d_fake_2", "d_grad_norm")), rows[-1]
        ckpt = run.dir / "checkpoints" / "step-0000020"
        assert (ckpt / "model_1.safetensors").is_file(), "the checkpoint holds no discriminators"
        assert not any("nets." in k for k in load_file(str(run.dir / "export" / "model.safetensors")))
    overflow = [r["step"] for r in train_rows(fp16.rows) if r.get("overflow")]
    assert OVERFLOW_STEP in overflow, overflow
    state = json.loads((fp16.dir / "checkpoints" / "step-0000020" / "trainer_state.json").read_text())
    assert state["updates"] == 20 - len(overflow)
