"""Where one optimizer step of the trainer spends its time: `advance` (one step) under torch.profiler.

    python bench/profile_step.py                                           # mnist preset, this machine
    python bench/profile_step.py --config celeba128 --batch 32 --device cuda --mixed-precision bf16
    python bench/profile_step.py --config celeba128 --batch 32 --device cuda --mixed-precision bf16 --compile
    python bench/profile_step.py --config celeba128 --batch 32 --device cuda --trace step.json   # Chrome trace
    python bench/profile_step.py --config celeba128 --batch 32 --device cuda train.sync_free=true
    python bench/profile_step.py --config celeba128 --batch 32 --device cuda train.cuda_graph=true

It builds the trainer exactly as `trainer/run.py` does (`trainer.loop.setup`, synthetic data), runs
`--warmup` steps (more than train.cuda_graph's 3 eager ones, so its profile is of replays), then profiles
`--steps` calls of `trainer.loop.advance` (one step each; with `train.sync_free=true` each reads the step
before it) and prints, per step:
- wall time, and on a GPU the time its kernels kept the GPU busy (the rest is launch and host overhead);
- host-device synchronisations (`aten::_local_scalar_dense`: `.item()`/`.tolist()`; `cudaStreamSynchronize`,
  `cudaDeviceSynchronize`; host-to-device copies) and the number of operator calls;
- the operators that take the most self time on the device and on the host.
The same for a plain forward/loss/backward/Adam step over the same model (`--no-plain` to skip it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]  # the repository, and bench/ (its train.py: the plain step)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train as bench_train  # noqa: E402
from trainer.config import load_config  # noqa: E402

SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def summarize(prof, steps: int, wall_s: float, device: torch.device, top: int, title: str) -> dict:
    events = prof.key_averages()
    counts = {e.key: e.count for e in events}
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    syncs = {k: counts.get(k, 0) / steps for k in SYNC_EVENTS if counts.get(k, 0)}
    h2d = sum(e.count for e in events if e.key in ("cudaMemcpyAsync", "cudaMemcpy")) / steps
    busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / steps \
        if device.type == "cuda" else None
    print(f"\n== {title}: {steps} steps")
    print(f"wall per step: {wall_s / steps * 1e3:.2f} ms" +
          (f"; GPU busy per step: {busy:.2f} ms ({busy / (wall_s / steps * 1e3):.0%})" if busy is not None else ""))
    print(f"aten calls per step: {calls / steps:.0f}; syncs per step: {syncs or 0}; cudaMemcpy(Async) per step: {h2d:.1f}")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=top, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    return {k: v / steps for k, v in counts.items()}


def profile_trainer(cfg, a, device) -> None:
    from trainer.loop import advance, flush, setup

    with tempfile.TemporaryDirectory() as d:
        cfg.run.dir, cfg.run.tensorboard = d, False
        s = setup(cfg)
        s.model.train()
        for _ in range(a.warmup):
            advance(s)
        bench_train.sync(device.type)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(a.steps):
                advance(s)
            bench_train.sync(device.type)
            wall = time.perf_counter() - t
        flush(s)
        counts = summarize(prof, a.steps, wall, device, a.top, "trainer.loop.advance")
        if a.trace:
            prof.export_chrome_trace(a.trace)
            print(f"trace: {a.trace}")
        s.accelerator.end_training()
    return counts


def profile_plain(cfg, a, device) -> dict:
    """The same for bench/train.py's plain step (same model, optimizer, data path and compilation)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.mixed_precision)
    step = bench_train.plain_step(cfg, device.type, dtype, {"mode": cfg.train.compile_mode} if cfg.train.compile else None)
    for _ in range(a.warmup):
        step()
    bench_train.sync(device.type)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        bench_train.sync(device.type)
        wall = time.perf_counter() - t
    return summarize(prof, a.steps, wall, device, a.top, "plain loop")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mnist")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--trace", default="", help="write the trainer step's Chrome trace here")
    p.add_argument("--no-plain", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    overrides = ["data.synthetic=true", "data.synthetic_size=100000", f"train.compile={a.compile}",
                 f"train.compile_mode={a.compile_mode}",
                 "train.ema_decay=0.999", *a.overrides]
    if a.batch:
        overrides.append(f"train.batch_size={a.batch}")
    os.environ["ACCELERATE_MIXED_PRECISION"] = a.mixed_precision
    if a.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    device = torch.device(a.device)
    print(f"config={a.config} device={a.device} precision={a.mixed_precision} compile={a.compile} "
          f"torch={torch.__version__}")
    ours = profile_trainer(load_config(a.config, overrides), a, device)
    if not a.no_plain:
        plain = profile_plain(load_config(a.config, overrides), a, device)
        diff = sorted(((ours.get(k, 0) - plain.get(k, 0), k) for k in set(ours) | set(plain)), reverse=True)
        print("\n== calls per step, trainer minus plain (the trainer's extra work):")
        for n, k in [d for d in diff if d[0] >= 0.5][:a.top]:
            print(f"  {n:+7.1f}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
