"""The README's main job: `accelerate launch trainer/run.py` with no arguments, on the default preset.

Run in a fresh working directory with a short step budget: the MNIST shards are missing there, so the
trainer first builds them from the packaged MNIST, then trains, evaluates, samples, checkpoints and
exports into runs/mnist.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_default_command_builds_mnist_and_trains(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    steps = ["train.max_steps=4", "train.log_every=2", "train.eval_every=4", "train.ckpt_every=4",
             "train.sample_every=4", "train.eval_batches=1", "train.num_samples=4"]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    r = subprocess.run([accelerate, "launch", str(REPO / "trainer" / "run.py"), *steps], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    manifest = json.loads((tmp_path / "data" / "mnist28" / "manifest.json").read_text())
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 60000, "test": 10000}
    run = tmp_path / "runs" / "mnist"
    assert "preset: mnist_msvae" in (run / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for key in ("loss", "kl", "rec_1", "rec_2", "lr", "grad_norm", "images_per_s"):
        assert key in train_rows[0], key
    assert any("val_loss" in r for r in rows)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert (run / "checkpoints" / "step-0000004" / "COMMITTED").exists()
    assert (run / "samples" / "step-0000004.png").exists()
    assert (run / "export" / "model.safetensors").exists()

    # The export loads in a process that never imports the trainer.
    code = ("import sys, models; m = models.load_pretrained(sys.argv[1]); "
            "assert 'trainer' not in sys.modules; print(len(m.sample(2)))")
    out = subprocess.run([sys.executable, "-c", code, str(run / "export")], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr
