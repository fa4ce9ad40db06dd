"""Throughput of our training loop against a plain PyTorch loop: same model, data, precision and batch.

    python bench/train.py                                   # the default MNIST preset on this machine
    python bench/train.py --config celeba128 --batch 32 --steps 30 --mixed-precision bf16 --compile
    python bench/train.py --config celeba128 --batch 32 --device cuda --mixed-precision bf16 --compile --channels-last

Both loops see the same synthetic uint8 batches (`data.synthetic`), normalised on the device. The
plain loop is forward, loss, backward, Adam step; ours adds what the trainer does every step (finite
check, grad-norm, LR setting, EMA, metrics). The two alternate `--repeats` times and the medians of
per-interval images/s are compared, so machine noise hits both. The last line is `ratio=<ours/plain>`.
It also prints model FLOPs per image (counted with torch.utils.flop_counter) and, on a GPU, the
model FLOP utilisation against `--peak-tflops`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models import NStageVAE, nstage_loss  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import SyntheticStream, to_model_input  # noqa: E402


def flops_per_image(model: NStageVAE, x: torch.Tensor) -> float:
    """Forward + backward FLOPs per image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        loss, _ = nstage_loss(out, x, model.config)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def plain_loop(cfg, steps: int, interval: int, device: str, dtype) -> list[float]:
    torch.manual_seed(cfg.train.seed)
    model = NStageVAE(cfg.model.architecture()).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model = torch.compile(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    stream = SyntheticStream(cfg.train.batch_size, seed=cfg.train.seed, image_size=cfg.model.image_size,
                             channels=cfg.model.channels, size=cfg.data.synthetic_size)
    arch = cfg.model.architecture()

    def batches():
        while True:
            yield from stream

    it, rates, t = batches(), [], None
    for step in range(steps):
        if step == interval:  # the first interval is warm-up (allocator, compile)
            t = time.perf_counter()
        x = to_model_input(next(it), device, None, cfg.train.channels_last)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        loss, _ = nstage_loss(out, x, arch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if t is not None and (step + 1) % interval == 0:
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            rates.append(interval * cfg.train.batch_size / (now - t))
            t = now
    return rates


def our_loop(cfg, steps: int, interval: int) -> list[float]:
    from trainer.loop import train

    with tempfile.TemporaryDirectory() as d:
        cfg.run.dir, cfg.run.tensorboard = d, False
        cfg.train.max_steps, cfg.train.log_every = steps, interval
        cfg.train.eval_every = cfg.train.sample_every = cfg.train.ckpt_every = 10 * steps
        train(cfg)
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return rates[1:]  # drop the warm-up interval


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mnist")
    p.add_argument("--batch", type=int, default=0, help="per-device batch (default: the preset's)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    overrides = ["data.synthetic=true", f"train.compile={a.compile}", f"train.channels_last={a.channels_last}",
                 "train.ema_decay=0.999", "data.synthetic_size=100000", *a.overrides]
    if a.batch:
        overrides.append(f"train.batch_size={a.batch}")
    cfg = load_config(a.config, overrides)
    os.environ["ACCELERATE_MIXED_PRECISION"] = a.mixed_precision
    if a.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.mixed_precision)

    model = NStageVAE(cfg.model.architecture())
    x = torch.zeros(2, cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    flops = flops_per_image(model, x)
    params = sum(q.numel() for q in model.parameters())
    print(f"config={a.config} params={params} batch={cfg.train.batch_size} device={a.device} "
          f"precision={a.mixed_precision} compile={a.compile} channels_last={a.channels_last} "
          f"threads={torch.get_num_threads()}")
    print(f"model_gflops_per_image_fwd_bwd={flops / 1e9:.3f}")

    ours, plain = [], []
    for r in range(a.repeats):
        ours += our_loop(load_config(a.config, overrides), a.steps, a.interval)
        plain += plain_loop(cfg, a.steps, a.interval, a.device, dtype)
        print(f"repeat {r}: ours {statistics.median(ours):.1f} img/s, plain {statistics.median(plain):.1f} img/s",
              flush=True)
    o, q = statistics.median(ours), statistics.median(plain)
    print(f"ours_images_per_s={o:.2f} plain_images_per_s={q:.2f}")
    if a.device == "cuda":
        print(f"ours_mfu={o * flops / (a.peak_tflops * 1e12):.4f} plain_mfu={q * flops / (a.peak_tflops * 1e12):.4f} "
              f"(peak {a.peak_tflops} TFLOP/s)")
    print(f"ratio={o / q:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
