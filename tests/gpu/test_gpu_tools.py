"""The tools around training, on the GPU: `trainer.sample`, `trainer.evaluate` under `accelerate launch`, and
the training-loop benchmark.

    python -m pytest -m gpu tests/gpu/test_gpu_tools.py -v -rA
"""
from __future__ import annotations

import json
import math
import re

import pytest
from PIL import Image

from gpu_helpers import ok

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


@pytest.mark.gpu_runs("sample")
def test_sample_on_the_gpu_writes_a_grid(pool):
    """`python -m trainer.sample EXPORT --device cuda --n 16 --out X.png` on the bf16 run's export."""
    done = ok(pool.result("sample"))
    with Image.open(done.dir / "samples.png") as im:
        w, h = im.size
    assert w >= 4 * 28 and h >= 2 * 4 * 28, (w, h)  # 16 samples as 4 x 4, one block per stage


@pytest.mark.gpu_runs("evaluate")
def test_evaluate_under_accelerate_reports_recon_metrics_per_stage(pool):
    """`accelerate launch --num_processes 1 -m trainer.evaluate EXPORT --shards S --no-inception --out X.json`
    on 32 held-out images of tiny MNIST-like shards (shards.write, 1 channel, 28 px)."""
    done = ok(pool.result("evaluate"))
    result = json.loads((done.dir / "metrics.json").read_text())
    assert result["n_real"] == 32 and result["world_size"] == 1, {k: result.get(k) for k in ("n_real", "world_size")}
    assert [s["stage"] for s in result["stages"]] == [1, 2]
    for s in result["stages"]:
        r = s["recon"]
        for k in ("mse", "psnr", "ssim"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (s["stage"], k, r.get(k))
        assert 0 <= r["mse"] <= 1 and -1 <= r["ssim"] <= 1, r


@pytest.mark.gpu_runs("bench")
def test_training_benchmark_runs_on_the_gpu(pool):
    """`python bench/train.py --device cuda --config mnist --steps 20 --interval 5 --repeats 1
    --mixed-precision bf16` exits 0 and ends with its `ratio=` line (ours / plain PyTorch, images/s)."""
    done = ok(pool.result("bench"))
    ratio = re.findall(r"^ratio=([0-9.]+)\s*$", done.log, re.M)
    assert ratio, f"no ratio= line in the benchmark's output:\n{done.log[-3000:]}"
    print(f"\nbench/train.py (mnist, bf16, 20 steps, alongside the other test runs): ratio={ratio[-1]}")
