"""Throughput of our training loop against a plain PyTorch loop and a hand-written reference: same model,
data, precision and batch.

    python bench/train.py                                   # the default MNIST preset on this machine
    python bench/train.py --config celeba128 --batch 32 --device cuda --mixed-precision bf16 --channels-last
    python bench/train.py --config celeba128 --batch 32 --device cuda --mixed-precision bf16 --channels-last \\
        --json bench.json --sweep                           # plus the batch-size curve (longer)
    python bench/train.py --config celeba128 ... --adv         # plus ours with the adversarial refiner on

Loops, each timed over `--steps` steps in intervals of `--interval` (the first interval is warm-up:
allocator, cuDNN autotuning, compilation; it is dropped):
  hand-written  bench/handwritten.py: the celeba128_msvae layer list as nn.Sequentials, the official loss,
                batches already on the device; forward, loss, backward, Adam step and nothing else. The
                ceiling for this model; run only when the model is celeba128_msvae (else skipped, saying why).
  plain         NStageVAE, nstage_loss, Adam: forward, loss, backward, step, on the trainer's synthetic
                stream; each batch is made on the host, pinned (CUDA) and copied at the start of its step.
  ours          `trainer.loop.train(cfg)` in this process on that stream (finite check, grad norm, LR each
                step, EMA, metrics); its rates are metrics.jsonl's `images_per_s`. Once the timed steps are
                logged, the benchmark writes the run's STOP file, so the trainer checkpoints and exits
                (it says "stopped by STOP file") instead of evaluating, sampling and exporting.
Every loop uses the trainer's optimizer settings: Adam with its lr, betas and weight decay, fused (on CUDA
and on CPU); on CUDA all run with cudnn.benchmark on, as the trainer sets it.
  ours sync-free  with `--sync-free`: ours with `train.sync_free=true` (the host reads each step's numbers
                one step late, so it never waits for the GPU between steps); printed as
                `sync_free_gain_<mode>=<its images/s / ours'>`.
  ours cuda-graph  with `--cuda-graph`: ours with `train.cuda_graph=true` (the step captured as CUDA graphs
                after 3 eager steps and replayed; on CPU uncaptured), after every other loop; printed as
                `cuda_graph_gain_<mode>=<its images/s / ours'>`. Not in a compile mode that captures graphs
                of its own (reduce-overhead, max-autotune): skipped there, saying why.
  ours shards   with `--shards [DIR]`: ours on real shards instead of the synthetic stream, in the first
                mode only, with `--shards-workers` loader workers (default 8): DIR, or without one a
                CelebA-layout fixture written for the run at the model's size (shards/synthetic.py's faces,
                `shards.write celeba`), one epoch longer than the loop, in 2 shards per worker. Printed
                as `shards_vs_synthetic_<mode>=<its images/s / ours'>`: whether the data path keeps up.
  ours + adversarial  with `--adv`: ours on the adversarial preset (`--adv-config`, default the config's
                `*_msvae_adv` sibling) with `adv.start=0`, so the discriminator trains from the first
                step; printed as `adv_cost_<mode>=<its time per step / ours'>`. Its MFU is n/a (the
                counted FLOPs are the VAE's).
Modes (`--modes`): eager, and compile (plain compiled as the trainer compiles: `torch.compile` of the model
and of the loss; `train.compile=true` for ours; both in `--compile-mode`); default both on CUDA, eager on
CPU. The loops alternate `--repeats` times; each row is the median of its per-interval images/s.

Output: one line per loop run (images/s, peak memory, wall time), a markdown table (images/s; MFU =
images/s x counted FLOPs per image / `--peak-tflops`, on CUDA; peak memory = torch.cuda.max_memory_allocated
over the loop, less what was allocated before it; hours to the paper's 6.4M images = 200k steps x 32),
`ratio_compile=<ours/plain compiled>` when compiled, and last `ratio=<ours/plain>` (eager when it ran).
`--json PATH` writes the same numbers. `--sweep` then runs ours in its fastest mode at the batch doubled
from `--batch` until CUDA runs out of memory (or `--sweep-max`).
A loop that raises is reported with its traceback, once more as `FAILED: <loop> <mode>: <error>` before
the ratio lines and under `failed` in the JSON, and is not run again; the other loops still run, and the
exit status is then 1 (a new setting that breaks on some machine costs its own row, not the table).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]  # the repository (models, trainer) and bench/ (handwritten)

import torch  # noqa: E402

import handwritten  # noqa: E402
from models import MODEL_PRESETS, ModelConfig, NStageVAE, nstage_loss  # noqa: E402
from trainer.config import GRAPH_COMPILE_MODES, Config, load_config  # noqa: E402
from trainer.data import SyntheticStream, to_model_input  # noqa: E402

PAPER_IMAGES = 200_000 * 32  # the paper's CelebA budget: 200k steps at batch 32
LOOPS = ("handwritten", "plain", "ours")
LABEL = {"handwritten": "hand-written", "plain": "plain", "ours": "ours", "ours_sync_free": "ours sync-free",
         "ours_cuda_graph": "ours cuda-graph", "ours_shards": "ours shards",
         "ours_adv": "ours + adversarial"}
SYNC_FREE = "train.sync_free=true"  # the override of the "ours sync-free" loop
CUDA_GRAPH = "train.cuda_graph=true"  # the override of the "ours cuda-graph" loop
VARIANTS = {"ours_sync_free": SYNC_FREE, "ours_cuda_graph": CUDA_GRAPH}  # ours with one override each
# The loops compared with ours (their images/s over ours'), and the key each ratio is printed and saved under.
GAIN_KEYS = {"ours_sync_free": "sync_free_gain", "ours_cuda_graph": "cuda_graph_gain",
             "ours_shards": "shards_vs_synthetic"}
ADV_PRESETS = {"mnist": "mnist_msvae_adv", "celeba128": "celeba128_msvae_adv", "photo128_msvae": "photo128_msvae_adv"}
GIB = 2**30
HANDWRITTEN_BATCHES = 4  # distinct batches the hand-written loop keeps on the device and cycles through


def count(arch: ModelConfig) -> tuple[int, float]:
    """Parameters, and forward + backward FLOPs per image counted by torch's FlopCounterMode, both on the
    meta device (shapes only: instant even for the 103M-parameter model)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = NStageVAE(arch)
        x = torch.zeros(2, arch.channels, arch.image_size, arch.image_size)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        loss, _ = nstage_loss(out, x, arch)
        loss.backward()
    return sum(q.numel() for q in model.parameters()), counter.get_total_flops() / x.shape[0]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: the clock is read once they are done


def interval_rates(step, steps: int, interval: int, batch: int, device: str) -> list[float]:
    """Call `step()` `steps` times; images/s of every whole interval after the first (warm-up)."""
    rates, t = [], None
    for i in range(steps):
        if i == interval:
            sync(device)
            t = time.perf_counter()
        step()
        if t is not None and (i + 1) % interval == 0:
            sync(device)
            now = time.perf_counter()
            rates.append(interval * batch / (now - t))
            t = now
    return rates


def synthetic_batches(cfg: Config):
    """The trainer's synthetic stream (what ours trains on), epoch after epoch."""
    stream = SyntheticStream(cfg.train.batch_size, seed=cfg.train.seed, image_size=cfg.model.image_size,
                             channels=cfg.model.channels, size=cfg.data.synthetic_size)
    while True:
        yield from stream


def model_input(batch: dict, cfg: Config, device: str) -> torch.Tensor:
    """On CUDA from pinned memory, as a DataLoader with pin_memory=True hands it over."""
    if device == "cuda":
        batch = {"image": batch["image"].pin_memory()}
    return to_model_input(batch, device, None, cfg.train.channels_last)


def host_batch_ms(cfg: Config, device: str, n: int = 5) -> float:
    """Milliseconds to make one synthetic batch on the host and bring it to the device as a model input."""
    it = synthetic_batches(cfg)
    model_input(next(it), cfg, device)
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        model_input(next(it), cfg, device)
    sync(device)
    return (time.perf_counter() - t) / n * 1e3


def optimizer_for(model: torch.nn.Module, cfg: Config, device: str) -> torch.optim.Adam:
    return handwritten.make_optimizer(model, device, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)


def plain_step(cfg: Config, device: str, dtype, compile_kwargs: dict | None):
    """One plain step as a closure: forward, loss, backward, Adam step on the trainer's synthetic stream.
    `compile_kwargs` None: eager; else torch.compile's arguments, compiled as the trainer compiles (the
    model with them, and the loss apart)."""
    torch.manual_seed(cfg.train.seed)
    arch = cfg.model.architecture()
    model = NStageVAE(arch).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = optimizer_for(model, cfg, device)
    loss_fn = nstage_loss
    if compile_kwargs is not None:
        model = torch.compile(model, **compile_kwargs)
        loss_fn = torch.compile(nstage_loss)
    it = synthetic_batches(cfg)

    def step():
        x = model_input(next(it), cfg, device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        loss, _ = loss_fn(out, x, arch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def plain_loop(cfg: Config, steps: int, interval: int, device: str, dtype, compile_kwargs: dict | None) -> list[float]:
    return interval_rates(plain_step(cfg, device, dtype, compile_kwargs), steps, interval, cfg.train.batch_size,
                          device)


def handwritten_skip_reason(arch: ModelConfig) -> str | None:
    ref = MODEL_PRESETS["celeba128_msvae"]().to_dict()
    diff = sorted(k for k, v in arch.to_dict().items() if ref[k] != v)
    if diff:
        return f"it is celeba128_msvae's layer list (128 px, 3 channels); this model differs in {', '.join(diff)}"
    return None


def handwritten_loop(cfg: Config, steps: int, interval: int, device: str, dtype) -> list[float]:
    torch.manual_seed(cfg.train.seed)
    model = handwritten.HandwrittenVAE().to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = optimizer_for(model, cfg, device)
    # A few of the stream's batches, normalised on the device once: the step reads no host memory.
    it = synthetic_batches(cfg)
    xs = itertools.cycle([model_input(next(it), cfg, device) for _ in range(HANDWRITTEN_BATCHES)])
    return interval_rates(lambda: handwritten.train_step(model, opt, next(xs), dtype),
                          steps, interval, cfg.train.batch_size, device)


def make_shards(root: str, cfg: Config, steps: int, interval: int, workers: int) -> str:
    """A CelebA-layout fixture written as shards at the model's size, for the "ours shards" loop: enough
    training images that the loop never starts a second epoch (it would restart the loader's workers),
    in 2 shards per worker. Returns the shards directory."""
    from shards.synthetic import CELEBA_FRACTIONS, make_celeba_layout
    from shards.write import write_celeba

    batch = cfg.train.batch_size
    n_train = int((steps + 2 * interval) * batch * 1.2) + 2 * workers * batch
    n = int(n_train / CELEBA_FRACTIONS[0]) + 1
    t = time.perf_counter()
    src = make_celeba_layout(os.path.join(root, "src"), n, zip_too=False)
    out = os.path.join(root, "shards")
    write_celeba(out, str(src["images"]), partition=str(src["partition"]), size=cfg.model.image_size,
                 shard_samples=max(1, -(-src["n_train"] // (2 * max(1, workers)))), progress=False)
    print(f"shards: {n} CelebA-layout images ({src['n_train']} for training) written as {cfg.model.image_size} px "
          f"shards in {out} in {time.perf_counter() - t:.1f} s", flush=True)
    return out


def _stop_after(run_dir: str, step: int, done: threading.Event) -> None:
    """Write run_dir/STOP once metrics.jsonl holds the row of `step`."""
    path = os.path.join(run_dir, "metrics.jsonl")
    while not done.wait(0.05):
        try:
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError):  # not there yet, or a row half written
            continue
        if any(r.get("step", 0) >= step for r in rows):
            open(os.path.join(run_dir, "STOP"), "w").close()
            return


def our_loop(cfg: Config, steps: int, interval: int) -> list[float]:
    from trainer.loop import train

    with tempfile.TemporaryDirectory() as d:
        cfg.run.dir, cfg.run.tensorboard = d, False
        # Past `steps` only in case the STOP file is late; eval, samples and checkpoints never come due.
        cfg.train.max_steps, cfg.train.log_every = 2 * steps + interval, interval
        cfg.train.eval_every = cfg.train.sample_every = cfg.train.ckpt_every = 10 * steps
        done = threading.Event()
        watcher = threading.Thread(target=_stop_after, args=(d, steps, done), daemon=True)
        watcher.start()
        try:
            train(cfg)
        finally:
            done.set()
            watcher.join()
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r and r["step"] <= steps]
    return rates[1:]  # drop the warm-up interval


def measure(run, device: str) -> tuple[list[float], float | None, float]:
    """Run one loop: its interval rates, the memory it allocated at its peak (GiB, CUDA) and its wall time."""
    gc.collect()
    base = 0
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    rates = run()
    sync(device)
    elapsed = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / GIB if device == "cuda" else None
    return rates, peak, elapsed


def is_oom(e: BaseException) -> bool:
    """CUDA's allocator, or a library (cuBLAS, cuDNN) that could not allocate its workspace."""
    msg = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in msg or "alloc_failed" in msg


def adv_disc_params(cfg: Config):
    from models.discriminator import StageDiscriminators
    return StageDiscriminators(cfg.disc_config(), cfg.adv_sizes()).parameters()


def summary(rates: list[float], flops: float | None, peak_tflops: float, device: str) -> dict:
    ips = statistics.median(rates)
    mfu = ips * flops / (peak_tflops * 1e12) if device == "cuda" and flops is not None else None
    return {"images_per_s": ips, "mfu": mfu,
            "hours_to_paper_images": PAPER_IMAGES / ips / 3600}


def fmt(v, spec: str, unit: str = "") -> str:
    return "n/a" if v is None else format(v, spec) + unit


def write_json(path: str, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def table(rows: list[dict]) -> str:
    lines = ["| loop | mode | images/s | MFU | peak memory (GiB) | hours to 6.4M images |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {LABEL[r['loop']]} | {r['mode']} | {r['images_per_s']:.1f} | {fmt(r['mfu'], '.1%')} | "
                     f"{fmt(r['peak_memory_gib'], '.2f')} | {r['hours_to_paper_images']:.2f} |")
    return "\n".join(lines)


def sweep(a, overrides: list[str], mode: str, flops: float, device: str) -> list[dict]:
    """Ours in `mode` at the batch doubled from a.batch until CUDA runs out of memory or a.sweep_max."""
    points, batch = [], a.batch
    how = "".join(f" {LABEL[v].removeprefix('ours ')}" for v, o in VARIANTS.items() if o in overrides)
    print(f"sweep: ours {mode}{how}, batch {batch} doubling up to {a.sweep_max} or out of memory", flush=True)
    while batch <= a.sweep_max:
        cfg = load_config(a.config, [*overrides, f"train.batch_size={batch}"])
        if mode == "compile":
            torch._dynamo.reset()  # compile each batch afresh, static as a run at that batch would be
        try:
            rates, peak, elapsed = measure(lambda: our_loop(cfg, a.steps, a.interval), device)
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
            if not is_oom(e):
                raise
            print(f"sweep batch {batch}: out of memory", flush=True)
            points.append({"batch": batch, "oom": True})
            break
        finally:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        point = {"batch": batch, "oom": False, **summary(rates, flops, a.peak_tflops, device),
                 "peak_memory_gib": peak, "elapsed_s": elapsed}
        points.append(point)
        print(f"sweep batch {batch}: {point['images_per_s']:.1f} img/s, MFU {fmt(point['mfu'], '.1%')}, "
              f"peak {fmt(peak, '.2f', ' GiB')}, {elapsed:.1f} s", flush=True)
        batch *= 2
    print("\n| batch | images/s | MFU | peak memory (GiB) |\n| --- | --- | --- | --- |")
    for p in points:
        if p["oom"]:
            print(f"| {p['batch']} | out of memory | | |")
        else:
            print(f"| {p['batch']} | {p['images_per_s']:.1f} | {fmt(p['mfu'], '.1%')} | "
                  f"{fmt(p['peak_memory_gib'], '.2f')} |")
    print(flush=True)
    return points


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mnist")
    p.add_argument("--batch", type=int, default=0, help="per-device batch (default: the preset's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=0, help="steps per loop (default: 60 on CPU, 80 on CUDA)")
    p.add_argument("--interval", type=int, default=0, help="steps per timed interval (default: 10 CPU, 20 CUDA)")
    p.add_argument("--repeats", type=int, default=0, help="alternations of the loops (default: 2 CPU, 1 CUDA)")
    p.add_argument("--modes", default="", help="eager,compile (default: both on CUDA, eager on CPU)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the compiled rows: default, reduce-overhead, max-autotune, ...")
    p.add_argument("--loops", default=",".join(LOOPS), help="which of handwritten,plain,ours to run")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
    p.add_argument("--json", default="", help="also write the numbers to this JSON file")
    p.add_argument("--sweep", action="store_true", help="then ours' images/s per batch, doubling until out of memory")
    p.add_argument("--sweep-max", type=int, default=8192, help="largest batch the sweep tries")
    p.add_argument("--sync-free", action="store_true", help=f"also run ours with {SYNC_FREE}")
    p.add_argument("--cuda-graph", action="store_true", help=f"also run ours with {CUDA_GRAPH}")
    p.add_argument("--shards", nargs="?", const="make", default="",
                   help="also run ours on shards: DIR, or without a value a fixture made for the run")
    p.add_argument("--shards-workers", type=int, default=8, help="data.num_workers of the shards loop")
    p.add_argument("--adv", action="store_true", help="also run ours on the config's adversarial sibling preset")
    p.add_argument("--adv-config", default="", help="that preset (default: the config's *_msvae_adv)")
    p.add_argument("overrides", nargs="*", help="config overrides, as for trainer/run.py")
    a = p.parse_args()
    if a.adv and not a.adv_config and a.config not in ADV_PRESETS:
        p.error(f"--adv: no adversarial sibling known for --config {a.config}; name one with --adv-config")
    adv_preset = a.adv_config or (ADV_PRESETS[a.config] if a.adv else "")
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    a.steps = a.steps or (80 if cuda else 60)  # CUDA: the default run fits in 150 s
    a.interval = a.interval or (20 if cuda else 10)
    a.repeats = a.repeats or (1 if cuda else 2)
    modes = [m for m in (a.modes or ("eager,compile" if cuda else "eager")).split(",") if m]
    loops = [x for x in a.loops.split(",") if x]
    if not set(modes) <= {"eager", "compile"} or not modes:
        p.error(f"--modes: eager and/or compile, got {a.modes!r}")
    if not set(loops) <= set(LOOPS) or not loops:
        p.error(f"--loops: some of {','.join(LOOPS)}, got {a.loops!r}")
    if a.steps < 2 * a.interval:
        p.error(f"--steps {a.steps} must be at least 2 x --interval {a.interval} (the first interval is warm-up)")

    overrides = ["data.synthetic=true", f"train.channels_last={a.channels_last}", "train.ema_decay=0.999",
                 "data.synthetic_size=100000", "train.num_samples=4", "train.eval_batches=1", *a.overrides]
    if a.batch:
        overrides.append(f"train.batch_size={a.batch}")
    cfg = load_config(a.config, overrides)
    a.batch = cfg.train.batch_size
    if a.shards == "make" and cfg.model.channels != 3:
        p.error(f"--shards without a directory makes RGB shards; --config {a.config} has model.channels="
                f"{cfg.model.channels}: give --shards DIR, or the override model.channels=3")
    os.environ["ACCELERATE_MIXED_PRECISION"] = a.mixed_precision
    if cuda:
        os.environ.pop("ACCELERATE_USE_CPU", None)
        torch.backends.cudnn.benchmark = True  # fixed shapes; the trainer sets the same on CUDA
    else:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.mixed_precision)

    arch = cfg.model.architecture()
    params, flops = count(arch)
    gpu = torch.cuda.get_device_name(0) if cuda else None
    print(f"config={a.config} params={params} batch={a.batch} device={a.device}{f' ({gpu})' if gpu else ''} "
          f"precision={a.mixed_precision} channels_last={a.channels_last} modes={','.join(modes)} "
          f"compile_mode={a.compile_mode} steps={a.steps} interval={a.interval} repeats={a.repeats} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"model_gflops_per_image_fwd_bwd={flops / 1e9:.3f}")
    print(f"host_batch_ms={host_batch_ms(cfg, a.device):.2f} (one synthetic batch made on the host and copied: "
          f"plain pays it inside each step; the hand-written loop cycles {HANDWRITTEN_BATCHES} on the device)",
          flush=True)

    skipped = {}
    if "handwritten" in loops and "eager" not in modes:
        skipped["handwritten"] = "it runs in eager mode only"
    elif "handwritten" in loops and (reason := handwritten_skip_reason(arch)):
        skipped["handwritten"] = reason
    for name, why in skipped.items():
        print(f"skipping the {LABEL[name]} loop: {why}")
    if adv_preset:
        adv_cfg = load_config(adv_preset, overrides)
        if not adv_cfg.adv.stages:
            p.error(f"--adv-config {adv_preset}: that preset has no adv.stages")
        print(f"adversarial: {adv_preset}, stages {adv_cfg.adv.stages}, discriminator parameters "
              f"{sum(q.numel() for q in adv_disc_params(adv_cfg))}", flush=True)
    extra = {"ours_sync_free": a.sync_free, "ours_cuda_graph": a.cuda_graph, "ours_shards": bool(a.shards),
             "ours_adv": bool(adv_preset)}  # in this order after ours in each mode
    if "ours" in loops:
        loops += [loop for loop, on in extra.items() if on]
    graph_skip = ("ours_cuda_graph", "compile") if a.compile_mode in GRAPH_COMPILE_MODES else None
    if a.cuda_graph and "compile" in modes and graph_skip:
        print(f"skipping ours cuda-graph compile: --compile-mode {a.compile_mode} captures CUDA graphs of its own")
    plan = [(loop, mode) for mode in modes for loop in (*LOOPS, *extra)
            if loop in loops and loop not in skipped and (mode == "eager" or loop != "handwritten")
            and (loop, mode) != graph_skip and (loop != "ours_shards" or mode == modes[0])]
    # The captured loops last: a CUDA error that outlives its loop would then cost no other row.
    plan.sort(key=lambda key: key[0] == "ours_cuda_graph")

    def ours_overrides(mode: str) -> list[str]:
        compiled = mode == "compile"
        # compile_mode only when asked for, so the default run needs no trainer that knows the key
        how = [f"train.compile_mode={a.compile_mode}"] if compiled and a.compile_mode != "default" else []
        return [*overrides, f"train.compile={compiled}", *how]

    shards_tmp = tempfile.TemporaryDirectory(prefix="bench-shards-") if a.shards == "make" and "ours_shards" in loops \
        else None
    shards_dir = make_shards(shards_tmp.name, cfg, a.steps, a.interval, a.shards_workers) if shards_tmp else a.shards

    def run_one(loop: str, mode: str):
        if loop == "handwritten":
            return lambda: handwritten_loop(cfg, a.steps, a.interval, a.device, dtype)
        if loop == "plain":
            how = {"mode": a.compile_mode} if mode == "compile" else None
            return lambda: plain_loop(cfg, a.steps, a.interval, a.device, dtype, how)
        if loop == "ours_adv":
            ours_cfg = load_config(adv_preset, [*ours_overrides(mode), "adv.start=0"])
        elif loop in VARIANTS:
            ours_cfg = load_config(a.config, [*ours_overrides(mode), VARIANTS[loop]])
        elif loop == "ours_shards":
            ours_cfg = load_config(a.config, [*ours_overrides(mode), "data.synthetic=false", f"data.shards={shards_dir}",
                                              f"data.num_workers={a.shards_workers}"])
        else:
            ours_cfg = load_config(a.config, ours_overrides(mode))
        return lambda: our_loop(ours_cfg, a.steps, a.interval)

    rates = {key: [] for key in plan}
    peaks = {key: None for key in plan}
    elapsed = {key: 0.0 for key in plan}
    failed: dict[tuple[str, str], str] = {}
    for r in range(a.repeats):
        for loop, mode in plan:
            if (loop, mode) in failed:
                continue
            try:
                got, peak, secs = measure(run_one(loop, mode), a.device)
            except Exception as e:  # noqa: BLE001 - one loop's failure must not cost the others' numbers
                failed[loop, mode] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                traceback.print_exc()
                print(f"repeat {r}: {LABEL[loop]} {mode}: FAILED ({failed[loop, mode]}); going on", flush=True)
                gc.collect()
                if a.device == "cuda":
                    torch.cuda.empty_cache()
                continue
            rates[loop, mode] += got
            peaks[loop, mode] = peak if peaks[loop, mode] is None else max(peak, peaks[loop, mode])
            elapsed[loop, mode] += secs
            print(f"repeat {r}: {LABEL[loop]} {mode}: {statistics.median(got):.1f} img/s (median of {len(got)} "
                  f"intervals), peak {fmt(peak, '.2f', ' GiB')}, {secs:.1f} s", flush=True)

    if shards_tmp is not None:
        shards_tmp.cleanup()

    rows = [{"loop": loop, "mode": mode, **summary(rates[loop, mode], flops if loop != "ours_adv" else None,
                                                   a.peak_tflops, a.device),
             "peak_memory_gib": peaks[loop, mode], "elapsed_s": elapsed[loop, mode],
             "interval_rates": rates[loop, mode]} for loop, mode in plan if (loop, mode) not in failed]
    print()
    print(table(rows))
    print(flush=True)
    ips = {(r["loop"], r["mode"]): r["images_per_s"] for r in rows}
    ratio = {m: ips["ours", m] / ips["plain", m] for m in modes if ("ours", m) in ips and ("plain", m) in ips}
    adv_cost = {m: ips["ours", m] / ips["ours_adv", m] for m in modes if ("ours_adv", m) in ips}
    gain = {GAIN_KEYS[v]: {m: ips[v, m] / ips["ours", m] for m in modes if (v, m) in ips and ("ours", m) in ips}
            for v in GAIN_KEYS}

    results = {"config": a.config, "params": params, "batch": a.batch, "device": a.device, "gpu": gpu,
               "precision": a.mixed_precision, "channels_last": a.channels_last, "modes": modes,
               "compile_mode": a.compile_mode, "steps": a.steps, "interval": a.interval, "repeats": a.repeats,
               "torch": torch.__version__, "gflops_per_image": flops / 1e9, "peak_tflops": a.peak_tflops,
               "paper_images": PAPER_IMAGES, "rows": rows, "ratio": ratio, "skipped": skipped, "sweep": None,
               "adv": adv_preset or None, "adv_cost": adv_cost, **gain,
               "shards": shards_dir if a.shards else None, "shards_workers": a.shards_workers if a.shards else None,
               "failed": [{"loop": loop, "mode": mode, "error": e} for (loop, mode), e in failed.items()]}
    write_json(a.json, results)  # now, so that a sweep that fails keeps these
    if a.sweep and "ours" not in loops:
        print("skipping the sweep: it runs ours, and --loops has no ours")
    elif a.sweep:  # in ours' fastest setting
        loop, best = max(((x, m) for x in ("ours", *VARIANTS) for m in modes if (x, m) in ips), key=ips.get)
        how = [VARIANTS[loop]] if loop in VARIANTS else []
        results["sweep"] = sweep(a, [*ours_overrides(best), *how], best, flops, a.device)
        write_json(a.json, results)
    for v, key in GAIN_KEYS.items():
        for m, g in gain[key].items():
            print(f"{key}_{m}={g:.3f} (images/s of {LABEL[v]} / ours)")
    for m, cost in adv_cost.items():
        print(f"adv_cost_{m}={cost:.3f} (time per step of ours + adversarial / ours)")
    for (loop, mode), e in failed.items():
        print(f"FAILED: {LABEL[loop]} {mode}: {e}")
    last = "eager" if "eager" in ratio else next(iter(ratio), None)
    for m in ratio:
        if m != last:
            print(f"ratio_{m}={ratio[m]:.3f}")
    if last is not None:
        print(f"ratio={ratio[last]:.3f}")  # the last line, which scripts read: eager's when eager ran
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
