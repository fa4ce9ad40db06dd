"""`python -m trainer.evaluate` end to end: a tiny exported 2-stage model on 8 held-out synthetic images,
as one process and as 2 gloo processes under `accelerate launch`, and once with `--no-inception`.

    pytest tests/trainer/test_evaluate.py

Each run spends ~40 Inception passes (0.1-0.3 s each) and, with FID, a 2048x2048 eigendecomposition per
stage and set, so the images are few.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import EncoderConfig, ModelConfig, NStageVAE, StageConfig
from shards.synthetic import make_celeba_layout
from shards.write import write_celeba
from trainer.export import write_export
from trainer.inception import resolve_inception

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
N_TEST = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Shards with an 8-image test split and an export of a tiny random model."""
    root = tmp_path_factory.mktemp("evaluate")
    src = make_celeba_layout(root / "src", 2 * N_TEST, zip_too=False)
    # Our own partition: the first N_TEST images are the test split, the rest train.
    src["partition"].write_text("".join(f"{i:06d}.jpg {2 if i <= N_TEST else 0}\n" for i in range(1, 2 * N_TEST + 1)))
    shards = root / "shards"
    write_celeba(str(shards), str(src["images"]), size=32, shard_samples=4, workers=1, progress=False)
    # A coarse 16 px decoder and a x2 refiner to 32 px, random weights: the metrics need no trained model.
    cfg = ModelConfig(image_size=32, channels=3, latent_dim=8, norm="group", kl_weight=1 / 8,
                      encoder=EncoderConfig(channels=[8, 16], convs_per_block=1),
                      stages=[StageConfig(kind="decoder", channels=[16, 8], out_size=16),
                              StageConfig(kind="refiner", width=8, num_blocks=1, upsample=True, loss="l1")])
    torch.manual_seed(0)
    export = write_export(NStageVAE(cfg).state_dict(), cfg, str(root / "export"))
    return {"root": root, "shards": shards, "export": export}


@pytest.fixture(scope="module")
def setup(tiny):
    resolve_inception()  # fetch once, before any process races for it
    return tiny


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(setup, out, *extra, launch=(), env=None):
    cmd = [*launch, "-m", "trainer.evaluate", setup["export"], "--shards", str(setup["shards"]), "--split", "test",
           "--n", str(N_TEST), "--batch-size", "4", "--out", str(out), *extra]
    cmd = cmd if launch else [sys.executable, *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(Path(out).read_text()), proc.stdout


@pytest.fixture(scope="module")
def single(setup):
    return _evaluate(setup, setup["root"] / "single.json", "--real-cache", str(setup["root"] / "cache"))


@pytest.mark.slow
def test_evaluate_reports_every_stage(single):
    result, stdout = single
    assert result["n_real"] == N_TEST and result["world_size"] == 1
    assert result["lead"] == "kid" and "KID leads" in stdout and "rec KID" in stdout
    assert len(result["stages"]) == 2
    for s in result["stages"]:
        r, p = s["recon"], s["samples"]
        for k in ("mse", "psnr", "ssim", "fid", "kid", "kid_std", "laplacian_variance_ratio",
                  "high_frequency_energy_ratio"):
            assert isinstance(r[k], float) and r[k] == r[k], (s["stage"], k)
        assert 0 <= r["mse"] <= 1 and -1 <= r["ssim"] <= 1
        assert r["psnr"] == pytest.approx(10 * torch.log10(torch.tensor(1 / r["mse"])).item(), abs=3)
        assert p["fid"] > 0 and r["kid_subset_size"] == p["kid_subset_size"] == N_TEST
        assert p["n_fake"] == r["n_fake"] == N_TEST
    assert result["inception"]["sha256"] == "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
    assert result["real_feature_cache"]["batches_computed"] == N_TEST // 4


@pytest.mark.slow
def test_evaluate_reuses_cached_real_features(setup, single):
    """A second model evaluation on the same split reads the real images' features from the cache (no
    Inception pass on them) and scores exactly as the first did; a truncated cache file is recomputed."""
    cache = setup["root"] / "cache"
    again, _ = _evaluate(setup, setup["root"] / "again.json", "--real-cache", str(cache))
    assert again["real_feature_cache"]["batches_cached"] == N_TEST // 4
    assert again["real_feature_cache"]["batches_computed"] == 0
    assert again["stages"] == single[0]["stages"]  # bit-identical FID, KID and the rest
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == N_TEST // 4
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated, as by a kill mid-write of a foreign tool
    healed, _ = _evaluate(setup, setup["root"] / "healed.json", "--real-cache", str(cache))
    assert healed["real_feature_cache"] == {**again["real_feature_cache"], "batches_cached": N_TEST // 4 - 1,
                                            "batches_computed": 1}
    assert healed["stages"] == single[0]["stages"]
    assert files[0].stat().st_size > 100  # rewritten whole


@pytest.mark.slow
def test_evaluate_under_accelerate_matches_one_process(setup, single):
    """2 gloo ranks, 4 images each: the gathered reconstruction metrics equal one process's over all 8."""
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(_free_port())]
    result, _ = _evaluate(setup, setup["root"] / "two.json", "--no-fid", launch=launch)
    assert result["world_size"] == 2 and result["n_real"] == N_TEST
    one = single[0]
    for a, b in zip(one["stages"], result["stages"]):
        for k in ("mse", "psnr", "ssim", "kid", "laplacian_variance_ratio", "high_frequency_energy_ratio"):
            assert b["recon"][k] == pytest.approx(a["recon"][k], rel=1e-4, abs=1e-5), (a["stage"], k)
        assert "fid" not in b["recon"] and b["samples"]["n_fake"] == N_TEST
    assert result["real"] == pytest.approx(one["real"], rel=1e-5)


@pytest.mark.slow
def test_evaluate_without_inception(tiny, tmp_path):
    """--no-inception: reconstruction and sharpness for every stage, no FID or KID, and the Inception file is
    never looked for: its cache does not exist and --inception names a missing file."""
    missing = tmp_path / "no-cache"
    result, stdout = _evaluate(tiny, tmp_path / "out.json", "--no-inception", "--inception",
                               str(missing / "default_1.pt"), env={"NSTAGE_VAE_CACHE": str(missing)})
    assert not missing.exists()
    assert result["n_real"] == N_TEST and "FID and KID skipped" in result["note"]
    assert "FID and KID skipped" in stdout and "KID" not in stdout.replace("FID and KID skipped", "")
    assert not {"inception", "lead", "lead_reason", "real_feature_cache"} & set(result)
    assert len(result["stages"]) == 2
    for s in result["stages"]:
        r, p = s["recon"], s["samples"]
        assert set(r) == {"mse", "psnr", "ssim", "laplacian_variance_ratio", "high_frequency_energy_ratio"}
        assert set(p) == {"laplacian_variance_ratio", "high_frequency_energy_ratio"}
        assert all(isinstance(v, float) and v == v for v in (*r.values(), *p.values())), s
        assert 0 <= r["mse"] <= 1 and -1 <= r["ssim"] <= 1


class _CountingInception(torch.nn.Module):
    """Stands in for InceptionFeatures: deterministic float64 features, and a count of images seen."""
    num_features = 6

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return (x.flatten(1).float()[:, :6] / 7).double()  # float32 values, as the real network gives


def test_real_feature_cache_keys_on_exact_pixels(tmp_path):
    from trainer.evaluate import RealFeatureCache

    net = _CountingInception()
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    first = RealFeatureCache(net, tmp_path)(x)
    cache = RealFeatureCache(net, tmp_path)
    assert torch.equal(cache(x), first) and cache(x).dtype == torch.float64 and net.seen == 4
    y = x.clone()
    y[0, 0, 0, 0] ^= 1  # one bit of one pixel: another key
    cache(y)
    cache(x[:2])  # a shorter batch of the same images: another key too
    assert net.seen == 4 + 4 + 2 and (cache.hits, cache.misses) == (2, 2)
    one = tmp_path / "one"
    RealFeatureCache(net, one)(x)
    (path,) = one.rglob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])  # truncated
    seen = net.seen
    with pytest.warns(UserWarning, match="unreadable real-feature cache file"):
        assert torch.equal(RealFeatureCache(net, one)(x), first)
    assert net.seen == seen + 4  # recomputed, and the file rewritten whole
    assert torch.equal(RealFeatureCache(net, one)(x), first) and net.seen == seen + 4
    assert not list(tmp_path.rglob("*.tmp"))
    off = RealFeatureCache(net, None)
    before = net.seen
    off(x), off(x)
    assert net.seen == before + 8 and off.hits == 0
