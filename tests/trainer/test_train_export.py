"""Round trip of the export: a trained model's EMA weights, exported and loaded in a fresh process that
never imports `trainer`, give bitwise-equal outputs on the same input; `trainer.export` on a run and on a
checkpoint, with dtype conversion."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import ModelConfig, NStageVAE
from train_helpers import REPO, env, reference_1proc

LOADER = """
import sys, torch
from safetensors.torch import load_file, save_file
from models import load_pretrained
assert not any(m == "trainer" or m.startswith("trainer.") for m in sys.modules)
model = load_pretrained(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    recon = model.reconstruct(x)
    samples = model.sample(4, generator=torch.Generator().manual_seed(3))
assert not any(m == "trainer" or m.startswith("trainer.") for m in sys.modules)
save_file({**{f"recon_{i}": r for i, r in enumerate(recon)}, **{f"sample_{i}": s for i, s in enumerate(samples)}},
          sys.argv[3])
"""


@pytest.mark.slow
def test_export_loads_in_a_fresh_process_bitwise(tmp_path_factory, tmp_path):
    run = reference_1proc(tmp_path_factory)
    export = run.dir / "export"
    meta = json.loads((export / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["provenance"]["step"] == 20
    assert meta["preprocessing"]["size"] == 28 and meta["preprocessing"]["channels"] == 1

    # The reference: the EMA weights of the last checkpoint, in a model built here.
    ckpt = sorted((run.dir / "checkpoints").glob("step-*"))[-1]
    ref = NStageVAE(ModelConfig.from_dict(meta["model"]))
    ref.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    ref.eval()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_file({"x": x}, str(tmp_path / "x.safetensors"))

    r = subprocess.run([sys.executable, "-c", LOADER, str(export), str(tmp_path / "x.safetensors"),
                        str(tmp_path / "out.safetensors")], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        want_recon = ref.reconstruct(x)
        want_samples = ref.sample(4, generator=torch.Generator().manual_seed(3))
    for i, (a, b) in enumerate(zip(want_recon, want_samples)):
        assert torch.equal(got[f"recon_{i}"], a), f"stage {i + 1} reconstruction differs"
        assert torch.equal(got[f"sample_{i}"], b), f"stage {i + 1} sample differs"


@pytest.mark.slow
def test_export_cli_on_a_checkpoint_with_dtype(tmp_path_factory, tmp_path):
    run = reference_1proc(tmp_path_factory)
    ckpt = sorted((run.dir / "checkpoints").glob("step-*"))[-1]
    out = tmp_path / "bf16"
    r = subprocess.run([sys.executable, "-m", "trainer.export", str(ckpt), "--out", str(out), "--dtype", "bf16"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tensors = load_file(str(out / "model.safetensors"))
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert tensors.keys() == ema.keys()
    for k, v in tensors.items():
        assert v.dtype == (torch.bfloat16 if ema[k].is_floating_point() else ema[k].dtype), k
        assert torch.equal(v, ema[k].to(v.dtype)), k
    assert json.loads((out / "config.json").read_text())["preprocessing"]["dtype"] == "bf16"

    # A run directory without a committed checkpoint is a clear error, not a traceback.
    r = subprocess.run([sys.executable, "-m", "trainer.export", str(tmp_path)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "committed checkpoint" in r.stderr
