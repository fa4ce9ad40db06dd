"""Two GPUs: DDP against one process with the same global batch, DeepSpeed ZeRO-2 with 2 processes, and
SyncBatchNorm that really shares batch statistics. Skipped, with the reason, on fewer than 2 GPUs.

    python -m pytest -m gpu tests/gpu/test_gpu_multi.py -v -rA

The comparisons run in fp32 with TF32 off (NVIDIA_TF32_OVERRIDE=0): 2 processes x batch 8 and 1 process x
batch 16 see the same samples and noise, and differ only in how sums are split (the all-reduce, kernels
chosen for another batch size), which is float rounding: the CPU suite holds the same comparison to 1e-4
(loss terms) and 5e-3 (grad norm); the GPU's other kernels get 10x and 4x that.
"""
from __future__ import annotations

import pytest

from gpu_helpers import assert_curves_close, assert_finished, curve_distance, tensors, train_rows, weight_distance

pytestmark = [pytest.mark.gpu, pytest.mark.gpus(2), pytest.mark.timeout(600)]

RTOL, GRAD_RTOL = 1e-3, 2e-2


@pytest.mark.gpu_runs("ddp2_group", "ddp1_group")
def test_ddp_two_gpus_match_one_gpu_with_the_same_global_batch(pool):
    """Group norm, so that the per-rank batch does not enter the model: DDP must average the gradients
    into exactly the one-process step."""
    two, one = pool.result("ddp2_group"), pool.result("ddp1_group")
    assert_finished(two, 20)
    assert_finished(one, 20)
    per_key = assert_curves_close(two.rows, one.rows, RTOL, GRAD_RTOL)
    print(f"\nDDP 2 x 8 vs 1 x 16: {per_key}")


@pytest.mark.gpu_runs("zero2_2proc")
def test_zero2_two_gpus_trains_and_exports(pool):
    run = pool.result("zero2_2proc")
    assert_finished(run, 20, grad_norm=False)
    ck = run.dir / "checkpoints" / "step-0000020"
    assert (ck / "data_rank0.json").is_file() and (ck / "data_rank1.json").is_file()
    assert (ck / "pytorch_model").is_dir()


@pytest.mark.real_gpu
@pytest.mark.gpu_runs("ddp2_sync_bn", "ddp2_no_sync_bn", "ddp1_batch")
def test_sync_bn_shares_batch_statistics_across_gpus(pool):
    """Batch norm, 2 ranks x 8 different images. With model.sync_bn=true every BN layer normalises with the
    statistics of all 16, exactly as one process with batch 16 does: the losses (from step 1, which BN's
    batch statistics enter directly) and the BN running statistics match the one-process run. Without it
    each rank uses its own 8, which the same comparison must tell apart (so the test can fail)."""
    synced, unsynced, one = pool.result("ddp2_sync_bn"), pool.result("ddp2_no_sync_bn"), pool.result("ddp1_batch")
    for run in (synced, unsynced, one):
        assert_finished(run, 20)

    def step1(run):
        return [r for r in train_rows(run.rows) if r["step"] == 1]

    d_synced = curve_distance(step1(synced), step1(one))[0]
    d_unsynced = curve_distance(step1(unsynced), step1(one))[0]

    def bn_stats(run, kind):
        state = tensors(run.dir / "checkpoints" / "step-0000020" / "model.safetensors")
        return {k: v for k, v in state.items() if k.endswith(kind)}

    def bn_distance(run):  # means and variances apart: the variances' norm would hide the means
        return max(weight_distance(bn_stats(run, kind), bn_stats(one, kind))
                   for kind in ("running_mean", "running_var"))

    assert bn_stats(one, "running_mean"), "the model has no batch norm buffers"
    w_synced, w_unsynced = bn_distance(synced), bn_distance(unsynced)
    print(f"\nSyncBatchNorm vs 1 x 16: step-1 rows {d_synced:.2e} (without sync_bn {d_unsynced:.2e}); "
          f"BN running stats at step 20 {w_synced:.2e} (without {w_unsynced:.2e})")
    assert_curves_close(synced.rows, one.rows, RTOL, GRAD_RTOL)
    assert w_synced <= RTOL, f"BN running statistics differ from the 1-process run's by {w_synced:.2e}"
    assert d_unsynced > 10 * max(d_synced, 1e-6) and w_unsynced > 10 * max(w_synced, 1e-6), \
        "per-rank batch norm is indistinguishable from the synced run here: the test cannot see sync_bn"
