"""The experiment pipeline end to end in its --quick form, so experiments/grid.py cannot rot.

    python -m pytest -q tests/experiments

It cuts a folder of generated photos into shards with `shards.write folder` (through the grid), trains a
one-stage and a three-stage photo model for a few steps with `accelerate launch trainer/run.py`, exports, evaluates (FID and KID
with the real Inception, on 8 images) and renders the tables and figures; then runs the same command again
and checks that finished rows are skipped, and re-runs one row with --row.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# One- and three-stage models cover every path of the grid (resvae and msvae differ from them only in
# their preset); msvae_adv adds the adversarial refiner (a discriminator on stage 2, on from the second
# update); the full grid is the same code with the default --models.
STAGES = {"vae": 1, "msvae3": 3, "msvae_adv": 2}


def _photos(folder: Path, n: int = 10) -> Path:
    """Smooth random colour fields with a few edges: enough structure for crops, sharpness and Inception."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:192, 0:224] / 192.0
    for i in range(n):
        img = np.stack([np.sin(xx * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(2, 9))
                        for _ in range(3)], -1)
        img[rng.integers(0, 150):, rng.integers(0, 180):] += rng.uniform(-1, 1, 3)  # a hard edge
        Image.fromarray(((img - img.min()) / np.ptp(img) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="session")
def quick_grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    cmd = [sys.executable, str(REPO / "experiments" / "grid.py"), "photos", "--quick", "--seeds", "0",
           "--models", *STAGES,
           "--src", str(_photos(tmp / "photos")), "--shards", str(tmp / "shards"), "--work", str(tmp / "work"),
           "--results", str(tmp / "results")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, cmd, env


@pytest.mark.slow
def test_quick_grid_writes_every_number_table_and_figure(quick_grid):
    tmp, _, _ = quick_grid
    res = json.loads((tmp / "results" / "photos.json").read_text())
    assert sorted(r["row"] for r in res["rows"]) == sorted(f"{m}-s0" for m in STAGES)
    manifest = json.loads((tmp / "shards" / "manifest.json").read_text())
    assert manifest["source"]["test_images"] and manifest["crop"]["kind"] == "random"  # whole photos held out
    for r in res["rows"]:
        assert r["status"] == "finished" and r["params"] > 0 and r["images_per_s"] > 0 and r["train_wall_s"] > 0
        stages = r["eval"]["stages"]
        assert len(stages) == STAGES[r["model"]], r["row"]
        for s in stages:
            for kind in ("samples", "recon"):
                for k in ("fid", "kid", "laplacian_variance_ratio", "high_frequency_energy_ratio"):
                    assert math.isfinite(s[kind][k]), (r["row"], kind, k)
            assert math.isfinite(s["recon"]["psnr"]) and -1 <= s["recon"]["ssim"] <= 1
        assert {"train", "export", "evaluate", "samples", "recon"} <= set(r["commands"])
        assert "accelerate launch" in r["commands"]["train"] and "trainer.evaluate" in r["commands"]["evaluate"]
    for model, n in STAGES.items():
        assert set(res["summary"][model]["stages"]) == {str(i + 1) for i in range(n)}
    # the adversarial row really trained its discriminator, and its terms are logged and drawn
    adv = [json.loads(line) for line in
           (tmp / "work" / "photos" / "msvae_adv-s0" / "metrics.jsonl").read_text().splitlines()]
    on = [x for x in adv if "d_loss" in x]
    assert on and all(math.isfinite(x[k]) for x in on for k in ("d_loss", "d_real_2", "d_fake_2", "g_adv_2", "fm_2"))
    assert "adv.width=4" in res["rows"][[r["row"] for r in res["rows"]].index("msvae_adv-s0")]["commands"]["train"]
    md = (tmp / "results" / "photos.md").read_text()
    assert "| msvae3 | 3 |" in md and "python experiments/grid.py photos --row msvae3-s0" in md
    assert "| msvae_adv | 2 |" in md and "kept from the previous report" not in md
    for fig in ("photos_samples.png", "photos_recon.png", "photos_loss.png", "photos_adv.png"):
        with Image.open(tmp / "results" / fig) as im:
            assert im.size[0] > 100 and im.size[1] > 100
        assert f"]({fig})" in md


@pytest.mark.slow
def test_quick_grid_skips_finished_rows_and_reruns_one(quick_grid):
    tmp, cmd, env = quick_grid
    work = tmp / "work" / "photos"
    before = {p.parent.name: p.stat().st_mtime_ns for p in work.glob("*/eval.json")}
    invocations = {p.parent.name: len(json.loads(p.read_text())["train_invocations"]) for p in work.glob("*/grid_row.json")}
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "training" not in r.stdout and "evaluating" not in r.stdout  # every row was finished
    assert {p.parent.name: p.stat().st_mtime_ns for p in work.glob("*/eval.json")} == before
    # one row again, from scratch, from one command; the others stay as they were
    r = subprocess.run(cmd + ["--row", "vae-s0", "--force"], cwd=tmp, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "vae-s0: training (new)" in r.stdout and "msvae3-s0" not in r.stdout
    after = {p.parent.name: p.stat().st_mtime_ns for p in work.glob("*/eval.json")}
    assert after["vae-s0"] != before["vae-s0"]
    assert {k: v for k, v in after.items() if k != "vae-s0"} == {k: v for k, v in before.items() if k != "vae-s0"}
    assert len(json.loads((work / "vae-s0" / "grid_row.json").read_text())["train_invocations"]) == 1
    assert invocations["msvae3-s0"] == 1


def _grid_module():
    """experiments/grid.py as a module (experiments/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grid", REPO / "experiments" / "grid.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    return grid


def test_control_rows_train_their_base_preset_with_overrides():
    """vae_halfkl is mnist_vae with its KL weight halved: the train command carries the override and the
    trainer's config built from that command really has the halved weight (and nothing else changed)."""
    import argparse

    from trainer.config import load_config

    grid = _grid_module()
    args = argparse.Namespace(grid="mnist", shards="data/mnist28", steps=0, quick=False)
    cmd = grid.train_command(args, "vae_halfkl", grid.GRIDS["mnist"]["models"]["vae_halfkl"], 0, Path("run"))
    i = cmd.index("--config")
    preset, overrides = cmd[i + 1], cmd[i + 2:]
    control, base = load_config(preset, overrides), load_config(preset, overrides[:3])
    assert preset == "mnist_vae" and base.model.kl_weight == 1 / 128
    assert control.model.kl_weight == base.model.kl_weight / 2
    control.model.kl_weight = base.model.kl_weight
    assert control == base
    quick = grid.train_command(argparse.Namespace(**{**vars(args), "quick": True}), "vae_halfkl", preset, 0, Path("r"))
    assert "model.kl_weight=0.00390625" in quick and "model.stages.0.channels=[8,8,4]" in quick


def test_report_never_averages_an_evaluation_of_another_size(tmp_path):
    """A row evaluated at N=100 is not averaged into an N=1000 table; its Runs line says to rerun it."""
    import argparse

    grid = _grid_module()
    run = tmp_path / "mnist" / "vae-s0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 1000}))
    stage = {"stage": 1, "recon": {"psnr": 15.0, "kid": 0.1}, "samples": {"kid": 0.2}}
    (run / "eval.json").write_text(json.dumps({"n_real": 100, "stages": [stage]}))
    args = argparse.Namespace(grid="mnist", work=str(tmp_path), n_eval=1000, quick=False)
    row = grid.collect_row(args, "vae", 0)
    assert row["eval"] is None and row["eval_n_other"] == 100
    summary = grid.summarise([row])
    assert summary["vae"]["stages"] == {}
    md = grid.render_markdown("mnist", {"setting": "s", "n_eval": 1000}, [row], summary, {})
    assert "evaluated at N = 100, not 1000" in md
    row = grid.collect_row(argparse.Namespace(**{**vars(args), "n_eval": 100}), "vae", 0)
    assert row["eval"]["n_real"] == 100
    assert grid.summarise([row])["vae"]["stages"]["1"]["recon.psnr"]["mean"] == 15.0


def test_report_keeps_rows_whose_run_directory_is_elsewhere(tmp_path):
    """A report made where only some run directories exist keeps the previous report's other rows with
    their numbers unchanged, keeps the previous figures that show them, and draws the new rows apart."""
    import argparse

    grid = _grid_module()
    res, work = tmp_path / "results", tmp_path / "work"
    args = argparse.Namespace(grid="mnist", work=str(work), results=str(res), n_eval=1000, quick=False, steps=0,
                              shards="data/mnist28", threads=1)
    stage = {"stage": 1, "recon": {"psnr": 15.0, "kid": 0.1}, "samples": {"kid": 0.2}}
    for name, psnr in (("vae-s0", 15.0), ("msvae-s0", 17.0)):  # the earlier machine: both rows there
        run = work / "mnist" / name
        run.mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({"state": "finished", "step": 1000}))
        (run / "eval.json").write_text(json.dumps({"n_real": 1000, "stages": [{**stage, "recon": {"psnr": psnr}}]}))
        Image.new("L", (240, 64), 128).save(run / "samples.png")
    first = grid.report(args, [0], {})
    assert [r["row"] for r in first["rows"]] == ["vae-s0", "msvae-s0"]
    assert (res / "mnist_samples.png").is_file() and "mnist_samples.png" in first["meta"]["figures"]
    old_png = (res / "mnist_samples.png").read_bytes()

    import shutil  # this machine: vae-s0's run directory is gone, a new msvae_adv row is here
    shutil.rmtree(work / "mnist" / "vae-s0")
    adv = work / "mnist" / "msvae_adv-s0"
    shutil.copytree(work / "mnist" / "msvae-s0", adv)
    (adv / "metrics.jsonl").write_text(json.dumps({"step": 260, "loss": 1.0, "images_per_s": 5.0, "d_loss": 1.9,
                                                   "d_real_2": 0.1, "d_fake_2": -0.1, "g_adv_2": 0.01,
                                                   "fm_2": 0.05, "d_grad_norm": 1.0}) + "\n")
    for _ in range(2):  # a second report over the first keeps everything too
        out = grid.report(args, [0], {})
        rows = {r["row"]: r for r in out["rows"]}
        assert list(rows) == ["vae-s0", "msvae-s0", "msvae_adv-s0"]
        assert rows["vae-s0"]["kept_from"] == "mnist.json" and "kept_from" not in rows["msvae-s0"]
        assert rows["vae-s0"]["eval"] == first["rows"][0]["eval"]
        assert json.dumps(out["summary"]["vae"]) == json.dumps(first["summary"]["vae"])  # (NaN != NaN)
        assert (res / "mnist_samples.png").read_bytes() == old_png  # vae's pictures are not here: kept
        figs = out["meta"]["figures"]
        assert figs["mnist_samples.png"]["rows"] == ["vae-s0", "msvae-s0"]
        assert figs["mnist_samples_msvae_msvae_adv.png"]["rows"] == ["msvae-s0", "msvae_adv-s0"]
        assert figs["mnist_adv.png"]["rows"] == ["msvae_adv-s0"]
        md = (res / "mnist.md").read_text()
        assert "vae-s0 | finished (kept from the previous report)" in md
        assert "](mnist_samples.png)" in md and "](mnist_samples_msvae_msvae_adv.png)" in md
