"""Run a comparison grid (VAE, deep residual VAE, 2- and 3-stage VAE, 2-stage VAE with an adversarial
refiner) through the toolkit's own CLIs.

    python experiments/grid.py mnist                          # 6 models x seeds 0 1: train, export, evaluate, report
    python experiments/grid.py mnist --seeds 0 1 2 --n-eval 2000
    python experiments/grid.py mnist --row msvae-s1           # (re-)run one row; finished phases are skipped
    python experiments/grid.py mnist --row msvae-s1 --force   # redo that row from scratch
    python experiments/grid.py mnist --phase train            # train + export only (evaluate later)
    python experiments/grid.py mnist --report                 # only collect results and render tables/figures
    python experiments/grid.py photos                         # builds data/photos128 from packaged photos first
    python experiments/grid.py photos --phase data            # only build those shards
    python experiments/grid.py photos --quick --src imgs/ --work /tmp/q --results /tmp/q/res   # tiny (the test)

Each row (`<model>-s<seed>`) lives in `<work>/<grid>/<row>/` (default work: runs/experiments) and goes
through real subprocesses only:
    accelerate launch ... trainer/run.py --config <preset> run.dir=<row> train.seed=<seed> ...
    python -m trainer.export <row>
    python -m trainer.evaluate <row>/export --shards <shards> --split test --n N --out <row>/eval.json
    python -m trainer.sample <row>/export ...                 # the pictures
A row with an export and eval.json is finished and skipped. An unfinished run is resumed: the same
train command is run again and the trainer resumes from its newest checkpoint. Interrupt at any time.

Results: `<results>/<grid>.json` (every row, its commands and numbers, plus mean and spread per model),
`<grid>.md` (tables, each number with its command), `<grid>_samples.png` (rows of samples per model,
every stage), `<grid>_recon.png`, `<grid>_loss.png` (loss curves), `<grid>_adv.png` (discriminator and
adversarial terms of the adversarial rows).

A report keeps the rows of the previous `<results>/<grid>.json` whose run directories are not on this machine
(their numbers copied unchanged, marked "kept from the previous report"). A figure that needs run directories
is then not redrawn: the previous one is kept, and the models whose pictures are here get their own
`<grid>_<kind>_<models>.png`; `<grid>.md` and the JSON's meta.figures say which rows each figure shows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"

# model name -> trainer preset; all presets of one grid share width, batch, optimizer and steps.
GRIDS = {
    "mnist": {
        "models": {"vae": "mnist_vae", "resvae": "mnist_resvae", "msvae": "mnist", "msvae3": "mnist_3stage",
                   "vae_halfkl": "mnist_vae", "msvae_adv": "mnist_msvae_adv"},
        # Controls: a preset plus overrides. vae_halfkl separates "more stages" from "less KL pressure": every
        # stage adds a reconstruction term of weight 1 against one KL term, so msvae's KL weighs half as much
        # relative to its reconstruction terms as the plain VAE's.
        "overrides": {"vae_halfkl": ["model.kl_weight=0.00390625"]},
        "shards": "data/mnist28",
        "n_eval": 1000,  # Inception runs 2 x stages times per image (+1 for an uncached real): ~0.15 CPU-s each
        "quick": {  # tiny widths and steps: exercises every phase in seconds
            "model.encoder.channels=[4,8,8]", "model.latent_dim=8",
        },
    },
    "photos": {
        "models": {"vae": "photo128_vae", "resvae": "photo128_resvae", "msvae": "photo128_msvae",
                   "msvae3": "photo128_3stage", "msvae_adv": "photo128_msvae_adv"},
        "shards": "data/photos128",
        "n_eval": 100,  # of the 252 held-out crops (the CPU budget; --n-eval 250 takes all that batches of 50 give)
        "quick": {"model.encoder.channels=[4,8,8]", "model.latent_dim=8"},
    },
}
# Per-model tiny stage widths in --quick mode (the stage lists differ between models).
QUICK_STAGES = {
    "vae": ["model.stages.0.channels=[8,8,4]"],
    "resvae": ["model.stages.0.channels=[8,8,4]", "model.stages.1.width=4", "model.stages.1.num_blocks=1"],
    "msvae": ["model.stages.0.channels=[8,8,4]", "model.stages.1.width=4", "model.stages.1.num_blocks=1"],
    "msvae3": ["model.stages.0.channels=[8,8,4]", "model.stages.1.width=4", "model.stages.1.num_blocks=1",
               "model.stages.2.width=4", "model.stages.2.num_blocks=1"],
    # msvae's tiny stages plus a tiny discriminator that is on from the second update (the switch-on is
    # exercised too); the presets' adv.num_layers (2 at 28 px, 3 at 128 px) fit the grids' image sizes.
    "msvae_adv": ["model.stages.0.channels=[8,8,4]", "model.stages.1.width=4", "model.stages.1.num_blocks=1",
                  "adv.width=4", "adv.start=1"],
}
def overrides_of(grid: str, model: str) -> list[str]:
    """The trainer overrides that make `model` a control of its preset (none for a plain preset)."""
    return GRIDS[grid].get("overrides", {}).get(model, [])


QUICK_BASE = {"vae_halfkl": "vae"}  # controls take their base model's tiny stages
QUICK_STEPS = 4
QUICK_N_EVAL = 8

# Photos bundled with scikit-image (natural images only: no logos, charts, text or tiny files) and
# Debian opencv-doc's sample photos; grey ones are stored as RGB. Of each stereo or
# view pair (motorcycle left/right, leuven A/B, aero 1/3) only one is listed, so no scene is on both sides
# of the train/test split.
SKIMAGE_PHOTOS = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                  "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg"]
OPENCV_DOC = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_PHOTOS = ["aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png", "board.jpg",
                 "box_in_scene.png", "building.jpg", "butterfly.jpg", "ela_original.jpg", "fruits.jpg", "graf1.png",
                 "home.jpg", "leuvenA.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png",
                 "smarties.png", "squirrel_cls.jpg", "stuff.jpg"]
PHOTO_CROPS = ["--crops-per-image", "12", "--scales", "1.0", "0.6", "0.35", "--test-fraction", "0.2", "--seed", "0"]


def log(msg: str) -> None:
    print(f"[grid {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def run(cmd: list[str], logfile: Path, env: dict) -> float:
    """Run one CLI, appending its output to logfile; raise with the log's tail when it fails."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(logfile, "a") as f:
        f.write(f"\n$ {sh(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = logfile.read_text()[-3000:]
        raise RuntimeError(f"`{sh(cmd)}` exited {r.returncode}; the end of {logfile}:\n{tail}")
    return time.time() - t0


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- data

def photo_sources(dest: Path) -> Path:
    """A folder of packaged photos (links): scikit-image's bundled ones plus opencv-doc's, if installed."""
    try:
        import skimage
    except ImportError:
        skimage = None
    dest.mkdir(parents=True, exist_ok=True)
    found = []
    if skimage is not None:
        sk = Path(skimage.__file__).parent / "data"
        found += [sk / n for n in SKIMAGE_PHOTOS if (sk / n).is_file()]
    if OPENCV_DOC.is_dir():
        found += [OPENCV_DOC / n for n in OPENCV_PHOTOS if (OPENCV_DOC / n).is_file()]
    if not found:
        raise SystemExit("no packaged photos found: `pip install scikit-image` (or `apt-get install opencv-doc`), "
                         "or pass --src DIR")
    for p in found:
        link = dest / f"{'opencv' if p.is_relative_to(OPENCV_DOC) else 'skimage'}_{p.name}"
        if not link.exists():
            link.symlink_to(p)
    return dest


def ensure_photo_shards(args, env) -> dict:
    """Build the photo shards with `shards.write folder` unless a manifest is already there."""
    out = Path(args.shards)
    if (out / "manifest.json").is_file() and not args.rebuild_data:
        return {"command": read_json(out / "grid_command.json", {}).get("command", "")}
    src = Path(args.src) if args.src else photo_sources(Path(args.work) / "photo_src")
    cmd = [sys.executable, "-m", "shards.write", "folder", "--src", str(src), "--out", str(out), "--size", "128",
           *PHOTO_CROPS, "--workers", "1", "--no-progress", "--overwrite"]
    if args.quick:
        cmd[cmd.index("12")] = "2"
    log(f"building shards: {sh(cmd)}")
    run(cmd, Path(args.work) / "shards.log", env)
    write_json(out / "grid_command.json", {"command": sh(cmd)})
    return {"command": sh(cmd)}


# ----------------------------------------------------------------------------- one row

def train_command(args, model: str, preset: str, seed: int, run_dir: Path) -> list[str]:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "trainer/run.py", "--config", preset, f"run.dir={run_dir}",
           f"train.seed={seed}", f"data.shards={args.shards}"]
    cmd += overrides_of(args.grid, model)
    if args.steps:
        cmd.append(f"train.max_steps={args.steps}")
    if args.quick:
        every = QUICK_STEPS // 2
        cmd += [f"train.max_steps={QUICK_STEPS}", "train.batch_size=4", "train.warmup_steps=1",
                f"train.log_every=1", f"train.eval_every={every}", f"train.ckpt_every={every}",
                f"train.sample_every={QUICK_STEPS}", "train.eval_batches=1", "train.num_samples=4",
                "data.num_workers=0", "data.shuffle_buffer=16", "run.tensorboard=false",
                *sorted(GRIDS[args.grid]["quick"]), *QUICK_STAGES[QUICK_BASE.get(model, model)]]
    return cmd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_row(run_dir: Path) -> bool:
    """Take `run_dir/grid.lock` (our pid); False when a live grid process holds it. A stale lock is taken over."""
    lock = run_dir / "grid.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return False
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def run_row(args, env, model: str, seed: int) -> None:
    name = f"{model}-s{seed}"
    run_dir = Path(args.work) / args.grid / name
    if args.force and run_dir.exists():
        if (run_dir / "grid.lock").exists() and not lock_row(run_dir):
            raise RuntimeError(f"{name}: another grid process is running this row; stop it before --force")
        log(f"{name}: --force, removing {run_dir}")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not lock_row(run_dir):  # two invocations (say a train and an eval one) never work on one row at once
        log(f"{name}: skipped, another grid process is working on it")
        return
    try:
        _run_row(args, env, model, seed, run_dir)
    finally:
        (run_dir / "grid.lock").unlink(missing_ok=True)


def _run_row(args, env, model: str, seed: int, run_dir: Path) -> None:
    g = GRIDS[args.grid]
    name = run_dir.name
    rec_path = run_dir / "grid_row.json"
    rec = read_json(rec_path, {"row": name, "model": model, "seed": seed, "preset": g["models"][model],
                               "train_invocations": [], "commands": {}})
    logfile = run_dir / "grid.log"
    export = run_dir / "export"
    eval_json = run_dir / "eval.json"
    status = read_json(run_dir / "status.json", {}).get("state")
    exported = (export / "config.json").is_file() and rec.get("exported")

    rec["commands"].setdefault("train", sh(train_command(args, model, g["models"][model], seed, run_dir)))
    if args.phase in ("train", "all") and status != "finished":
        cmd = train_command(args, model, g["models"][model], seed, run_dir)
        rec["commands"]["train"] = sh(cmd)
        log(f"{name}: training ({'resuming' if status else 'new'}): {sh(cmd)}")
        t0 = time.time()
        try:
            run(cmd, logfile, env)
        finally:  # an interrupted invocation still counts towards the wall time
            rec["train_invocations"].append({"start": t0, "wall_s": time.time() - t0,
                                             "state": read_json(run_dir / "status.json", {}).get("state")})
            write_json(rec_path, rec)
        status = read_json(run_dir / "status.json", {}).get("state")
        if status != "finished":
            raise RuntimeError(f"{name}: the trainer stopped with status {status!r}; run the grid again to resume")
    if status == "finished" and not exported:  # in any phase: export is cheap and evaluation needs it
        cmd = [sys.executable, "-m", "trainer.export", str(run_dir)]
        rec["commands"]["export"] = sh(cmd)
        run(cmd, logfile, env)
        rec["exported"] = True
        write_json(rec_path, rec)
        exported = True

    if args.phase in ("eval", "all") and exported:
        n = QUICK_N_EVAL if args.quick else args.n_eval
        if read_json(eval_json, {}).get("n_real") != n:  # missing, or made with another --n-eval
            cmd = [sys.executable, "-m", "trainer.evaluate", str(export), "--shards", args.shards, "--split",
                   "test", "--n", str(n), "--batch-size", str(min(50, n // 2)), "--out", str(eval_json)]
            if args.inception:
                cmd += ["--inception", args.inception]
            if args.no_fid:
                cmd.append("--no-fid")
            rec["commands"]["evaluate"] = sh(cmd)
            log(f"{name}: evaluating: {sh(cmd)}")
            rec["eval_wall_s"] = run(cmd, logfile, env)
            write_json(rec_path, rec)
        pics = {"samples": [sys.executable, "-m", "trainer.sample", str(export), "--n", "8", "--nrow", "8",
                            "--seed", "0", "--out", str(run_dir / "samples.png")],
                "recon": [sys.executable, "-m", "trainer.sample", str(export), "--n", "8", "--nrow", "8",
                          "--recon", args.shards, "--split", "test", "--out", str(run_dir / "recon.png")]}
        for key, cmd in pics.items():
            if not (run_dir / f"{key}.png").is_file():
                rec["commands"][key] = sh(cmd)
                run(cmd, logfile, env)
        write_json(rec_path, rec)
        log(f"{name}: done")


# ----------------------------------------------------------------------------- collecting

def count_params(export: Path) -> int | None:
    from safetensors import safe_open

    path = export / "model.safetensors"
    if not path.is_file():
        return None
    n = 0
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue  # buffers, not parameters
            n += math.prod(f.get_slice(k).get_shape())
    return n


def read_metrics_log(run_dir: Path) -> list[dict]:
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _wall_from_files(run_dir: Path) -> float | None:
    """Training wall time when no grid invocation timed it (a trainer that outlived its grid process):
    from the run's resolved config (written at start) to its status.json (written at the end)."""
    start, end = run_dir / "config.yaml", run_dir / "status.json"
    if read_json(end, {}).get("state") != "finished" or not start.is_file():
        return None
    return end.stat().st_mtime - start.stat().st_mtime


def collect_row(args, model: str, seed: int) -> dict:
    name = f"{model}-s{seed}"
    run_dir = Path(args.work) / args.grid / name
    rec = read_json(run_dir / "grid_row.json", {"row": name, "model": model, "seed": seed, "commands": {}})
    logs = read_metrics_log(run_dir)
    train_rows = [r for r in logs if "loss" in r and "images_per_s" in r]
    ips = [r["images_per_s"] for r in train_rows[1:]] or [r["images_per_s"] for r in train_rows]
    status = read_json(run_dir / "status.json", {})
    ev = read_json(run_dir / "eval.json")
    n_asked = QUICK_N_EVAL if args.quick else args.n_eval
    stale = ev is not None and ev.get("n_real") != n_asked  # never average evaluations of different sizes
    out = {
        "row": name, "model": model, "seed": seed, "preset": GRIDS[args.grid]["models"][model],
        "overrides": overrides_of(args.grid, model),
        "status": status.get("state", "not started"), "step": status.get("step", 0),
        "params": count_params(run_dir / "export"),
        "images_per_s": sum(ips) / len(ips) if ips else None,
        "train_wall_s": sum(i["wall_s"] for i in rec.get("train_invocations", [])) or _wall_from_files(run_dir),
        "train_invocations": len(rec.get("train_invocations", [])),
        "eval_wall_s": rec.get("eval_wall_s"),
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "final_val": next(({k: v for k, v in r.items() if k.startswith("val_")} for r in reversed(logs)
                           if any(k.startswith("val_") for k in r)), None),
        "eval": None if stale else ev,
        "eval_n_other": ev.get("n_real") if stale else None,
        "commands": rec.get("commands", {}),
        "grid_command": f"python experiments/grid.py {args.grid} --row {name}",
        "run_dir": str(run_dir),
    }
    return out


def stage_metrics(ev: dict | None) -> list[dict]:
    """Per-stage flat dicts from trainer.evaluate's JSON (tolerant of missing parts)."""
    if not ev:
        return []
    stages = ev.get("stages") or []
    out = []
    for i, s in enumerate(stages):
        flat = {"stage": s.get("stage", i + 1), "size": s.get("size") or s.get("image_size")}
        _flatten_into(flat, s, "")
        out.append(flat)
    return out


def _flatten_into(dst: dict, d: dict, prefix: str) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten_into(dst, v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            dst[key] = v


def mean_spread(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan"), 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return m, sd, len(v)


def summarise(rows: list[dict]) -> dict:
    """Per model and stage: mean, sample std and count of every numeric metric over seeds."""
    by_model: dict[str, dict] = {}
    for r in rows:
        if r["status"] != "finished":  # an unfinished run is listed under Runs, never averaged
            continue
        m = by_model.setdefault(r["model"], {"seeds": [], "rows": [], "scalars": {}, "stages": {}})
        m["seeds"].append(r["seed"])
        m["rows"].append(r["row"])
        for k in ("params", "images_per_s", "train_wall_s", "eval_wall_s", "final_train_loss"):
            m["scalars"].setdefault(k, []).append(r.get(k))
        for s in stage_metrics(r.get("eval")):
            st = m["stages"].setdefault(str(s["stage"]), {})
            for k, v in s.items():
                st.setdefault(k, []).append(v)
    for m in by_model.values():
        m["scalars"] = {k: dict(zip(("mean", "sd", "n"), mean_spread(v))) for k, v in m["scalars"].items()}
        m["stages"] = {st: {k: dict(zip(("mean", "sd", "n"), mean_spread(v))) for k, v in d.items()}
                       for st, d in m["stages"].items()}
    return by_model


# ----------------------------------------------------------------------------- rendering

# (column title, key in the flattened per-stage dict of trainer.evaluate's JSON, format[, scale]).
STAGE_COLUMNS = [
    ("KID samples ×1e3", "samples.kid", "{:.1f}", 1e3),
    ("FID samples", "samples.fid", "{:.1f}"),
    ("KID recon ×1e3", "recon.kid", "{:.1f}", 1e3),
    ("FID recon", "recon.fid", "{:.1f}"),
    ("PSNR dB", "recon.psnr", "{:.2f}"),
    ("SSIM", "recon.ssim", "{:.3f}"),
    ("LapVar ratio samples", "samples.laplacian_variance_ratio", "{:.2f}"),
    ("HF ratio samples", "samples.high_frequency_energy_ratio", "{:.2f}"),
    ("LapVar ratio recon", "recon.laplacian_variance_ratio", "{:.2f}"),
    ("HF ratio recon", "recon.high_frequency_energy_ratio", "{:.2f}"),
]


def _fmt(stat: dict | None, fmt: str, scale: float = 1.0) -> str:
    if not stat or not stat["n"] or not math.isfinite(stat["mean"]):
        return "—"
    s = fmt.format(stat["mean"] * scale)
    if stat["n"] > 1 and math.isfinite(stat["sd"]) and stat["sd"] > 0:
        s += " ± " + fmt.format(stat["sd"] * scale)
    return s


def pretty(cmd: str) -> str:
    """A recorded command as one would type it in the repository root."""
    acc = str(Path(sys.executable).with_name("accelerate"))
    return cmd.replace(acc + " ", "accelerate ").replace(sys.executable + " ", "python ").replace(str(REPO) + "/", "")


def render_markdown(grid: str, meta: dict, rows: list[dict], summary: dict, figures) -> str:
    """figures: [(title, file, rows shown or None)] (or a {title: file} dict)."""
    if isinstance(figures, dict):
        figures = [(t, f, None) for t, f in figures.items()]
    lines = [f"## Grid `{grid}`", ""]
    lines += [f"Setting: {pretty(meta['setting'])}", "",
              "Mean ± sample standard deviation over the seeds listed (n = number of finished seeds). "
              "Regenerate every number of a model with the command in the last column; the exact CLI calls of "
              "each run are listed under *Runs*.", ""]
    kept = [r["row"] for r in rows if r.get("kept_from")]
    if kept:
        lines += [f"Rows kept from the previous report ({len(kept)}: {', '.join(kept)}): their run directories are "
                  f"not on the machine that made this report, so their numbers, commands and wall times are copied "
                  f"unchanged from the previous `{grid}.json`, not recomputed. Running such a row again here would "
                  "train it anew.", ""]
    head = ["model", "stage", "n"] + [c[0] for c in STAGE_COLUMNS] + ["command"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, m in summary.items():
        cmd = f"`python experiments/grid.py {grid} " + " ".join(f"--row {r}" for r in m["rows"][:1]) + "` (one per seed)"
        if not m["stages"]:
            lines.append("| " + " | ".join([model, "—", "0"] + ["—"] * len(STAGE_COLUMNS) + [cmd]) + " |")
        for st, d in sorted(m["stages"].items(), key=lambda kv: int(kv[0])):
            cells = [model, st, str(max((v["n"] for v in d.values()), default=0))]
            for col in STAGE_COLUMNS:
                cells.append(_fmt(d.get(col[1]), col[2], col[3] if len(col) > 3 else 1.0))
            cells.append(cmd)
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | parameters | training images/s | train wall time (s) | eval wall time (s) | "
              "final train loss (own objective) | command |", "|---|---|---|---|---|---|---|"]
    for model, m in summary.items():
        s = m["scalars"]
        lines.append(f"| {model} | {_fmt(s['params'], '{:,.0f}')} | {_fmt(s['images_per_s'], '{:.0f}')} | "
                     f"{_fmt(s['train_wall_s'], '{:.0f}')} | {_fmt(s['eval_wall_s'], '{:.0f}')} | "
                     f"{_fmt(s['final_train_loss'], '{:.4f}')} | `python experiments/grid.py {grid} --report` |")
    lines += ["", "### Runs", "", "Every run of this grid, finished or not, with its last stage's headline numbers.", "",
              "| row | status | step | train invocations | train wall s | last stage: KID samples ×1e3 | PSNR dB | "
              "LapVar ratio samples | commands |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cmds = "<br>".join(f"{k}: `{pretty(v)}`" for k, v in r["commands"].items())
        last = stage_metrics(r.get("eval"))[-1:] or [{}]
        one = lambda k, f, sc=1.0: f.format(last[0][k] * sc) if k in last[0] else "—"  # noqa: E731
        wall = f"{r['train_wall_s']:.0f}" if r.get("train_wall_s") else "—"
        status = r["status"] + (f" (evaluated at N = {r['eval_n_other']}, not {meta['n_eval']}: run its row "
                                "again)" if r.get("eval_n_other") else "") \
            + (" (kept from the previous report)" if r.get("kept_from") else "")
        lines.append(f"| {r['row']} | {status} | {r['step']} | {r['train_invocations']} | {wall} | "
                     f"{one('samples.kid', '{:.1f}', 1e3)} | {one('recon.psnr', '{:.2f}')} | "
                     f"{one('samples.laplacian_variance_ratio', '{:.2f}')} | {cmds} |")
    for title, path, shown in figures:
        if path:
            lines += ["", f"![{title}]({path})"]
            if shown:
                lines += ["", f"*`{path}`: {title}; rows shown: {', '.join(shown)}.*"]
    return "\n".join(lines) + "\n"


def figure_samples(args, rows: list[dict], kind: str, out: Path) -> str | None:
    """One panel per model (first seed), each the trainer.sample grid: stage 1 on top, the last stage below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    firsts = {}
    for r in rows:
        p = Path(r["run_dir"]) / f"{kind}.png"
        if r["model"] not in firsts and p.is_file():
            firsts[r["model"]] = (r["row"], p)
    if not firsts:
        return None
    imgs = {m: Image.open(p) for m, (_, p) in firsts.items()}
    heights = [im.size[1] / im.size[0] for im in imgs.values()]
    width = 5.0  # inches; each panel as tall as its grid's aspect asks, plus room for its title
    fig, axes = plt.subplots(len(imgs), 1, figsize=(width, sum(width * h + 0.3 for h in heights) + 0.3),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    what = "samples (row block per stage, stage 1 on top)" if kind == "samples" else \
        "reconstructions (inputs on top, then one row block per stage)"
    for ax, (m, im) in zip(axes[:, 0], imgs.items()):
        ax.imshow(im, cmap="gray" if im.mode == "L" else None, interpolation="nearest")
        ax.set_title(f"{m} ({firsts[m][0]})", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{args.grid}: {what}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110 if all(im.mode == "L" for im in imgs.values()) else 75)  # photo panels: keep the PNG small
    plt.close(fig)
    return out.name


def figure_losses(args, rows: list[dict], out: Path) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    colours = {}
    drew = False
    for r in rows:
        logs = read_metrics_log(Path(r["run_dir"]))
        c = colours.setdefault(r["model"], f"C{len(colours)}")
        tr = [x for x in logs if "loss" in x]
        va = [x for x in logs if "val_loss" in x]
        if not tr:
            continue
        drew = True
        label = r["row"]
        ls = "-" if r["seed"] == rows[0]["seed"] else "--"
        axes[0].plot([x["step"] for x in tr], [x["loss"] for x in tr], c, ls=ls, lw=1, label=label)
        axes[1].plot([x["step"] for x in va], [x["val_loss"] for x in va], c, ls=ls, lw=1, marker=".", label=label)
        last = max((int(k.split("_")[-1]) for k in tr[-1] if k.startswith("rec_")), default=0)
        axes[2].plot([x["step"] for x in va if "val_rec_1" in x], [x["val_rec_1"] for x in va if "val_rec_1" in x],
                     c, ls=ls, lw=1, marker=".", label=f"{label} (stage 1 of {last})")
    if not drew:
        plt.close(fig)
        return None
    for ax, t in zip(axes, ["training loss (total)", "held-out loss (total)", "held-out stage-1 reconstruction term"]):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, ncol=2)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out.name


def _adv_logs(r: dict) -> list[dict]:
    """The metrics rows of a run that carry adversarial terms (the discriminator was on)."""
    return [x for x in read_metrics_log(Path(r["run_dir"])) if "d_loss" in x] if not r.get("kept_from") else []


def figure_adversarial(args, rows: list[dict], out: Path) -> str | None:
    """Adversarial runs: the discriminator's mean logits on real and generated images, its loss, the generator's
    adversarial and feature-matching terms, and the discriminator's gradient norm, against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(r, _adv_logs(r)) for r in rows]
    runs = [(r, logs) for r, logs in runs if logs]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for j, (r, logs) in enumerate(runs):
        c, step = f"C{j}", [x["step"] for x in logs]
        stages = sorted({k.rsplit("_", 1)[1] for x in logs for k in x if k.startswith("d_real_")})
        for st in stages:
            get = lambda k: [x.get(f"{k}_{st}", float("nan")) for x in logs]  # noqa: E731
            axes[0].plot(step, get("d_real"), c, lw=1, label=f"{r['row']} D(real), stage {st}")
            axes[0].plot(step, get("d_fake"), c, ls="--", lw=1, label=f"{r['row']} D(generated), stage {st}")
            axes[2].plot(step, get("g_adv"), c, lw=1, label=f"{r['row']} g_adv_{st}")
            axes[2].plot(step, get("fm"), c, ls=":", lw=1, label=f"{r['row']} fm_{st}")
        axes[1].plot(step, [x["d_loss"] for x in logs], c, lw=1, label=r["row"])
        axes[3].plot(step, [x.get("d_grad_norm", float("nan")) for x in logs], c, lw=1, label=r["row"])
    axes[0].axhline(0, color="grey", lw=0.5)
    for ax, t in zip(axes, ["discriminator: mean patch logit", "discriminator loss (hinge: 2 = chance)",
                            "generator: adversarial and feature-matching terms (weighted)",
                            "discriminator gradient norm"]):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out.name


def _preset_text(grid: str, model: str) -> str:
    overrides = overrides_of(grid, model)
    return f"`{GRIDS[grid]['models'][model]}`" + (f" with `{' '.join(overrides)}` ({model})" if overrides else "")


def kept_rows(args, seeds: list[int], previous: dict | None, collected: list[dict]) -> list[dict]:
    """Rows of the previous `<results>/<grid>.json` whose run directory is not on this machine.

    Their numbers come from that JSON, unchanged (a report made elsewhere, or before the runs were deleted);
    `kept_from` says so. A row that has a run directory here is always collected afresh instead."""
    g = GRIDS[args.grid]
    have = {r["row"] for r in collected}
    n_asked = QUICK_N_EVAL if args.quick else args.n_eval
    out = []
    for r in (previous or {}).get("rows", []):
        if r.get("row") in have or r.get("model") not in g["models"] or r.get("seed") not in seeds:
            continue
        if (Path(args.work) / args.grid / r["row"]).is_dir() or (r.get("run_dir") and Path(r["run_dir"]).is_dir()):
            continue  # a directory that is here is the truth (collected when its seed is asked for)
        r = dict(r)
        r.setdefault("kept_from", f"{args.grid}.json")
        ev = r.get("eval")
        if ev is not None and ev.get("n_real") != n_asked:  # as collect_row: never average evaluations of other sizes
            r["eval"], r["eval_n_other"] = None, ev.get("n_real")
        elif ev is None and r.get("eval_n_other") == n_asked:
            r["eval_n_other"] = None  # (cannot happen with an honest JSON; kept for symmetry)
        out.append(r)
    return out


def _figure(kind: str, args, rows: list[dict], res: Path, previous: dict | None) -> list[tuple[str, str, list[str]]]:
    """The figure(s) of one kind: [(title, file name, rows shown)].

    When every model's pictures (or metrics log) are here, one figure of every model, as always. When some are
    only in the previous report (their run directories are not on this machine), that report's figure is kept
    unchanged (it shows those models as rendered then) and the models whose pictures are here get a figure of
    their own, `<grid>_<kind>_<models>.png`; the markdown says which figure shows which rows."""
    def source(r):
        rd = Path(r["run_dir"])
        return rd / "metrics.jsonl" if kind == "loss" else rd / f"{kind}.png"

    title = {"samples": "samples", "recon": "reconstructions", "loss": "loss curves"}[kind]
    finished_models = list(dict.fromkeys(r["model"] for r in rows if r["status"] == "finished"))
    here = [r for r in rows if not r.get("kept_from") and source(r).is_file()]
    here_models = list(dict.fromkeys(r["model"] for r in here))
    draw = figure_losses if kind == "loss" else (lambda a, rs, out: figure_samples(a, rs, kind, out))
    full = res / f"{args.grid}_{kind}.png"
    if all(m in here_models for m in finished_models):
        name = draw(args, here, full)
        return [(f"{args.grid} {title}", name, _shown(kind, here))] if name else []
    figs = []
    prev = ((previous or {}).get("meta", {}).get("figures") or {}).get(full.name)
    if full.is_file():
        if prev is None:  # a report from before figures were recorded: it drew every row it had
            prev = {"title": f"{args.grid} {title}", "rows": _shown(kind, [r for r in rows if r.get("kept_from")])}
        figs.append((prev["title"] + " (kept from an earlier report)", full.name, prev["rows"]))
    if here:
        out = res / f"{args.grid}_{kind}_{'_'.join(here_models)}.png"
        name = draw(args, here, out)
        if name:
            figs.append((f"{args.grid} {title}: {', '.join(here_models)}", name, _shown(kind, here)))
    return figs


def _shown(kind: str, rows: list[dict]) -> list[str]:
    """The rows a figure of `kind` draws from `rows`: every row for loss curves, the first row per model else."""
    if kind == "loss":
        return [r["row"] for r in rows]
    return list({r["model"]: r["row"] for r in reversed(rows)}.values())[::-1]


def report(args, seeds: list[int], data_info: dict) -> dict:
    g = GRIDS[args.grid]
    res = Path(args.results)
    previous = read_json(res / f"{args.grid}.json")
    rows = [collect_row(args, m, s) for m in g["models"] for s in seeds
            if (Path(args.work) / args.grid / f"{m}-s{s}").is_dir()]
    rows += kept_rows(args, seeds, previous, rows)
    order = list(g["models"])
    rows.sort(key=lambda r: (order.index(r["model"]), r["seed"]))
    summary = summarise(rows)
    res.mkdir(parents=True, exist_ok=True)
    figs = [f for kind in ("samples", "recon", "loss") for f in _figure(kind, args, rows, res, previous)]
    adv = figure_adversarial(args, rows, res / f"{args.grid}_adv.png")
    if adv:
        figs.append((f"{args.grid} adversarial terms", adv, [r["row"] for r in rows if _adv_logs(r)]))
    steps = "the preset's" if not args.steps else str(args.steps)
    meta = {"grid": args.grid, "seeds": seeds, "steps": QUICK_STEPS if args.quick else (args.steps or "preset"),
            "n_eval": QUICK_N_EVAL if args.quick else args.n_eval, "quick": args.quick, "shards": args.shards,
            "data": data_info or (previous or {}).get("meta", {}).get("data", {}), "threads": args.threads,
            "setting": f"presets {', '.join(_preset_text(args.grid, m) for m in g['models'])}, {steps} steps, seeds "
                       f"{seeds}, evaluation on {QUICK_N_EVAL if args.quick else args.n_eval} held-out images "
                       f"(`{args.shards}`, split test), OMP_NUM_THREADS={args.threads}"
                       + (" (--quick)" if args.quick else ""),
            "figures": {name: {"title": t.removesuffix(" (kept from an earlier report)"), "rows": shown}
                        for t, name, shown in figs}}
    out = {"meta": meta, "rows": rows, "summary": summary}
    write_json(res / f"{args.grid}.json", out)
    (res / f"{args.grid}.md").write_text(render_markdown(args.grid, meta, rows, summary, figs))
    log(f"wrote {res / (args.grid + '.json')}, {res / (args.grid + '.md')} and figures")
    return out


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/grid.py", description=__doc__.split("\n\n")[0])
    p.add_argument("grid", choices=sorted(GRIDS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--models", nargs="+", default=None, help="a subset of the grid's models")
    p.add_argument("--row", action="append", default=[], help="only this row, e.g. msvae-s1 (repeatable)")
    p.add_argument("--force", action="store_true", help="with --row: delete the row's run and redo it")
    p.add_argument("--phase", choices=["all", "data", "train", "eval"], default="all",
                   help="data: only build the photo shards; train: train + export; eval: evaluate + pictures")
    p.add_argument("--report", action="store_true", help="only collect results and render")
    p.add_argument("--steps", type=int, default=0, help="train.max_steps for every model (default: the preset's)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out images per evaluation (and samples per stage)")
    p.add_argument("--shards", default=None, help="shard directory (default: the grid's)")
    p.add_argument("--src", default=None, help="photos grid: folder of photos to cut (default: packaged photos)")
    p.add_argument("--rebuild-data", action="store_true", help="photos grid: rewrite the shards")
    p.add_argument("--inception", default=None, help="FID Inception file, passed to trainer.evaluate")
    p.add_argument("--no-fid", action="store_true", help="skip Inception metrics (passed to trainer.evaluate)")
    p.add_argument("--work", default=str(REPO / "runs" / "experiments"), help="where the runs live")
    p.add_argument("--results", default=str(RESULTS), help="where the JSON, markdown and figures go")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every subprocess")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps, few eval images (for tests)")
    p.add_argument("--keep-going", action="store_true", help="continue with the next row when one fails")
    args = p.parse_args(argv)
    g = GRIDS[args.grid]
    args.shards = args.shards or str(REPO / g["shards"])
    args.n_eval = args.n_eval or g["n_eval"]
    models = args.models or list(g["models"])
    bad = [m for m in models if m not in g["models"]]
    if bad:
        p.error(f"unknown models {bad}; the {args.grid} grid has {list(g['models'])}")
    todo = [(m, s) for s in args.seeds for m in models]  # seed-major: a whole first seed before the second
    if args.row:
        names = {f"{m}-s{s}": (m, s) for m in g["models"] for s in args.seeds}
        for r in args.row:
            model, _, seed = r.rpartition("-s")
            if model not in g["models"] or not seed.isdigit():
                p.error(f"--row {r!r}: expected <model>-s<seed> with model in {list(g['models'])}")
            names[r] = (model, int(seed))
        todo = [names[r] for r in args.row]
    elif args.force:
        p.error("--force needs --row (it deletes that row's run)")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    seeds = sorted({s for _, s in todo} | set(args.seeds))

    data_info = {}
    if args.grid == "photos" and not args.report:
        data_info = ensure_photo_shards(args, env)
    if args.phase == "data":
        return 0
    elif args.grid == "photos":
        data_info = {"command": read_json(Path(args.shards) / "grid_command.json", {}).get("command", "")}
    if not args.report:
        failed = []
        for model, seed in todo:
            try:
                run_row(args, env, model, seed)
            except RuntimeError as exc:
                log(f"{model}-s{seed} failed: {exc}")
                failed.append(f"{model}-s{seed}")
                if not args.keep_going:
                    report(args, seeds, data_info)
                    return 1
        if failed:
            report(args, seeds, data_info)
            return 1
    report(args, seeds, data_info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
