"""The training loop and the pieces it needs: LR schedule, EMA, stop flag, logging, evaluation.

Order inside one optimizer step (nanoGPT/DiT/EDM style): forward, loss, backward (per micro-batch),
finite check (reduced over ranks, together with the stop request), clip, step, EMA; then the
interval-gated log, eval, sample and checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from models import NStageVAE, nstage_loss

from . import checkpoint as ckpt_lib
from .config import Config, to_yaml
from .data import build_stream, ensure_shards, to_model_input
from .export import manifest_sha256, write_export
from .images import stage_grid

EXIT_OK = 0


# ----------------------------------------------------------------------------- small named pieces
def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float, updates: int) -> None:
    """EMA of parameters and float buffers (BN statistics); integer buffers are copied."""
    d = min(decay, (1 + updates) / (10 + updates))  # short warmup so early exports are not the init
    for k, v in model.state_dict().items():
        k = k.removeprefix("_orig_mod.")
        if v.is_floating_point():
            ema[k].lerp_(v.detach().float(), 1 - d)
        else:
            ema[k].copy_(v)


def full_params(model: torch.nn.Module, is_ds: bool):
    """Under ZeRO-3 each rank holds a slice of every parameter: gather them for the EMA (costly, but
    the EMA is what gets exported). Elsewhere a no-op."""
    if is_ds and any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def init_ema(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("_orig_mod."): v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()}


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; a `STOP` file in the run directory does the same.

    The elastic launcher behind `accelerate launch` dies at once on SIGUSR1 and gives workers 30 s
    after forwarding SIGTERM, so batch scripts reach the trainer through the STOP file; the signal
    handlers serve direct launches and the forwarded SIGTERM. Either way the ranks agree at the next
    step boundary, checkpoint and exit 0."""

    def __init__(self, run_dir: str):
        self.stop_file = os.path.join(run_dir, "STOP")
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.signal is not None or os.path.exists(self.stop_file)


def reduce_flags(flags: list[float], device) -> list[float]:
    """MAX over ranks: one small all-reduce per optimizer step carries the finite check and the stop."""
    t = torch.tensor(flags, dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def global_eps(cfg: Config, step: int, micro: int, rank: int, world: int, batch: int, device) -> torch.Tensor:
    """Reparameterisation noise as a pure function of (seed, step, micro-batch), sliced per rank:
    resume is exact without saving RNG state, and 1 process sees what 2 processes see together."""
    g = torch.Generator().manual_seed((cfg.train.seed * 1_000_003 + step) * 64 + micro + 1)
    eps = torch.randn(world * batch, cfg.model.latent_dim, generator=g)
    return eps[rank * batch:(rank + 1) * batch].to(device)


class MetricsLog:
    """metrics.jsonl (one JSON object per log step) plus TensorBoard, main process only."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path, self.enabled, self.tb = os.path.join(run_dir, "metrics.jsonl"), enabled, None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            self._truncate(resume_step)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run in a directory without checkpoints
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=(resume_step or 0) + 1)

    def _truncate(self, step: int) -> None:
        """Drop rows after the checkpoint's step, so the file reads as one run with each step once."""
        with open(self.path) as f:
            rows = [line for line in f if line.strip()]
        keep = []
        for line in rows:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                pass  # a torn last line from a killed process
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_status(run_dir: str, state: str, step: int, **extra) -> None:
    ckpt_lib.write_json(os.path.join(run_dir, "status.json"), {"state": state, "step": step, **extra})


def run_info(accelerator, cfg: Config) -> dict:
    import importlib.metadata as md

    hosts = [None] * accelerator.num_processes
    # node: SLURM's node name, which tells apart nodes that share one host (slurmd -N, the tests' cluster)
    mine = {"rank": accelerator.process_index, "host": socket.gethostname(),
            "node": os.environ.get("SLURMD_NODENAME"), "local_rank": accelerator.local_process_index}
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(hosts, mine)
    else:
        hosts = [mine]
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                           capture_output=True, text=True, timeout=10)
        sha = r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        sha = None
    versions = {}
    for pkg in ("nstage-vae", "torch", "accelerate", "webdataset", "safetensors", "deepspeed", "einops", "omegaconf"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"git_sha": sha, "versions": versions, "python": sys.version.split()[0],
            "world_size": accelerator.num_processes, "hosts": hosts,
            "distributed_type": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision,
            "global_batch": cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes,
            "argv": sys.argv}


# ----------------------------------------------------------------------------- the run
def train(cfg: Config) -> int:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # On CPU, gloo; without cpu=True so that DeepSpeed runs there too.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_USE_DEEPSPEED" in os.environ
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, kwargs_handlers=kwargs)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    is_ds = accelerator.distributed_type.name == "DEEPSPEED"
    dist_world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    assert dist_world == world, f"torch.distributed world size {dist_world} != accelerator.num_processes {world}"
    # Without ACCELERATE_USE_CPU=1, `--multi_gpu` on a CPU machine starts N processes in one process group
    # that accelerate treats as undistributed: no DDP wrapper, so gradients would never be averaged.
    assert world == 1 or accelerator.distributed_type.name != "NO", (
        f"{world} processes but accelerate set up no distributed training (gradients would not sync); "
        "on CPU launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1")
    # Every rank's stream yields exactly batch_size rows (asserted per micro-batch below), so one
    # optimizer step sees this many images: the invariant the LR and the logs rely on.
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world

    run_dir = cfg.run.dir
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    resume_path = ckpt_lib.latest_checkpoint(run_dir)
    resume_state = ckpt_lib.read_json(os.path.join(resume_path, "trainer_state.json")) if resume_path else None
    config_yaml = to_yaml(cfg)
    if accelerator.is_main_process:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
        write_status(run_dir, "running", resume_state["step"] if resume_state else 0)
        stop_file = os.path.join(run_dir, "STOP")
        if os.path.exists(stop_file):
            os.remove(stop_file)  # a stop request belongs to the previous launch
    ensure_shards(cfg, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    stop = StopRequest(run_dir)

    # --- model, optimizer
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    arch = cfg.model.architecture()
    model = NStageVAE(arch)
    if cfg.train.init_from and resume_state is None:
        from models import load_pretrained
        src = load_pretrained(cfg.train.init_from)
        if src.config.to_dict() != arch.to_dict():
            raise ValueError(f"train.init_from={cfg.train.init_from}: its architecture differs from model.*")
        model.load_state_dict(src.state_dict())
    if cfg.model.sync_bn:
        if device.type != "cuda":
            raise ValueError("model.sync_bn=true needs GPUs: torch's SyncBatchNorm refuses CPU modules; "
                             "use model.norm=group for batch-independent statistics on CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last and is_ds:
        # DeepSpeed flattens parameters into one buffer and cannot view channels_last weights.
        accelerator.print("[nstage-vae] train.channels_last is ignored under DeepSpeed")
        cfg.train.channels_last = False
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = init_ema(model) if cfg.train.ema_decay > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=lr_at(0, cfg), betas=tuple(cfg.train.betas),
                                 weight_decay=cfg.train.weight_decay)
    if cfg.train.compile:
        model = torch.compile(model)
    if is_ds:  # DeepSpeed reads the micro-batch and clipping from its config; we have no DataLoader
        ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_cfg["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        if ds_cfg.get("gradient_clipping") in (None, "auto"):
            ds_cfg["gradient_clipping"] = cfg.train.clip_grad
    model, optimizer = accelerator.prepare(model, optimizer)
    # The LR is a pure function of the optimizer-update count, set each step: no scheduler state, and
    # no accelerate scheduler wrapper (which steps num_processes times per call).
    train_stream = build_stream(cfg, cfg.data.train_split, rank, world, train=True)
    val_stream = build_stream(cfg, cfg.data.val_split, rank, world, train=False)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision) if is_ds else None

    step = updates = bad_streak = 0
    if resume_state is not None:
        saved_world = resume_state["world_size"]
        if ckpt_lib.is_deepspeed_checkpoint(resume_path) != is_ds:  # else load_state fails on a missing file
            kind = "under DeepSpeed" if not is_ds else "without DeepSpeed"
            raise RuntimeError(f"checkpoint {resume_path} was written {kind}; resume it with the accelerate "
                               f"config it was written with, or export its weights (python -m trainer.export "
                               f"{run_dir} --weights raw --out DIR) and start a new run with train.init_from=DIR")
        if is_ds and saved_world != world:  # before load_state, which fails with DeepSpeed's own error
            raise RuntimeError(f"checkpoint {resume_path} was written by {saved_world} DeepSpeed ranks; "
                               f"resume it with {saved_world} processes (ZeRO shards are per rank)")
        accelerator.load_state(resume_path)
        step, updates = resume_state["step"], resume_state["updates"]
        bad_streak = resume_state.get("bad_streak", 0)
        if ema is not None:
            ema = {k: v.to(ema[k].dtype) for k, v in ckpt_lib.load_ema(resume_path).items()}
        if saved_world == world:
            train_stream.load_state_dict(ckpt_lib.read_json(os.path.join(resume_path, f"data_rank{rank}.json")))
        else:
            # Model, optimizer and EMA are whole on every rank under DDP; the data position is
            # re-derived: the interrupted epoch's rest is skipped and the next epoch starts.
            epoch = ckpt_lib.read_json(os.path.join(resume_path, "data_rank0.json"))["epoch"]
            train_stream.epoch = epoch + 1
            accelerator.print(f"[nstage-vae] world size changed {saved_world} -> {world}: restored weights, "
                              f"optimizer and EMA; data restarts at epoch {epoch + 1}")
        accelerator.print(f"[nstage-vae] resumed from {resume_path} at step {step}")
    log = MetricsLog(run_dir, accelerator.is_main_process, cfg.run.tensorboard, step if resume_state else None)
    if accelerator.is_main_process:
        ckpt_lib.write_json(os.path.join(run_dir, "run.json"), {**run_info(accelerator, cfg), "resumed_from": resume_path})
    else:
        run_info(accelerator, cfg)  # collective: every rank sends its host
    sha = manifest_sha256(cfg.data.shards) if not cfg.data.synthetic else None

    def trainer_state() -> dict:
        return {"step": step, "updates": updates, "bad_streak": bad_streak, "world_size": world,
                "global_batch": global_batch, "config_name": cfg.run.name, "manifest_sha256": sha}

    def save() -> None:
        ckpt_lib.save_checkpoint(accelerator, run_dir, step, trainer_state=trainer_state(), ema=ema,
                                 stream_state=train_stream.state_dict(), config_yaml=config_yaml,
                                 keep=cfg.train.keep_ckpts)

    nan_step, nan_rank = (int(v) for v in cfg.train.inject_nan.split(":")) if cfg.train.inject_nan else (-1, -1)
    batches = _forever(train_stream)
    t0 = t_log = time.time()
    images_since_log, stopped_by, reason = 0, None, None
    progress = _progress(accelerator, step, cfg.train.max_steps)
    model.train()
    while step < cfg.train.max_steps:
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_at(updates, cfg)
        acc = None  # loss and terms summed over micro-batches on the device: one host sync per step
        for micro in range(cfg.train.grad_accum):
            with accelerator.accumulate(model):
                x = to_model_input(next(batches), device, compute_dtype, cfg.train.channels_last)
                assert x.shape[0] == cfg.train.batch_size, f"rank {rank} got a batch of {x.shape[0]}"
                if step + 1 >= nan_step >= 0 and rank == nan_rank:
                    x = x.clone()
                    x[0, 0, 0, 0] = float("nan")
                eps = global_eps(cfg, step, micro, rank, world, x.shape[0], device)
                with accelerator.autocast():
                    out = model(x, eps=eps)
                loss, terms = nstage_loss(out, x, arch)
                # DeepSpeed steps inside backward, so there a non-finite loss on any rank skips the
                # backward on every rank (they agree through the reduced flag).
                if is_ds and reduce_flags([float(not torch.isfinite(loss))], device)[0]:
                    loss = torch.full_like(loss, float("nan"))
                else:
                    accelerator.backward(loss)
                names = ["loss", *terms]
                vals = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
                acc = vals if acc is None else acc + vals
        terms_sum = dict(zip(names, (acc / cfg.train.grad_accum).tolist()))
        # finite check (reduced with the stop request), clip, step, EMA
        if is_ds:
            grad_norm = float("nan")
        else:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad or float("inf")).item()
        elapsed = time.time() - t0
        timed_out = cfg.train.max_time > 0 and elapsed >= cfg.train.max_time
        bad_local = not (math.isfinite(terms_sum["loss"]) and (is_ds or math.isfinite(grad_norm)))
        bad, stop_now, time_now = reduce_flags([float(bad_local), float(stop.requested()), float(timed_out)], device)
        step += 1
        if bad:
            optimizer.zero_grad(set_to_none=True)
            bad_streak += 1
            if bad_streak >= cfg.train.max_bad_steps:
                # Reduced (NaN on any rank stays NaN), so every rank names the term that broke, not the
                # NaN gradient that the all-reduce brought to the healthy ranks.
                terms_all = mean_over_ranks(terms_sum, device)
                which = [k for k, v in terms_all.items() if not math.isfinite(v)] or ["grad_norm"]
                log.write({"step": step, "skipped": True, **terms_all})
                msg = (f"aborting at step {step}: {bad_streak} non-finite steps in a row "
                       f"(train.max_bad_steps={cfg.train.max_bad_steps}); non-finite on some rank: {', '.join(which)}")
                if accelerator.is_main_process:
                    write_status(run_dir, "failed", step, reason=msg)
                raise FloatingPointError(msg)
        else:
            bad_streak = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: neither LR nor EMA advance
                updates += 1
                if ema is not None:
                    with full_params(model, is_ds):
                        ema_update(ema, accelerator.unwrap_model(model), cfg.train.ema_decay, updates)
        if is_ds:
            gn = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
            grad_norm = float(gn) if gn is not None else float("nan")
        images_since_log += global_batch
        progress.update(1)

        if step % cfg.train.log_every == 0 or bad or step == cfg.train.max_steps:
            now = time.time()
            row = {"step": step, **mean_over_ranks(terms_sum, device), "lr": lr_at(max(updates - 1, 0), cfg),
                   "grad_norm": grad_norm, "images_per_s": images_since_log / max(now - t_log, 1e-9)}
            if bad:
                row["skipped"] = True
            log.write(row)
            progress.set_postfix(loss=f"{row['loss']:.4f}")
            t_log, images_since_log = now, 0
        if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            log.write({"step": step, **evaluate(model, val_stream, cfg, accelerator, compute_dtype)})
            model.train()
        if (step % cfg.train.sample_every == 0 or step == cfg.train.max_steps) and accelerator.is_main_process:
            save_samples(ema, accelerator.unwrap_model(model), arch, cfg, run_dir, step)
        if stop_now or time_now:
            stopped_by = stop.signal or ("STOP file" if stop_now else "train.max_time")
            reason = stopped_by
            break
        if step % cfg.train.ckpt_every == 0 and step < cfg.train.max_steps:
            save()
    progress.close()

    save()
    if stopped_by is not None:
        if accelerator.is_main_process:
            if os.path.exists(stop.stop_file):
                os.remove(stop.stop_file)
            write_status(run_dir, "preempted", step, reason=reason)
        accelerator.print(f"[nstage-vae] stopped by {reason} at step {step}; checkpoint committed")
    else:
        if accelerator.is_main_process:
            final = ema if cfg.train.export_weights == "ema" else None
            state = final if final is not None else accelerator.get_state_dict(model)
            write_export(state, arch, os.path.join(run_dir, "export"), provenance={
                "step": step, "weights": cfg.train.export_weights, "run_config": _plain(cfg),
                "dataset_manifest_sha256": sha})
            write_status(run_dir, "finished", step)
        elif cfg.train.export_weights == "raw":
            accelerator.get_state_dict(model)  # collective under ZeRO-3
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return EXIT_OK


def _plain(cfg: Config) -> dict:
    import yaml
    return yaml.safe_load(to_yaml(cfg))


def _forever(stream):
    while True:
        yielded = False
        for batch in stream:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training stream yielded no batch in a whole epoch: too few samples for "
                               "train.batch_size x world size x data.num_workers")


def _progress(accelerator, start: int, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not accelerator.is_main_process, dynamic_ncols=True,
                desc="train", mininterval=2.0)


@torch.no_grad()
def evaluate(model, stream, cfg: Config, accelerator, compute_dtype) -> dict[str, float]:
    """Held-out losses with the training weights in eval mode, averaged over ranks (equal batch counts)."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    arch = cfg.model.architecture()
    stream.epoch, limit = 0, cfg.train.eval_batches or None  # the same held-out batches every time
    for i, batch in enumerate(stream):
        if limit is not None and i >= limit:
            break
        x = to_model_input(batch, accelerator.device, compute_dtype, cfg.train.channels_last)
        eps = global_eps(cfg, 10**9 + i, 0, accelerator.process_index, accelerator.num_processes, x.shape[0], x.device)
        with accelerator.autocast():
            out = model(x, eps=eps)
        loss, terms = nstage_loss(out, x, arch)
        for k, v in {"loss": loss, **terms}.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        n += 1
    means = {f"val_{k}": v / max(n, 1) for k, v in sums.items()}
    return mean_over_ranks(means, accelerator.device) if means else {}


@torch.no_grad()
def save_samples(ema, model, arch, cfg: Config, run_dir: str, step: int) -> None:
    """Per-stage sample grid from the EMA weights (fixed noise, so grids are comparable over time)."""
    net = NStageVAE(arch)
    state = ema if ema is not None else {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.eval()
    images = net.sample(cfg.train.num_samples, generator=torch.Generator().manual_seed(cfg.train.seed))
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    nrow = int(math.ceil(math.sqrt(cfg.train.num_samples)))
    stage_grid(images, nrow=nrow).save(os.path.join(run_dir, "samples", f"step-{step:07d}.png"))
