"""The trainer's config (unknown keys, sync_bn on CPU, default run.dir) and what a run leaves behind.

    pytest tests/trainer/test_train_config.py -m "not slow"    # config only, seconds
    pytest tests/trainer/test_train_config.py                  # plus one real 20-step run's artefacts
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from train_helpers import (ACCELERATE, REPO, RUN_PY, TINY, command, env, free_port, reference_1proc, reference_ddp,
                           train, train_rows)
from trainer.config import load_config, to_yaml


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN_PY), *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- config, no training
def test_unknown_key_exits_2_listing_the_sections_keys():
    done = run_cli("train.max_stepz=5", "run.dir=/nonexistent/never-created")
    assert done.returncode == 2, done.stderr
    assert "unknown config key 'train.max_stepz'" in done.stderr
    for key in ("train.max_steps", "train.batch_size", "train.grad_accum", "train.keep_ckpts", "train.init_from"):
        assert key in done.stderr, f"{key} missing from the list of valid keys: {done.stderr}"
    assert not os.path.exists("/nonexistent/never-created")


@pytest.mark.parametrize("override, section", [
    ("model.stages.1.widht=4", "model.stages.1"),
    ("data.shardz=x", "data"),
    ("bogus.key=1", "the top level"),
])
def test_unknown_key_names_the_deepest_existing_section(override, section):
    with pytest.raises(KeyError) as e:
        load_config("mnist", [override])
    assert f"valid keys under {section}" in str(e.value)


def test_bad_value_exits_2_naming_the_field():
    done = run_cli("train.max_steps=0")
    assert done.returncode == 2
    assert "train.max_steps" in done.stderr and ">= 1" in done.stderr


def test_default_run_dir_is_runs_slash_config_name(tmp_path):
    assert load_config("mnist", []).run.dir == os.path.join("runs", "mnist")
    own = tmp_path / "tiny_exp.yaml"
    own.write_text("train:\n  max_steps: 3\n")
    cfg = load_config(str(own), [])
    assert (cfg.run.name, cfg.run.dir, cfg.train.max_steps) == ("tiny_exp", os.path.join("runs", "tiny_exp"), 3)


def test_tiny_test_config_validates():
    cfg = load_config("mnist", TINY)
    assert cfg.data.synthetic and cfg.model.norm == "group" and cfg.model.stages[1].num_blocks == 1


@pytest.mark.slow
def test_sync_bn_on_cpu_fails_with_a_clear_message(tmp_path):
    run = train(tmp_path / "run", "model.sync_bn=true", "model.norm=batch", timeout=120)
    assert run.rc != 0
    assert "model.sync_bn=true needs GPUs" in run.log and "model.norm=group" in run.log
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not train_rows(
        [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()])


# ----------------------------------------------------------------------------- what a run leaves behind
@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference_1proc(tmp_path_factory)


@pytest.mark.slow
def test_resolved_config_yaml_is_written(ref):
    written = yaml.safe_load((ref.dir / "config.yaml").read_text())
    expected = load_config("mnist", [*TINY, "train.batch_size=16", "train.ckpt_every=5", "train.keep_ckpts=3",
                                     f"run.dir={ref.dir}"])
    assert written == yaml.safe_load(to_yaml(expected))
    assert written["train"]["batch_size"] == 16 and written["model"]["norm"] == "group"
    assert written["run"]["dir"] == str(ref.dir) and written["run"]["name"] == "mnist"


@pytest.mark.slow
def test_retention_keeps_the_last_keep_ckpts_committed(ref):
    root = ref.dir / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-0000010", "step-0000015", "step-0000020"]  # step 5 deleted
    for name in os.listdir(root):
        assert (root / name / "COMMITTED").read_text().strip() == str(int(name.split("-")[1]))
        assert json.loads((root / name / "trainer_state.json").read_text())["step"] == int(name.split("-")[1])
        assert (root / name / "ema.safetensors").is_file() and (root / name / "data_rank0.json").is_file()


@pytest.mark.slow
def test_metrics_rows_have_the_documented_keys(ref):
    rows = ref.rows
    train_part = train_rows(rows)
    assert [r["step"] for r in train_part] == list(range(1, 21))
    for r in train_part:
        for key in ("step", "loss", "kl", "rec_1", "rec_2", "lr", "grad_norm", "images_per_s"):
            assert key in r, f"{key} missing from {r}"
        assert "skipped" not in r
        assert r["images_per_s"] > 0 and r["grad_norm"] > 0
        assert r["loss"] == pytest.approx(r["rec_1"] + r["rec_2"] + r["kl"], rel=1e-5)  # terms are weighted
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [10, 20]
    assert all({"val_kl", "val_rec_1", "val_rec_2"} <= r.keys() for r in val)
    # warmup then cosine decay
    lrs = [r["lr"] for r in train_part]
    assert lrs[:5] == pytest.approx([3e-4 * (i + 1) / 5 for i in range(5)])
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] < lrs[5]
    assert train_part[-1]["loss"] < train_part[0]["loss"]


@pytest.mark.slow
def test_samples_export_tensorboard_status_and_run_json(ref):
    from models import load_pretrained

    assert sorted(os.listdir(ref.dir / "samples")) == ["step-0000010.png", "step-0000020.png"]
    from PIL import Image
    with Image.open(ref.dir / "samples" / "step-0000020.png") as im:
        assert im.size[0] > 28 and im.size[1] > 28
    assert (ref.dir / "export" / "model.safetensors").is_file() and (ref.dir / "export" / "config.json").is_file()
    model = load_pretrained(str(ref.dir / "export"))
    assert model.config.latent_dim == 16 and len(model.config.stages) == 2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(ref.dir / "tb"))
    assert ref.status()["state"] == "finished" and ref.status()["step"] == 20
    info = json.loads((ref.dir / "run.json").read_text())
    assert info["world_size"] == 1 and [h["rank"] for h in info["hosts"]] == [0]
    assert info["versions"]["torch"] and info["global_batch"] == 16


@pytest.mark.slow
def test_run_json_has_world_size_and_each_ranks_host(tmp_path_factory):
    ddp = reference_ddp(tmp_path_factory)
    info = json.loads((ddp.dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 16
    assert [h["rank"] for h in info["hosts"]] == [0, 1]
    assert all(h["host"] for h in info["hosts"])


def test_step_colon_rank_override_stays_text():
    # YAML 1.1 would read 3:1 as the base-60 integer 181
    assert load_config("mnist", ["train.inject_nan=3:1"]).train.inject_nan == "3:1"
    assert load_config("mnist", ["train.inject_nan=120:0"]).train.inject_nan == "120:0"
    assert load_config("mnist", ["train.max_steps=7", "train.lr=1e-3"]).train.lr == 1e-3


@pytest.mark.slow
def test_two_processes_that_would_not_sync_are_refused(tmp_path):
    """`--multi_gpu` on a CPU machine without ACCELERATE_USE_CPU=1 starts two processes that accelerate
    treats as undistributed (no DDP, gradients never averaged): the trainer must refuse, not train."""
    cmd, e = command(2)
    e.pop("ACCELERATE_USE_CPU", None)
    r = subprocess.run(cmd + [*TINY, "train.max_steps=2", f"run.dir={tmp_path / 'run'}"], env=e,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "gradients would not sync" in r.stdout + r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_cpu_2proc_accelerate_config_starts_two_synced_processes(tmp_path):
    e = env(ACCELERATE_USE_CPU="1")
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "trainer/accelerate/cpu_2proc.yaml"),
           "--main_process_port", str(free_port()), str(RUN_PY)]
    r = subprocess.run(cmd + [*TINY, "train.max_steps=2", f"run.dir={tmp_path / 'run'}"], env=e,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"].endswith("MULTI_CPU")


# ----------------------------------------------------------------------------- adv.* (adversarial refiner stages)
ADV_TINY = ["adv.stages=[2]", "adv.width=8", "adv.num_layers=2"]


@pytest.mark.parametrize("overrides, message", [
    (["adv.stages=[1]"], "adv.stages: 1 is not a refiner stage; refiners are stages 2..2 "
                         "(1-based; stage 1 is the VAE's decoder)"),
    (["adv.stages=[3]"], "adv.stages: 3 is not a refiner stage; refiners are stages 2..2"),
    (["adv.stages=[2,2]"], "adv.stages: each stage once, got [2, 2]"),
    (["adv.loss=wgan"], "adv.loss: must be one of hinge, nonsat, got 'wgan'"),
    (["adv.num_layers=4"], "adv (stage 2, 28 px): num_layers=4 leaves no patch to judge at 28 px; "
                           "use adv.num_layers <= 3"),
    (["adv.width=0"], "width and num_layers must be >= 1, got 0, 2"),
    (["adv.weight=-0.1"], "adv.weight, adv.feature_matching, adv.start and adv.clip_grad must be >= 0"),
    (["adv.start=-1"], "adv.weight, adv.feature_matching, adv.start and adv.clip_grad must be >= 0"),
    (["adv.lr=0"], "adv.lr must be a positive number and adv.betas two values"),
    (["adv.betas=[0.5]"], "adv.lr must be a positive number and adv.betas two values"),
])
def test_bad_adv_settings_fail_naming_the_field(overrides, message):
    with pytest.raises(ValueError) as e:
        load_config("mnist", [*TINY, *ADV_TINY, *overrides])
    assert message in str(e.value)


def test_adv_stage_range_and_size_follow_the_architecture():
    # 3 stages: refiners 2..3; 128 px (photo128): up to 5 stride-2 convs
    with pytest.raises(ValueError, match=r"adv.stages: 4 is not a refiner stage; refiners are stages 2..3"):
        load_config("mnist_3stage", ["adv.stages=[2,4]"])
    assert load_config("mnist_3stage", ["adv.stages=[3,2]", "adv.num_layers=2"]).adv_sizes() == {2: 28, 3: 28}
    with pytest.raises(ValueError, match=r"num_layers=6 leaves no patch to judge at 128 px; use adv.num_layers <= 5"):
        load_config("photo128_msvae_adv", ["adv.num_layers=6"])
    assert load_config("photo128_msvae_adv", ["adv.num_layers=5"]).adv.num_layers == 5


def test_bad_adv_value_exits_2_before_creating_the_run_dir():
    done = run_cli(*TINY, "adv.stages=[1]", "run.dir=/nonexistent/never-created")
    assert done.returncode == 2, done.stderr
    assert "config error: adv.stages: 1 is not a refiner stage" in done.stderr
    assert not os.path.exists("/nonexistent/never-created")
    with pytest.raises(KeyError, match=r"valid keys under adv: adv.stages, adv.weight, adv.loss"):
        load_config("mnist", ["adv.stagez=[2]"])


def test_adv_off_by_default_and_the_disc_config_follows_adv_and_model():
    cfg = load_config("mnist", TINY)
    assert cfg.adv.stages == [] and cfg.adv_sizes() == {}
    cfg = load_config("mnist", [*TINY, *ADV_TINY, "adv.spectral_norm=false"])
    d = cfg.disc_config()
    assert (d.channels, d.width, d.num_layers, d.spectral_norm) == (1, 8, 2, False)
    assert cfg.adv_sizes() == {2: 28}
    # the d_loss target of the NaN hook stays text, as STEP:RANK does
    assert load_config("mnist", ["train.inject_nan=3:1:d_loss"]).train.inject_nan == "3:1:d_loss"


def test_adv_section_round_trips_through_the_runs_config_yaml(tmp_path):
    """trainer.export rebuilds the discriminators' config from a checkpoint's config.yaml."""
    from trainer.config import from_yaml_file

    cfg = load_config("mnist", [*TINY, *ADV_TINY, "adv.loss=nonsat", "adv.start=7", "adv.betas=[0.0,0.9]"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    back = from_yaml_file(str(tmp_path / "config.yaml"))
    assert back.adv == cfg.adv and back.disc_config() == cfg.disc_config() and back.adv_sizes() == {2: 28}


@pytest.mark.parametrize("adv_preset, plain_preset", [
    ("mnist_msvae_adv", "mnist"), ("photo128_msvae_adv", "photo128_msvae"), ("celeba128_msvae_adv", "celeba128"),
])
def test_adv_presets_are_their_plain_preset_plus_adv(adv_preset, plain_preset):
    """What the presets' comments promise: the same model, data and training, and a discriminator on stage 2
    switched on after a pixel-loss phase."""
    adv, plain = load_config(adv_preset), load_config(plain_preset)
    assert adv.model.architecture() == plain.model.architecture()
    assert adv.train == plain.train and adv.data == plain.data
    assert adv.adv.stages == [2] and 0 < adv.adv.start < adv.train.max_steps
    assert plain.adv.stages == []
    size = adv.adv_sizes()[2]
    assert adv.disc_config().out_size(size) >= 1


@pytest.mark.parametrize("overrides, message", [
    (["train.compile=true", "train.compile_mode=reduce-overhead"],
     "train.cuda_graph: train.compile_mode=reduce-overhead captures CUDA graphs of its own; use "
     "compile_mode=default or max-autotune-no-cudagraphs with train.cuda_graph"),
    (["train.compile=true", "train.compile_mode=max-autotune"], "compile_mode=max-autotune captures CUDA graphs"),
    (["train.inject_nan=3:0:d_loss"], "train.inject_nan=STEP:RANK:d_loss is decided in Python inside the "
                                      "captured step; with train.cuda_graph inject into the input (STEP:RANK)"),
])
def test_cuda_graph_refuses_settings_it_cannot_capture(overrides, message):
    with pytest.raises(ValueError) as e:
        load_config("mnist", [*TINY, "train.cuda_graph=true", *overrides])
    assert message in str(e.value)
    load_config("mnist", [*TINY, *overrides])  # each is fine without it
    load_config("mnist", [*TINY, "train.cuda_graph=true", "train.compile=true",
                          "train.compile_mode=max-autotune-no-cudagraphs", "train.inject_nan=3:0"])
