"""bench/train.py on the CPU, as a user runs it: its JSON and its last `ratio=` line on a tiny model, the
hand-written reference loop on the real celeba128 model, and that reference's parity with NStageVAE."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "train.py"
# A tiny 2-stage model on 28 px synthetic images (as tests/trainer's TINY): a few ms per step on one thread.
TINY = ["data.synthetic_size=160", "model.latent_dim=16", "model.encoder.channels=[8,16]",
        "model.stages.0.channels=[16,8]", "model.stages.1.width=8", "model.stages.1.num_blocks=1"]


def bench_process(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "TORCHELASTIC_")) and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(BENCH), "--device", "cpu", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def run_bench(cwd: Path, *args: str) -> list[str]:
    r = bench_process(cwd, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout.strip().splitlines()


@pytest.mark.slow
def test_bench_prints_the_table_and_ratio_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    lines = run_bench(tmp_path, "--steps", "4", "--interval", "2", "--repeats", "2", "--batch", "8",
                      "--json", str(out), "--sweep", "--sweep-max", "16", *TINY)
    d = json.loads(out.read_text())

    assert lines[-1].startswith("ratio="), lines[-5:]
    assert float(lines[-1].removeprefix("ratio=")) == pytest.approx(d["ratio"]["eager"], abs=1e-3)
    assert d["modes"] == ["eager"] and d["device"] == "cpu" and d["batch"] == 8
    assert d["gflops_per_image"] > 0 and d["params"] > 0 and d["paper_images"] == 200_000 * 32
    assert "celeba128_msvae" in d["skipped"]["handwritten"]  # the reference is that model only
    assert [(r["loop"], r["mode"]) for r in d["rows"]] == [("plain", "eager"), ("ours", "eager")]
    for r in d["rows"]:
        assert len(r["interval_rates"]) == 2  # one timed interval per repeat; the warm-up one dropped
        assert r["images_per_s"] > 0 and r["elapsed_s"] > 0
        assert r["hours_to_paper_images"] == pytest.approx(200_000 * 32 / r["images_per_s"] / 3600)
        assert r["mfu"] is None and r["peak_memory_gib"] is None  # GPU-only columns
    rows = {(r["loop"], r["mode"]): r["images_per_s"] for r in d["rows"]}
    assert d["ratio"]["eager"] == pytest.approx(rows["ours", "eager"] / rows["plain", "eager"])
    assert "| ours | eager |" in "\n".join(lines)

    assert [(p["batch"], p["oom"]) for p in d["sweep"]] == [(8, False), (16, False)]
    assert all(p["images_per_s"] > 0 for p in d["sweep"])


@pytest.mark.slow
def test_handwritten_loop_runs_on_the_celeba128_model(tmp_path):
    out = tmp_path / "bench.json"
    lines = run_bench(tmp_path, "--config", "celeba128", "--batch", "2", "--steps", "2", "--interval", "1",
                      "--repeats", "1", "--loops", "handwritten", "--channels-last", "--json", str(out))
    d = json.loads(out.read_text())
    assert d["params"] == 102_890_374 and d["gflops_per_image"] == pytest.approx(77.5, abs=0.05)
    assert d["skipped"] == {} and d["ratio"] == {}
    [row] = d["rows"]
    assert (row["loop"], row["mode"]) == ("handwritten", "eager") and row["images_per_s"] > 0
    assert not any(line.startswith("ratio") for line in lines)  # no plain/ours pair to compare


def test_handwritten_model_matches_nstage_vae():
    from torch.utils.flop_counter import FlopCounterMode

    from models import MODEL_PRESETS, NStageVAE, nstage_loss

    spec = importlib.util.spec_from_file_location("handwritten", REPO / "bench" / "handwritten.py")
    hw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hw)
    cfg = MODEL_PRESETS["celeba128_msvae"]()
    with torch.device("meta"):  # shapes only
        ref, mine = NStageVAE(cfg), hw.HandwrittenVAE()
        x = torch.zeros(2, 3, 128, 128)

    def shapes(m):
        return sorted(tuple(p.shape) for p in m.parameters())

    assert shapes(mine) == shapes(ref)
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in ref.parameters()) == 102_890_374
    assert sorted(tuple(b.shape) for b in mine.buffers()) == sorted(tuple(b.shape) for b in ref.buffers())

    flops = []
    for loss_of in (lambda: nstage_loss(ref(x), x, cfg)[0], lambda: hw.official_loss(x, *mine(x))):
        counter = FlopCounterMode(display=False)
        with counter:
            loss_of().backward()
        flops.append(counter.get_total_flops())
    assert flops[1] == pytest.approx(flops[0], rel=0.01)

    with torch.device("meta"):
        mu, logvar, coarse, fine = mine(x)
        out = ref(x)
    assert mu.shape == out["mu"].shape == logvar.shape == (2, 512)
    assert coarse.shape == out["images"][0].shape and fine.shape == out["images"][1].shape == x.shape


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_sweep_stops_at_the_first_batch_that_runs_out_of_memory(monkeypatch):
    """The sweep's CUDA path, with ours replaced by a loop that runs out of memory from batch 32 on."""
    bench = load_bench()
    tried = []

    def our_loop(cfg, steps, interval):
        tried.append(cfg.train.batch_size)
        if cfg.train.batch_size >= 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [10.0 * cfg.train.batch_size] * 3

    monkeypatch.setattr(bench, "our_loop", our_loop)
    a = argparse.Namespace(config="mnist", batch=8, sweep_max=1024, steps=4, interval=2, peak_tflops=989.0)
    points = bench.sweep(a, ["data.synthetic=true"], "eager", 1e9, "cpu")
    assert tried == [8, 16, 32]
    assert [(p["batch"], p["oom"]) for p in points] == [(8, False), (16, False), (32, True)]
    assert points[1]["images_per_s"] == 160.0

    def broken(cfg, steps, interval):  # anything else is a bug, not the end of the curve
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(bench, "our_loop", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.sweep(a, ["data.synthetic=true"], "eager", 1e9, "cpu")
    assert bench.is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))


@pytest.mark.slow
def test_bench_adv_sync_free_and_cuda_graph_report_their_rows_beside_ours(tmp_path):
    out = tmp_path / "bench.json"
    lines = run_bench(tmp_path, "--steps", "4", "--interval", "2", "--repeats", "1", "--batch", "8", "--loops",
                      "plain,ours", "--adv", "--sync-free", "--cuda-graph", "--json", str(out), *TINY)
    d = json.loads(out.read_text())

    assert d["adv"] == "mnist_msvae_adv"  # the default config's adversarial sibling
    assert [(r["loop"], r["mode"]) for r in d["rows"]] == [("plain", "eager"), ("ours", "eager"),
                                                           ("ours_sync_free", "eager"), ("ours_adv", "eager"),
                                                           ("ours_cuda_graph", "eager")]  # captured loops last
    rows = {r["loop"]: r for r in d["rows"]}
    assert rows["ours_adv"]["images_per_s"] > 0 and rows["ours_adv"]["mfu"] is None
    assert rows["ours_sync_free"]["images_per_s"] > 0
    assert d["adv_cost"]["eager"] == pytest.approx(rows["ours"]["images_per_s"] / rows["ours_adv"]["images_per_s"])
    gain = d["sync_free_gain"]["eager"]
    assert gain == pytest.approx(rows["ours_sync_free"]["images_per_s"] / rows["ours"]["images_per_s"])
    text = "\n".join(lines)
    assert "| ours + adversarial | eager |" in text and f"adv_cost_eager={d['adv_cost']['eager']:.3f}" in text
    assert "| ours sync-free | eager |" in text and f"sync_free_gain_eager={gain:.3f}" in text
    graph_gain = d["cuda_graph_gain"]["eager"]
    assert graph_gain == pytest.approx(rows["ours_cuda_graph"]["images_per_s"] / rows["ours"]["images_per_s"])
    assert "| ours cuda-graph | eager |" in text and f"cuda_graph_gain_eager={graph_gain:.3f}" in text
    assert lines[-1].startswith("ratio=")  # still the last line scripts read


@pytest.mark.slow
def test_a_loop_that_fails_costs_its_row_not_the_table(tmp_path):
    """The cuda-graph loop refuses the d_loss NaN hook in its config (the other loops ignore the hook on a
    model without discriminators): its failure is reported, the rest is measured, the exit status is 1."""
    out = tmp_path / "bench.json"
    r = bench_process(tmp_path, "--steps", "4", "--interval", "2", "--repeats", "2", "--batch", "8", "--loops",
                      "plain,ours", "--cuda-graph", "--json", str(out), *TINY, "train.inject_nan=2:0:d_loss")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    error = "ValueError: train.inject_nan=STEP:RANK:d_loss is decided in Python inside the captured step"
    assert sum(line.startswith("repeat 0: ours cuda-graph eager: FAILED (" + error) for line in lines) == 1
    assert not any(line.startswith("repeat 1: ours cuda-graph") for line in lines)  # not tried again
    assert any(line.startswith("FAILED: ours cuda-graph eager: " + error) for line in lines)
    assert "Traceback" in r.stderr
    d = json.loads(out.read_text())
    assert [(x["loop"], x["mode"]) for x in d["rows"]] == [("plain", "eager"), ("ours", "eager")]
    assert [(x["loop"], x["mode"]) for x in d["failed"]] == [("ours_cuda_graph", "eager")]
    assert d["cuda_graph_gain"] == {} and lines[-1].startswith("ratio=")


@pytest.mark.slow
def test_bench_shards_runs_ours_on_a_fixture_it_writes_and_on_a_directory_given(tmp_path):
    """--shards writes a CelebA-layout fixture at the model's size (3 channels here) and runs ours on it
    with --shards-workers loader workers; --shards DIR reads DIR (a missing one fails that row only)."""
    rgb = [*TINY, "model.channels=3"]
    out = tmp_path / "bench.json"
    lines = run_bench(tmp_path, "--steps", "4", "--interval", "2", "--repeats", "1", "--batch", "8", "--loops",
                      "ours", "--shards", "--shards-workers", "2", "--json", str(out), *rgb)
    d = json.loads(out.read_text())
    assert [(r["loop"], r["mode"]) for r in d["rows"]] == [("ours", "eager"), ("ours_shards", "eager")]
    rows = {r["loop"]: r for r in d["rows"]}
    assert rows["ours_shards"]["images_per_s"] > 0 and d["shards_workers"] == 2
    ratio = d["shards_vs_synthetic"]["eager"]
    assert ratio == pytest.approx(rows["ours_shards"]["images_per_s"] / rows["ours"]["images_per_s"])
    assert any(line.startswith("shards: ") and "written as 28 px shards" in line for line in lines)
    assert f"shards_vs_synthetic_eager={ratio:.3f}" in "\n".join(lines) and "| ours shards | eager |" in "\n".join(lines)
    assert not Path(d["shards"]).exists()  # the fixture is removed after the loops

    r = bench_process(tmp_path, "--steps", "4", "--interval", "2", "--repeats", "1", "--batch", "8", "--loops", "ours",
                      "--shards", str(tmp_path / "no-such-shards"), *rgb)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"FAILED: ours shards eager: FileNotFoundError: {tmp_path / 'no-such-shards' / 'manifest.json'} not found" \
        in r.stdout


def test_bench_adv_needs_a_known_sibling_or_a_preset(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--config", "mnist_vae", "--adv"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--adv-config" in r.stderr


def test_bench_shards_fixture_needs_an_rgb_model(tmp_path):
    r = bench_process(tmp_path, "--config", "mnist", "--shards")
    assert r.returncode == 2 and "--shards without a directory makes RGB shards; --config mnist has " \
                                 "model.channels=1: give --shards DIR, or the override model.channels=3" in r.stderr
