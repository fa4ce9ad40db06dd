"""The training loop: set-up, one optimizer step, the periodic work, and the two ends of a run.

    s = setup(cfg)                  # accelerator, model, optimizer, EMA, streams, counters, resume
    while s.counters.step < max_steps:
        for out in advance(s):      # micro-batches, finite check, clip, step or skip, EMA
            check_bad_streak(s, out)    # abort after too many non-finite steps
            periodic(out, progress)     # log, eval, samples, checkpoint
    finish(s, stopped_by)           # checkpoint, then export (or stop for a requeue)

Order inside one optimizer step (nanoGPT/DiT/EDM style): forward, loss, backward (per micro-batch),
finite check (reduced over ranks with the stop request and the loss terms: one all-reduce), clip, step or skip,
EMA. A skipped step changes no weight, no optimizer state and no EMA, and does not advance the learning
rate.

The skip is decided on the device: fused Adam takes it as `found_inf` (as GradScaler hands it over), the
batch-norm buffers are put back with a `where`. The host then reads the step's numbers (flags, loss
terms, grad norms) once: at once by default, or, with `train.sync_free`, one step late, while the next
step's forward and backward are queued, so that it never waits for the GPU between steps. Both modes run
the same operations in the same order (see advance()). DeepSpeed steps inside backward and decides on the
host (_deepspeed_step). With `train.cuda_graph` the step's two device-only parts (forward to skip flag,
then the masked update) are captured as CUDA graphs after a few eager steps and replayed
(trainer/step_graph.py).

Adversarial stages (`adv.stages`, from update `adv.start` on). Each iteration, in this order: the VAE's
forward; its losses, the generator terms judged by the discriminators with their weights frozen
(`requires_grad` off, called outside DDP); the discriminators' forward on real images and the VAE's images
detached; one backward of both losses; the finite check over both; the discriminators' step, then the
VAE's (disjoint parameters, both from this iteration's gradients: a simultaneous update). A skip skips
both. DeepSpeed is refused at start-up (ADV_DEEPSPEED_ERROR says why).

Mixed precision. bf16 needs nothing special. fp16 uses a GradScaler (accelerate's on GPUs; on CPU, where
accelerate has none, torch's): an overflow makes the scaler skip the update and lower its scale. That is
routine and does not count toward `train.max_bad_steps`; a non-finite loss does. Under DeepSpeed the
engine steps inside backward, so a non-finite loss on any rank skips the backward on every rank.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from models import ModelConfig, NStageVAE, nstage_loss, resize_to
from models.discriminator import (StageDiscriminators, discriminator_loss, feature_matching, generator_loss,
                                  has_discriminators, load_discriminators)

from . import checkpoint as ckpt_lib
from .config import Config, to_yaml
from .data import Prefetcher, build_stream, ensure_shards, to_model_input
from .ema import EMA, full_params
from .export import manifest_sha256, write_export
from .images import stage_grid
from .runlog import MetricsLog, run_info, write_status
from .step_graph import StepGraph

EXIT_OK = 0
ADV_DEEPSPEED_ERROR = (
    "adv.stages needs DDP: adversarial training is not supported under DeepSpeed. DeepSpeed steps inside "
    "backward (so one finite check cannot gate both models), accelerate's backward drives only the first "
    "engine, and both engines save as pytorch_model in one checkpoint. Launch without a DeepSpeed config, "
    "e.g. accelerate launch --multi_gpu --num_processes N trainer/run.py ... (DDP)")
# fp16: this many overflows in a row (the loss scale fell by 2**64) means the gradients are non-finite
# whatever the scale, not large: the run aborts as for a non-finite loss.
MAX_OVERFLOW_STREAK = 64


# ----------------------------------------------------------------------------- small named pieces
def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; a `STOP` file in the run directory does the same.

    The elastic launcher behind `accelerate launch` dies at once on SIGUSR1 and gives workers 30 s
    after forwarding SIGTERM, so batch scripts reach the trainer through the STOP file; the signal
    handlers serve direct launches and the forwarded SIGTERM. Either way the ranks agree at the next
    step boundary, checkpoint and exit 0."""

    def __init__(self, run_dir: str):
        self.stop_file = os.path.join(run_dir, "STOP")
        self.signal: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name

    def close(self) -> None:
        """Give the signals back: a process that called train() in-process (bench/train.py) must still
        die on SIGTERM after the run."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return self.signal is not None or os.path.exists(self.stop_file)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    """The mean of each value over the ranks (a collective). One process: the values, with no device trip."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(sorted(values.items()))
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def global_eps(cfg: Config, step: int, micro: int, rank: int, world: int, batch: int, device) -> torch.Tensor:
    """Reparameterisation noise as a pure function of (seed, step, micro-batch), sliced per rank:
    resume is exact without saving RNG state, and 1 process sees what 2 processes see together.
    Drawn on the device (a CUDA generator on GPUs), so no host-to-device copy sits in the step."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed((cfg.train.seed * 1_000_003 + step) * 64 + micro + 1)
    eps = torch.randn(world * batch, cfg.model.latent_dim, generator=g, device=device)
    return eps[rank * batch:(rank + 1) * batch]


def grad_norms(s: "Setup", adv: bool) -> torch.Tensor:
    """[the VAE's grad norm] or, with the discriminators on, [the VAE's, the discriminators'], each clipped
    to its own max (train.clip_grad, adv.clip_grad). Under fp16 every prepared optimizer's gradients are
    unscaled first, once (a second unscale_gradients() would raise)."""
    s.accelerator.unscale_gradients()
    groups = [(s.model, s.cfg.train.clip_grad)] + ([(s.disc, s.cfg.adv.clip_grad)] if adv else [])
    return torch.stack([_norm_and_clip(m, max_norm) for m, max_norm in groups]).float()


def _norm_and_clip(module: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm of module's parameters, clipped to max_norm when > 0. Without clipping only
    the norm is computed (no multiply of every gradient by 1.0)."""
    params = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0 or not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6 has no get_total_norm
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def forward_loss(model, x: torch.Tensor, eps: torch.Tensor, arch: ModelConfig, accelerator, loss_fn=nstage_loss):
    """The forward pass and the per-stage losses: the piece without host branches or I/O.
    Returns the loss, its named terms and the model's output (the stages' images)."""
    with accelerator.autocast():
        out = model(x, eps=eps)
    loss, terms = loss_fn(out, x, arch)
    return loss, terms, out


def adversarial_losses(s: "Setup", x: torch.Tensor, images: list[torch.Tensor], nan_d: bool = False):
    """The generator terms (discriminators frozen) and the discriminators' loss (VAE images detached).

    Returns (generator loss, discriminator loss, named terms: g_adv_<i>, fm_<i>, d_real_<i>, d_fake_<i>)."""
    a, acc = s.cfg.adv, s.accelerator
    reals = {i: resize_to(x, images[i - 1].shape[-1]) for i in s.disc_module.sizes}
    fakes = {i: images[i - 1] for i in s.disc_module.sizes}
    fm = a.feature_matching > 0
    terms: dict[str, torch.Tensor] = {}
    g_loss = torch.zeros((), device=x.device)
    # The generator's view: the discriminators' weights frozen, and the raw module (not the DDP wrapper,
    # whose reducer would wait for gradients that a frozen module never produces).
    d_params = list(s.disc_module.parameters())
    for p in d_params:
        p.requires_grad_(False)
    with acc.autocast():
        judged = s.disc_module({i: torch.cat([reals[i], fakes[i]]) if fm else fakes[i] for i in fakes})
    for p in d_params:
        p.requires_grad_(True)
    for i, (logits, feats) in judged.items():
        n = fakes[i].shape[0]
        terms[f"g_adv_{i}"] = a.weight * generator_loss(a.loss, logits[n:] if fm else logits)
        g_loss = g_loss + terms[f"g_adv_{i}"]
        if fm:
            terms[f"fm_{i}"] = a.feature_matching * feature_matching([f[:n] for f in feats], [f[n:] for f in feats])
            g_loss = g_loss + terms[f"fm_{i}"]
    # The discriminators' view: real and generated images in one batch per stage, generated ones detached.
    with acc.autocast():
        judged = s.disc({i: torch.cat([reals[i], fakes[i].detach()]) for i in fakes})
    d_loss = torch.zeros((), device=x.device)
    for i, (logits, _) in judged.items():
        n = fakes[i].shape[0]
        d_loss = d_loss + discriminator_loss(a.loss, logits[:n], logits[n:])
        terms[f"d_real_{i}"] = logits[:n].detach().float().mean()
        terms[f"d_fake_{i}"] = logits[n:].detach().float().mean()
    if nan_d:
        d_loss = d_loss * float("nan")
    terms["d_loss"] = d_loss
    return g_loss, d_loss, terms


@dataclass
class _BufferGroup:
    """The buffers of one (device, dtype), their saved copy and a scratch tensor, each flat and as views."""
    bufs: list[torch.Tensor]
    flat_views: list[torch.Tensor]  # each buffer viewed flat
    saved: torch.Tensor
    saved_views: list[torch.Tensor]  # `saved` split and shaped like the buffers
    scratch: torch.Tensor
    scratch_views: list[torch.Tensor]

    @classmethod
    def of(cls, bufs: list[torch.Tensor]) -> "_BufferGroup":
        sizes = [b.numel() for b in bufs]
        saved = torch.cat([b.detach().reshape(-1) for b in bufs])
        scratch = torch.empty_like(saved)
        views = lambda flat: [v.view(b.shape) for v, b in zip(flat.split(sizes), bufs)]  # noqa: E731
        return cls(bufs, [b.view(-1) for b in bufs], saved, views(saved), scratch, views(scratch))


class BufferBackup:
    """Batch norm updates its running statistics (and spectral norm, in the discriminators, its power
    iteration's vectors) during the forward pass, before the finite check can run: a skipped step puts
    them back (one NaN batch would otherwise poison them, and through them the EMA and every later
    evaluation, for good).

    The copies live in one flat tensor per (device, dtype): `save()` is one foreach copy each, and
    `restore_where(skip)` decides on the device (a concatenation, one `where`, one foreach copy), so a
    skip needs no host read. It relies on the buffers being updated in place (as batch norm, spectral
    norm and load_state_dict do), not replaced. (The model's own buffers stay separate tensors:
    checkpoints refuse tensors that share storage, and safetensors would not load them.)"""

    def __init__(self, *modules: torch.nn.Module):
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for b in (b for m in modules for b in m.buffers()):
            by_kind.setdefault((b.device, b.dtype), []).append(b)
        self.groups = [_BufferGroup.of(bufs) for bufs in by_kind.values()]
        self._saved_of = {id(b): v for g in self.groups for b, v in zip(g.bufs, g.saved_views)}
        self._by_name: dict[int, dict[str, torch.Tensor]] = {}

    def save(self) -> None:
        for g in self.groups:
            torch._foreach_copy_(g.saved_views, g.bufs)

    def restore(self) -> None:
        for g in self.groups:
            torch._foreach_copy_(g.bufs, g.saved_views)

    def restore_where(self, skip: torch.Tensor) -> None:
        """restore() where the 0-d bool tensor `skip` is true; nothing changes where it is false. Three ops
        per group, all into tensors made once (the buffers' views stay valid: they are updated in place)."""
        for g in self.groups:
            torch.cat(g.flat_views, out=g.scratch)
            torch.where(skip, g.saved, g.scratch, out=g.scratch)
            torch._foreach_copy_(g.bufs, g.scratch_views)

    def saved_by_name(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """{state-dict name: the saved copy} of module's floating-point buffers (the EMA reads these when it
        runs after the next forward pass has moved the live ones). Built once per module."""
        if id(module) not in self._by_name:
            self._by_name[id(module)] = {k.removeprefix("_orig_mod."): self._saved_of[id(b)]
                                         for k, b in module.named_buffers()
                                         if b.is_floating_point() and id(b) in self._saved_of}
        return self._by_name[id(module)]


# ----------------------------------------------------------------------------- set-up
@dataclass
class Counters:
    step: int = 0  # optimizer steps taken, skipped ones included
    updates: int = 0  # optimizer updates applied: what the LR schedule and the EMA warm-up follow
    bad_streak: int = 0  # consecutive non-finite steps
    overflow_streak: int = 0  # consecutive fp16 loss-scale overflows


@dataclass
class Setup:
    """Everything a run holds, built once by `setup()` in order, after `prepare` has placed the models."""
    cfg: Config
    accelerator: object
    arch: ModelConfig
    model: torch.nn.Module  # as prepared: DDP / DeepSpeed engine around (compiled) NStageVAE
    module: torch.nn.Module  # the same unwrapped, once (accelerate's unwrap_model costs ~2 ms a call)
    loss_fn: object  # models.nstage_loss, compiled with the model
    optimizer: object
    ema: EMA | None
    train_stream: object
    val_stream: object
    batches: Prefetcher  # the training stream's batches, on the device, one ahead
    log: MetricsLog
    stop: StopRequest
    run_dir: str
    config_yaml: str
    manifest_sha: str | None
    compute_dtype: torch.dtype | None  # the input dtype under DeepSpeed fp16/bf16 (elsewhere autocast)
    is_ds: bool
    global_batch: int
    buffers: BufferBackup
    counters: Counters = field(default_factory=Counters)
    t_start: float = field(default_factory=time.time)
    # Adversarial stages (adv.stages); None without them.
    disc: torch.nn.Module | None = None  # as prepared (DDP around StageDiscriminators)
    disc_module: StageDiscriminators | None = None  # the same module unwrapped: the generator's frozen view
    d_optimizer: object = None
    pending: Pending | None = None  # train.sync_free: the step queued and not yet read (see advance())
    graph: StepGraph | None = None  # train.cuda_graph: the step's parts, captured (trainer/step_graph.py)

    def adv_active(self) -> bool:
        """The generator term and the discriminators' training are on from update adv.start."""
        return self.disc is not None and self.counters.updates >= self.cfg.adv.start

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def scaler(self):
        return self.accelerator.scaler

    def trainer_state(self) -> dict:
        c = self.counters
        return {"step": c.step, "updates": c.updates, "bad_streak": c.bad_streak, "world_size": self.world,
                "global_batch": self.global_batch, "config_name": self.cfg.run.name,
                "manifest_sha256": self.manifest_sha}


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs

    # On CPU, gloo; without cpu=True so that DeepSpeed runs there too.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_USE_DEEPSPEED" in os.environ
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    if cfg.train.cuda_graph:  # PyTorch's rule for autocast inside a CUDA graph capture
        kwargs.append(AutocastKwargs(cache_enabled=False))
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, kwargs_handlers=kwargs)
    world = accelerator.num_processes
    dist_world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    assert dist_world == world, f"torch.distributed world size {dist_world} != accelerator.num_processes {world}"
    # Without ACCELERATE_USE_CPU=1, `--multi_gpu` on a CPU machine starts N processes in one process group
    # that accelerate treats as undistributed: no DDP wrapper, so gradients would never be averaged.
    assert world == 1 or accelerator.distributed_type.name != "NO", (
        f"{world} processes but accelerate set up no distributed training (gradients would not sync); "
        "on CPU launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1")
    is_ds = accelerator.distributed_type.name == "DEEPSPEED"
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu" and not is_ds:
        # accelerate makes no GradScaler (and no autocast) for fp16 on CPU, so fp16 there silently ran in
        # fp32. torch has a CPU GradScaler: use it, so CPU fp16 is fp16 and its overflow path is testable.
        accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu"), True
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
    if cfg.train.inject_overflow and accelerator.scaler is None:
        raise ValueError("train.inject_overflow needs fp16 with a GradScaler (--mixed_precision fp16, not DeepSpeed)")
    return accelerator


def prepare_run_dir(cfg: Config, accelerator) -> tuple[str | None, dict | None, str]:
    """Create run.dir, write config.yaml and status.json, clear a stale STOP file, find the checkpoint."""
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
    return resume_path, resume_state, config_yaml


def build_model(cfg: Config, arch: ModelConfig, device, fresh: bool) -> NStageVAE:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = NStageVAE(arch)
    if cfg.train.init_from and fresh:
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
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_adam(params, is_ds: bool, lr: float, betas, weight_decay: float = 0.0) -> torch.optim.Adam:
    # Fused Adam (one kernel for all parameters, on GPUs and on CPU) everywhere but DeepSpeed, which wraps
    # the optimizer in its own: the trainer's step masks it with `found_inf` to skip on the device.
    fused = {} if is_ds else {"fused": True}
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **fused)


def build_discriminators(cfg: Config, fresh: bool):
    """The adversarial stages' discriminators and their Adam (constant adv.lr), or (None, None). Never under
    DeepSpeed: setup() refuses that first (ADV_DEEPSPEED_ERROR)."""
    if not cfg.adv.stages:
        return None, None
    torch.manual_seed(cfg.train.seed + 1)  # after the VAE: its initial weights are the plain run's
    disc = StageDiscriminators(cfg.disc_config(), cfg.adv_sizes())
    src = cfg.train.init_from
    if src and fresh and has_discriminators(src):
        loaded = load_discriminators(src)
        if loaded.config != disc.config or loaded.sizes != disc.sizes:
            raise ValueError(f"train.init_from={src}: its discriminators ({loaded.config}, stages {loaded.sizes}) "
                             f"differ from adv.* ({disc.config}, stages {disc.sizes})")
        disc.load_state_dict(loaded.state_dict())
    if cfg.train.channels_last:
        disc = disc.to(memory_format=torch.channels_last)
    return disc, make_adam(disc.parameters(), False, cfg.adv.lr, cfg.adv.betas)


def patch_deepspeed_config(cfg: Config, accelerator) -> None:
    """DeepSpeed reads the micro-batch and clipping from its config (we have no DataLoader). Under its
    fp16/bf16 modes it casts parameters but leaves buffers in fp32, and batch norm then refuses bf16
    weights with fp32 running statistics: cast the buffers too (`data_types.buffer_dtype`)."""
    ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_cfg["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    if ds_cfg.get("gradient_clipping") in (None, "auto"):
        ds_cfg["gradient_clipping"] = cfg.train.clip_grad
    if accelerator.mixed_precision in ("bf16", "fp16"):
        ds_cfg.setdefault("data_types", {}).setdefault("buffer_dtype", accelerator.mixed_precision)


def setup(cfg: Config) -> Setup:
    accelerator = make_accelerator(cfg)
    is_ds = accelerator.distributed_type.name == "DEEPSPEED"
    if is_ds and cfg.adv.stages:  # before anything is written into run.dir
        raise ValueError(ADV_DEEPSPEED_ERROR)
    check_cuda_graph(cfg, accelerator, is_ds)
    resume_path, resume_state, config_yaml = prepare_run_dir(cfg, accelerator)
    stop = StopRequest(cfg.run.dir)
    if cfg.train.channels_last and is_ds:
        # DeepSpeed flattens parameters into one buffer and cannot view channels_last weights.
        accelerator.print("[nstage-vae] train.channels_last is ignored under DeepSpeed")
        cfg.train.channels_last = False
    if cfg.train.sync_free and is_ds:  # the engine steps inside backward: each step is read at once
        accelerator.print("[nstage-vae] train.sync_free is ignored under DeepSpeed")
        cfg.train.sync_free = False
    arch = cfg.model.architecture()
    model = build_model(cfg, arch, accelerator.device, fresh=resume_state is None)
    optimizer = make_adam(model.parameters(), is_ds, lr_at(0, cfg), cfg.train.betas, cfg.train.weight_decay)
    disc, d_optimizer = build_discriminators(cfg, fresh=resume_state is None)
    loss_fn = nstage_loss
    if cfg.train.compile:
        model = torch.compile(model, mode=cfg.train.compile_mode)
        loss_fn = torch.compile(nstage_loss)  # fuses the per-stage losses' elementwise kernels
    if is_ds:
        patch_deepspeed_config(cfg, accelerator)
    if disc is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:  # one call, this order: checkpoints hold the VAE as model.safetensors, the discriminators as model_1
        model, optimizer, disc, d_optimizer = accelerator.prepare(model, optimizer, disc, d_optimizer)
    module = accelerator.unwrap_model(model)
    disc_module = accelerator.unwrap_model(disc) if disc is not None else None
    ema = None
    if cfg.train.ema_decay > 0:  # after prepare: on the device, from the weights as placed
        with full_params(model, is_ds):
            ema = EMA(module, cfg.train.ema_decay, stable_tensors=not is_ds)
    # The LR is a pure function of the optimizer-update count, set each step: no scheduler state, and
    # no accelerate scheduler wrapper (which steps num_processes times per call).
    rank, world = accelerator.process_index, accelerator.num_processes
    s = Setup(
        cfg=cfg, accelerator=accelerator, arch=arch, model=model, module=module, loss_fn=loss_fn,
        optimizer=optimizer, ema=ema,
        train_stream=build_stream(cfg, cfg.data.train_split, rank, world, train=True),
        val_stream=build_stream(cfg, cfg.data.val_split, rank, world, train=False), batches=None,
        log=None, stop=stop, run_dir=cfg.run.dir, config_yaml=config_yaml,
        manifest_sha=manifest_sha256(cfg.data.shards) if not cfg.data.synthetic else None,
        compute_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision) if is_ds else None,
        is_ds=is_ds,
        # Every rank's stream yields exactly batch_size rows (asserted per micro-batch), so one optimizer
        # step sees this many images: the invariant the LR and the logs rely on.
        global_batch=cfg.train.batch_size * cfg.train.grad_accum * world,
        buffers=BufferBackup(*(m for m in (module, disc_module) if m is not None)),
        disc=disc, disc_module=disc_module, d_optimizer=d_optimizer)
    if resume_state is not None:
        resume(s, resume_path, resume_state)
    if cfg.train.cuda_graph:  # after resume: load_state_dict brings the saved param groups back
        make_capturable(s.optimizer, lr_tensor=True)
        if d_optimizer is not None:
            make_capturable(d_optimizer, lr_tensor=False)  # adv.lr is constant: the captured value stays right
        s.graph = StepGraph(accelerator.device)
    s.batches = Prefetcher(s.train_stream, accelerator.device, s.compute_dtype, cfg.train.channels_last)
    s.log = MetricsLog(s.run_dir, accelerator.is_main_process, cfg.run.tensorboard,
                       s.counters.step if resume_state else None)
    info = run_info(accelerator, cfg)  # collective: every rank sends its host
    if accelerator.is_main_process:
        ckpt_lib.write_json(os.path.join(s.run_dir, "run.json"), {**info, "resumed_from": resume_path})
    return s


def check_cuda_graph(cfg: Config, accelerator, is_ds: bool) -> None:
    """train.cuda_graph's limits, refused at start-up with what to do; on CPU it says what it does there."""
    if not cfg.train.cuda_graph:
        return
    world = accelerator.num_processes
    why = ("DeepSpeed steps inside backward" if is_ds else
           f"{world} processes: the graphs hold one process's step, not DDP's all-reduce" if world > 1 else
           "fp16's GradScaler decides its scale on the host" if accelerator.mixed_precision == "fp16" else None)
    if why:
        raise ValueError(f"train.cuda_graph=true needs one CUDA process in bf16 or fp32 without DeepSpeed ({why}); "
                         f"run without train.cuda_graph")
    if accelerator.device.type != "cuda":
        accelerator.print("[nstage-vae] train.cuda_graph: no CUDA device; the step's parts run uncaptured over "
                          "the same static buffers")


def make_capturable(optimizer, lr_tensor: bool) -> None:
    """Adam's capturable mode (its step refuses a capture without it) and, with `lr_tensor`, the LR as a
    tensor on the parameters' device: a captured step reads it there each replay, where a float would be
    frozen into the graph (_set_lr fills it)."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if lr_tensor and not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=group["params"][0].device)
        elif isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].to(group["params"][0].device)


def resume(s: Setup, path: str, state: dict) -> None:
    """Load model, optimizer, scaler and RNG (accelerate), the EMA, the counters and the data position."""
    saved_world, acc = state["world_size"], s.accelerator
    if ckpt_lib.is_deepspeed_checkpoint(path) != s.is_ds:  # else load_state fails on a missing file
        kind = "under DeepSpeed" if not s.is_ds else "without DeepSpeed"
        raise RuntimeError(f"checkpoint {path} was written {kind}; resume it with the accelerate "
                           f"config it was written with, or export its weights (python -m trainer.export "
                           f"{s.run_dir} --weights raw --out DIR) and start a new run with train.init_from=DIR")
    if s.is_ds and saved_world != s.world:  # before load_state, which fails with DeepSpeed's own error
        raise RuntimeError(f"checkpoint {path} was written by {saved_world} DeepSpeed ranks; "
                           f"resume it with {saved_world} processes (ZeRO shards are per rank)")
    if s.disc is not None and not os.path.isfile(os.path.join(path, "model_1.safetensors")):
        raise RuntimeError(f"checkpoint {path} holds no discriminators, but adv.stages={s.cfg.adv.stages}: resume "
                           f"it without adv.*, or export it (python -m trainer.export {s.run_dir} --out DIR) and "
                           f"start a new adversarial run with train.init_from=DIR")
    acc.load_state(path)
    s.counters = Counters(step=state["step"], updates=state["updates"], bad_streak=state.get("bad_streak", 0))
    ema_state = ckpt_lib.load_ema(path)
    if s.ema is not None and ema_state is not None:
        s.ema.load_state_dict(ema_state)
    if saved_world == s.world:
        s.train_stream.load_state_dict(ckpt_lib.read_json(os.path.join(path, f"data_rank{s.rank}.json")))
    else:
        # Model, optimizer and EMA are whole on every rank under DDP; the data position is
        # re-derived: the interrupted epoch's rest is skipped and the next epoch starts.
        epoch = ckpt_lib.read_json(os.path.join(path, "data_rank0.json"))["epoch"]
        s.train_stream.epoch = epoch + 1
        acc.print(f"[nstage-vae] world size changed {saved_world} -> {s.world}: restored weights, "
                  f"optimizer and EMA; data restarts at epoch {epoch + 1}")
    acc.print(f"[nstage-vae] resumed from {path} at step {s.counters.step}")


# ----------------------------------------------------------------------------- one optimizer step
@dataclass
class StepOut:
    step: int  # this step's number (1-based)
    terms: dict[str, float]  # the loss terms, mean over the micro-batches and the ranks
    grad_norm: float
    d_grad_norm: float | None  # the discriminators' (adversarial runs, once on), else None
    skipped: bool  # non-finite on some rank: nothing was updated
    overflow: bool  # fp16: the GradScaler skipped the update and lowered its scale
    stop: bool  # a stop request (signal or STOP file) on some rank
    timed_out: bool  # train.max_time reached on some rank
    loss_scale: float | None = None  # fp16: the GradScaler's scale after this step
    # The counters after this step (the trainer may already have queued the next one).
    updates: int = 0
    bad_streak: int = 0
    overflow_streak: int = 0


@dataclass
class Pending:
    """A queued step whose numbers are on their way to the host."""
    step: int
    names: list[str]  # the loss terms' names
    adv: bool  # the discriminators trained in this step
    values: torch.Tensor  # [bad, stop, timed out, *terms, *grad norms, (loss scale)]; read once `ready`
    ready: object  # a CUDA event recorded after the copy to the host; None where it is there already


def _nan_injected(cfg: Config, step: int, rank: int, target: str = "input") -> bool:
    """Test hook `train.inject_nan=STEP:RANK[:TARGET]`: from that step on, that rank's batches hold a NaN
    (TARGET `input`, the default) or its discriminators' loss is NaN (TARGET `d_loss`)."""
    if not cfg.train.inject_nan:
        return False
    nan_step, nan_rank, *rest = cfg.train.inject_nan.split(":")
    return step + 1 >= int(nan_step) and rank == int(nan_rank) and (rest[0] if rest else "input") == target


def _step_inputs(s: Setup, done: int) -> list[torch.Tensor]:
    """What the step after `done` steps reads from outside the device's work: each micro-batch's input and
    noise, then [stop requested, timed out] (reduced with the finite check). With train.cuda_graph these
    are copied into the captured step's static inputs."""
    cfg, inputs = s.cfg, []
    for micro in range(cfg.train.grad_accum):
        x = s.batches.take()
        assert x.shape[0] == cfg.train.batch_size, f"rank {s.rank} got a batch of {x.shape[0]}"
        if _nan_injected(cfg, done, s.rank):
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        inputs += [x, global_eps(cfg, done, micro, s.rank, s.world, x.shape[0], s.device)]
    timed_out = cfg.train.max_time > 0 and time.time() - s.t_start >= cfg.train.max_time
    host = torch.tensor([float(s.stop.requested()), float(timed_out)])
    if s.device.type == "cuda":
        host = host.pin_memory()
    return inputs + [host.to(s.device, non_blocking=True)]  # from pinned memory: no wait for the device


def _micro_batches(s: Setup, adv: bool, inputs: list[torch.Tensor],
                   nan_d: bool = False) -> tuple[list[str], torch.Tensor]:
    """Forward, loss and backward of each micro-batch (inputs: _step_inputs'; with the discriminators'
    when `adv`); returns the term names and their mean on the device."""
    cfg, acc = s.cfg, s.accelerator
    total, names = None, None
    models = (s.model, s.disc) if s.disc is not None else (s.model,)
    for x, eps in zip(inputs[0:-1:2], inputs[1:-1:2]):
        with acc.accumulate(*models):
            loss, terms, out = forward_loss(s.model, x, eps, s.arch, acc, s.loss_fn)
            d_loss = None
            if adv:
                g_loss, d_loss, adv_terms = adversarial_losses(s, x, out["images"], nan_d)
                loss = loss + g_loss
                terms = {**terms, **adv_terms}
            # DeepSpeed steps inside backward, so there a non-finite loss on any rank skips the
            # backward on every rank (they agree through the reduced flag).
            if s.is_ds and all_reduce_max((~torch.isfinite(loss)).float().reshape(1)).item():
                loss = torch.full_like(loss, float("nan"))
            else:
                acc.backward(loss if d_loss is None else loss + d_loss)  # one backward for both models
            names = ["loss", *terms]
            vals = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
            total = vals if total is None else total + vals
    return names, total / cfg.train.grad_accum


def _inject_overflow(s: Setup, done: int) -> float | None:
    """Test hook `train.inject_overflow=STEP`: multiply the fp16 loss scale by 2**100 for that step, so that
    its backward overflows for real. Returns the scale to restore (as a natural overflow would leave it)."""
    if s.cfg.train.inject_overflow != done + 1:
        return None
    scale = s.scaler.get_scale()
    s.scaler.update(new_scale=scale * 2.0**100)
    return scale * s.scaler.get_backoff_factor()


def _reduced(s: Setup, bad_local: torch.Tensor, flags: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """[non-finite, stop requested, timed out, *terms] over the ranks in one all-reduce (a sum): each flag is
    > 0 when it is set on some rank, and the terms become their mean over the ranks (NaN on any rank stays
    NaN), so logging needs no collective of its own. `flags`: the host's two, on the device."""
    t = torch.cat([bad_local.float().reshape(1), flags, terms])
    if s.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = torch.cat([t[:3], t[3:] / s.world])
    return t


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Start the copy of `values` to (pinned) host memory; returns it and the event that says it is there."""
    if values.device.type != "cuda":
        return values, None
    host = values.to("cpu", non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _masked_step(optimizer, skip: torch.Tensor) -> None:
    """The optimizer's step with `skip` (0-d float) as fused Adam's `found_inf`: where it is 1 the
    kernel changes no weight and no moment, and the step count is put back. Gradients already unscaled
    (fp16), so no grad_scale. Then zero_grad. This is GradScaler.step's own route for fused optimizers,
    with the skip decided by the trainer instead of the scaler alone."""
    inner = optimizer.optimizer  # accelerate's wrapper would call GradScaler.step and update()
    inner.grad_scale, inner.found_inf = None, skip
    inner.step()
    optimizer.zero_grad(set_to_none=True)


def _queue_step(s: Setup, prev: Pending | None) -> tuple[StepOut | None, Pending]:
    """Queue one optimizer step (DDP or one process) with every decision on the device; the host reads
    nothing from it. `prev`, the step queued before and not yet read, is read once this step's forward
    and backward are queued (the device has finished it by then) and returned, its counters applied.

    Order: the inputs (batches, noise, the host's flags); the forward_backward part (buffers saved;
    micro-batches: forward, loss, backward; the finite check and the stop flags, one all-reduce; the grad
    norms, clipped, unscaled under fp16); the previous step read, which sets the LR; the update part (both
    models' fused Adam masked by `skip`, a non-finite loss on any rank or an fp16 overflow: the norms are
    of the reduced gradients, so every rank decides alike; buffers put back where skipped); the
    GradScaler's update (it backs off after an overflow); this step's numbers sent to the host. The two
    parts take tensors and give tensors, with no host read: train.cuda_graph captures and replays them."""
    c = s.counters
    done = c.step + (prev is not None)
    restore_scale = _inject_overflow(s, done)
    adv = s.adv_active()  # exact: advance() reads a pending step first while the discriminators are off
    inputs = _step_inputs(s, done)
    nan_d = _nan_injected(s.cfg, done, s.rank, "d_loss")  # refused with train.cuda_graph (config.py)
    if s.graph is not None:
        s.graph.begin(adv)  # whether the discriminators train: the one thing that changes the captured step
    (reduced, norms, skip), names = _part(s, "forward_backward", lambda i: _forward_backward(s, adv, i, nan_d),
                                          inputs)
    s.batches.fetch()  # the next input, while the device works
    prev_out = _resolve(s, prev, ema_from_backup=True) if prev is not None else None
    _set_lr(s)  # of the count that reading `prev` completed
    _part(s, "update", lambda i: _update(s, adv, i[0]), [skip])
    if s.graph is not None:
        if s.graph.phase == "capture":
            s.accelerator.print(f"[nstage-vae] train.cuda_graph: step {done + 1} captured"
                                f"{' with the discriminators' if adv else ''}; the steps after it replay it")
        s.graph.end()
    scale = []
    if s.scaler is not None:
        s.scaler.update()  # from the found-inf records of the unscale: backs off after an overflow
        if restore_scale is not None:
            s.scaler.update(new_scale=restore_scale)
        scale = [s.scaler._scale.float().reshape(1).to(s.device)]  # read with the rest, not with get_scale()
    values, ready = _to_host(torch.cat([reduced, norms, *scale]))
    return prev_out, Pending(done + 1, names, adv, values, ready)


def _forward_backward(s: Setup, adv: bool, inputs: list[torch.Tensor], nan_d: bool = False):
    """The step's first device-only part: buffers saved, micro-batches, the finite check with the host's
    flags (one all-reduce), the grad norms (clipped), the skip flag. Returns ((reduced, norms, skip), names)."""
    s.buffers.save()
    names, terms = _micro_batches(s, adv, inputs, nan_d)
    bad_local = ~torch.isfinite(terms[0])  # the loss; with the discriminators on, theirs too
    if adv:
        bad_local = bad_local | ~torch.isfinite(terms[names.index("d_loss")])
    norms = grad_norms(s, adv)  # under fp16 of the unscaled gradients: an overflow shows as a non-finite norm
    if s.scaler is None:
        bad_local = bad_local | ~torch.isfinite(norms).all()
    reduced = _reduced(s, bad_local, inputs[-1], terms)
    skip = (reduced[0] > 0) | ~torch.isfinite(norms).all()  # 0-d, as GradScaler's found_inf
    return (reduced, norms, skip), names


def _update(s: Setup, adv: bool, skip: torch.Tensor):
    """The step's second device-only part: both models' fused Adam masked by `skip`, the buffers put back
    where skipped."""
    found_inf = skip.float()
    if adv:
        _masked_step(s.d_optimizer, found_inf)
    _masked_step(s.optimizer, found_inf)
    s.buffers.restore_where(skip)
    return (), None


def _part(s: Setup, name: str, fn, inputs: list[torch.Tensor]):
    """Run one device-only part of the step: captured and replayed with train.cuda_graph, else directly."""
    return s.graph.run(name, fn, inputs) if s.graph is not None else fn(inputs)


def _resolve(s: Setup, p: Pending, ema_from_backup: bool) -> StepOut:
    """Read a queued step's numbers (waiting for that step only), count it, and update the EMA if it was
    applied. `ema_from_backup`: the next step's forward has run since, so the EMA reads the batch-norm
    statistics from the backup that step saved, which are this step's."""
    if p.ready is not None:
        p.ready.synchronize()
    got = p.values.tolist()
    k, n = 3 + len(p.names), 2 if p.adv else 1
    norms = got[k:k + n]
    bad = bool(got[0])
    out = StepOut(step=p.step, terms=dict(zip(p.names, got[3:k])), grad_norm=norms[0],
                  d_grad_norm=norms[1] if p.adv else None, skipped=bad,
                  # Under a GradScaler a non-finite norm with a finite loss is an overflow, not a bad step.
                  overflow=not bad and s.scaler is not None and not all(math.isfinite(v) for v in norms),
                  stop=bool(got[1]), timed_out=bool(got[2]),
                  loss_scale=got[k + n] if s.scaler is not None else None)
    _account(s, out, s.buffers.saved_by_name(s.module) if ema_from_backup else None)
    return out


def _account(s: Setup, out: StepOut, ema_replace: dict[str, torch.Tensor] | None = None) -> None:
    """Apply a read step's outcome: the counters (copied into `out`), and the EMA when it was applied
    (`ema_replace`: see EMA.update)."""
    c = s.counters
    c.step = out.step
    applied = not (out.skipped or out.overflow)
    if applied:  # the LR schedule and the EMA warm-up follow this count
        c.updates += 1
    c.bad_streak = c.bad_streak + 1 if out.skipped else 0  # an overflow is not a bad step
    c.overflow_streak = c.overflow_streak + 1 if out.overflow else 0
    out.updates, out.bad_streak, out.overflow_streak = c.updates, c.bad_streak, c.overflow_streak
    if applied and s.ema is not None:
        with full_params(s.model, s.is_ds):  # ZeRO-3 gathers the parameters; elsewhere a no-op
            s.ema.update(s.module, c.updates, ema_replace)


def _set_lr(s: Setup) -> None:
    """The VAE's learning rate for the next update: a pure function of the applied-update count. Rounded to
    float32, the precision in which CUDA's fused Adam reads an LR tensor, so that train.cuda_graph's LR
    tensor and the float of an uncaptured step are the same number."""
    lr = float(np.float32(lr_at(s.counters.updates, s.cfg)))
    for group in s.optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # train.cuda_graph: the captured optimizer step reads it from this tensor
        else:
            group["lr"] = lr


def _deepspeed_step(s: Setup) -> StepOut:
    """One optimizer step under DeepSpeed, decided on the host: the engine steps inside backward, so a
    non-finite loss on any rank has already skipped the backward on every rank (see _micro_batches), and
    the engine's own loss scaler reports an fp16 overflow only after its step."""
    acc, c = s.accelerator, s.counters
    _set_lr(s)
    inputs = _step_inputs(s, c.step)
    s.buffers.save()
    names, terms = _micro_batches(s, False, inputs)
    s.batches.fetch()
    got = _reduced(s, ~torch.isfinite(terms[0]), inputs[-1], terms).tolist()  # the one host sync
    bad = bool(got[0])
    if not bad:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    overflow = not bad and bool(acc.optimizer_step_was_skipped)
    if bad or overflow:
        s.buffers.restore()
    gn = s.model.get_global_grad_norm() if hasattr(s.model, "get_global_grad_norm") else None
    out = StepOut(step=c.step + 1, terms=dict(zip(names, got[3:])), grad_norm=float(gn) if gn is not None else math.nan,
                  d_grad_norm=None, skipped=bad, overflow=overflow, stop=bool(got[1]), timed_out=bool(got[2]))
    _account(s, out)
    return out


def train_step(s: Setup) -> StepOut:
    """One optimizer step, queued and read: micro-batches, finite check and stop flags (one all-reduce),
    clip, step or skip, EMA. A skipped step changes no weight, no optimizer state and no EMA, and does not
    advance the learning rate. One host read per step."""
    if s.is_ds:
        return _deepspeed_step(s)
    _, p = _queue_step(s, None)
    return _resolve(s, p, ema_from_backup=False)


def _work_due(t, step: int) -> tuple[bool, bool, bool]:
    """(evaluation, samples, checkpoint) due after `step` by their intervals (t: the train config); the
    last step's evaluation, samples and final checkpoint come on top (Periodic, finish)."""
    return step % t.eval_every == 0, step % t.sample_every == 0, step % t.ckpt_every == 0


def advance(s: Setup) -> list[StepOut]:
    """The next optimizer step; returns the steps read during the call, in order.

    By default that is the step itself (train_step). With train.sync_free the host reads each step's
    numbers one step late: step k is left queued, and is read while step k+1's forward and backward are
    queued, so the host never waits for the device between steps (k's numbers are there by then). The
    weights, the optimizer, the buffers and the EMA go through the same operations either way (the
    tests hold the two modes bitwise equal). Read at once: a step due for evaluation, samples or a
    checkpoint; the steps before adv.start (whether the discriminators train depends on the last count).
    Under DeepSpeed every step is read at once."""
    if s.is_ds or not s.cfg.train.sync_free:
        return [train_step(s)]
    outs = []
    if s.pending is not None and s.disc is not None and not s.adv_active():
        outs += flush(s)
    prev_out, p = _queue_step(s, s.pending)
    s.pending = None
    outs += [prev_out] if prev_out is not None else []
    if p.step >= s.cfg.train.max_steps or any(_work_due(s.cfg.train, p.step)):  # it needs this step's weights
        outs.append(_resolve(s, p, ema_from_backup=False))
    else:
        s.pending = p
    return outs


def flush(s: Setup) -> list[StepOut]:
    """Read the step left queued by advance(), if any."""
    p, s.pending = s.pending, None
    return [_resolve(s, p, ema_from_backup=False)] if p is not None else []


# ----------------------------------------------------------------------------- the periodic work
def check_bad_streak(s: Setup, out: StepOut) -> None:
    """Abort after train.max_bad_steps non-finite steps in a row (or an endless fp16 overflow)."""
    cfg = s.cfg
    if out.bad_streak < cfg.train.max_bad_steps and out.overflow_streak < MAX_OVERFLOW_STREAK:
        return
    # The terms are means over the ranks (NaN on any rank stays NaN), so every rank names the term that
    # broke, not the NaN gradient that the all-reduce brought to the healthy ranks.
    which = sorted(k for k, v in out.terms.items() if not math.isfinite(v)) or ["grad_norm"]
    s.log.write({"step": out.step, "skipped": True, **out.terms})
    if out.overflow_streak >= MAX_OVERFLOW_STREAK:
        msg = (f"aborting at step {out.step}: {out.overflow_streak} fp16 overflows in a row; the gradients are "
               f"non-finite at any loss scale (try bf16, a lower train.lr or train.clip_grad)")
    else:
        msg = (f"aborting at step {out.step}: {out.bad_streak} non-finite steps in a row "
               f"(train.max_bad_steps={cfg.train.max_bad_steps}); non-finite on some rank: {', '.join(which)}")
    if s.accelerator.is_main_process:
        write_status(s.run_dir, "failed", out.step, reason=msg)
    raise FloatingPointError(msg)


class Periodic:
    """The interval-gated work after a step: log, eval, samples, checkpoint."""

    def __init__(self, s: Setup):
        self.s, self.t_log, self.images = s, time.time(), 0

    def log(self, out: StepOut) -> dict:
        s, step = self.s, out.step
        now = time.time()
        lr = lr_at(max(out.updates - 1, 0), s.cfg)  # of the last applied update: skips do not advance it
        row = {"step": step, **dict(sorted(out.terms.items())), "lr": lr, "grad_norm": out.grad_norm,
               "images_per_s": self.images / max(now - self.t_log, 1e-9)}
        if out.d_grad_norm is not None:
            row["d_grad_norm"] = out.d_grad_norm
        if out.loss_scale is not None:
            row["loss_scale"] = out.loss_scale
        if out.skipped:
            row["skipped"] = True
        if out.overflow:
            row["overflow"] = True
        s.log.write(row)
        self.t_log, self.images = now, 0
        return row

    def __call__(self, out: StepOut, progress) -> None:
        """Evaluation, samples and checkpoints come only on steps that advance() read at once (so the
        weights are this step's); logging may come a step late."""
        s, t = self.s, self.s.cfg.train
        step, last = out.step, out.step == t.max_steps
        self.images += s.global_batch
        progress.update(1)
        if step % t.log_every == 0 or out.skipped or out.overflow or last:
            progress.set_postfix(loss=f"{self.log(out)['loss']:.4f}")
        if last:
            progress.close()
            s.accelerator.print(f"[nstage-vae] step {step}: last step; evaluating, sampling, then checkpoint and export")
        eval_due, samples_due, ckpt_due = _work_due(t, step)  # advance() reads these steps at once
        if eval_due or last:
            s.log.write({"step": step, **evaluate(s.model, s.val_stream, s.cfg, s.accelerator, s.compute_dtype)})
            s.model.train()
        if (samples_due or last) and s.accelerator.is_main_process:
            save_samples(s.ema, s.module, s.arch, s.cfg, s.run_dir, step)
        if ckpt_due and not last and not (out.stop or out.timed_out):
            save(s)


def save(s: Setup) -> None:
    t0 = time.time()
    ckpt_lib.save_checkpoint(s.accelerator, s.run_dir, s.counters.step, trainer_state=s.trainer_state(),
                             ema=s.ema.state_dict() if s.ema is not None else None,
                             stream_state=s.batches.state_dict(), config_yaml=s.config_yaml,
                             keep=s.cfg.train.keep_ckpts)
    s.accelerator.print(f"[nstage-vae] checkpoint step-{s.counters.step:07d} committed in {time.time() - t0:.1f} s")


# ----------------------------------------------------------------------------- the run
def train(cfg: Config) -> int:
    s = setup(cfg)
    c, t = s.counters, cfg.train
    periodic = Periodic(s)
    progress = _progress(s.accelerator, c.step, t.max_steps)
    stopped_by = None
    s.model.train()
    s.t_start = time.time()  # train.max_time counts from here
    try:
        while c.step < t.max_steps and stopped_by is None:
            outs = advance(s)
            if any(o.stop or o.timed_out for o in outs):
                outs += flush(s)  # the step queued after the request: the checkpoint comes after it
            for out in outs:
                check_bad_streak(s, out)
                periodic(out, progress)
                if (out.stop or out.timed_out) and stopped_by is None:
                    stopped_by = s.stop.signal or ("STOP file" if out.stop else "train.max_time")
        progress.close()
        finish(s, stopped_by)
    finally:
        s.stop.close()
    return EXIT_OK


def finish(s: Setup, stopped_by: str | None) -> None:
    """Checkpoint; then either record the stop (for a requeue) or export, and say what comes next."""
    acc, step = s.accelerator, s.counters.step
    acc.print(f"[nstage-vae] step {step}: writing the final checkpoint")
    save(s)
    if stopped_by is not None:
        if acc.is_main_process:
            if os.path.exists(s.stop.stop_file):
                os.remove(s.stop.stop_file)
            write_status(s.run_dir, "preempted", step, reason=stopped_by)
        acc.print(f"[nstage-vae] stopped by {stopped_by} at step {step}; checkpoint committed; "
                  f"run the same command again to resume")
    else:
        export_dir = export(s)
        if acc.is_main_process:
            write_status(s.run_dir, "finished", step)
            _say_next(s, export_dir)
    s.log.close()
    acc.wait_for_everyone()
    acc.end_training()


def export(s: Setup) -> str:
    cfg, acc = s.cfg, s.accelerator
    out_dir = os.path.join(s.run_dir, "export")
    if cfg.train.export_weights == "raw" or s.ema is None:
        state = acc.get_state_dict(s.model)  # collective under ZeRO-3
    else:
        state = s.ema.state_dict()
    if acc.is_main_process:
        write_export(state, s.arch, out_dir, provenance={
            "step": s.counters.step, "weights": cfg.train.export_weights, "run_config": _plain(cfg),
            "dataset_manifest_sha256": s.manifest_sha})
    return out_dir


def _say_next(s: Setup, export_dir: str) -> None:
    shards = "" if s.cfg.data.synthetic else f" --shards {s.cfg.data.shards} --split {s.cfg.data.val_split}"
    print(f"[nstage-vae] finished at step {s.counters.step}; weights exported to {export_dir}\n"
          f"  samples:    python -m trainer.sample {export_dir} --n 64 --out samples.png\n"
          f"  evaluation: python -m trainer.evaluate {export_dir}{shards or ' --shards DIR --split test'}", flush=True)


def _plain(cfg: Config) -> dict:
    import yaml
    return yaml.safe_load(to_yaml(cfg))


def _progress(accelerator, start: int, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not accelerator.is_main_process, dynamic_ncols=True,
                desc="train", mininterval=2.0)


def _eager():
    """Evaluation runs the compiled model eagerly: eval mode would otherwise compile a second graph."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, stream, cfg: Config, accelerator, compute_dtype) -> dict[str, float]:
    """Held-out losses with the training weights in eval mode, averaged over ranks (equal batch counts)."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    arch = cfg.model.architecture()
    stream.epoch, limit = 0, cfg.train.eval_batches or None  # the same held-out batches every time
    with _eager():
        for i, batch in enumerate(stream):
            if limit is not None and i >= limit:
                break
            x = to_model_input(batch, accelerator.device, compute_dtype, cfg.train.channels_last)
            eps = global_eps(cfg, 10**9 + i, 0, accelerator.process_index, accelerator.num_processes, x.shape[0],
                             x.device)
            loss, terms, _ = forward_loss(model, x, eps, arch, accelerator)
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += 1
    means = {f"val_{k}": v / max(n, 1) for k, v in sums.items()}
    return mean_over_ranks(means, accelerator.device) if means else {}


@torch.no_grad()
def save_samples(ema: EMA | None, model, arch, cfg: Config, run_dir: str, step: int) -> None:
    """Per-stage sample grid from the EMA weights, on the training device. The noise is drawn on the CPU
    from a fixed seed, so grids are comparable over time and across devices."""
    device = next(model.parameters()).device
    net = NStageVAE(arch).to(device)
    state = ema.tensors() if ema is not None else {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.eval()
    z = torch.randn(cfg.train.num_samples, arch.latent_dim, generator=torch.Generator().manual_seed(cfg.train.seed))
    images = [im.float().cpu() for im in net.decode(z.to(device))]
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    nrow = int(math.ceil(math.sqrt(cfg.train.num_samples)))
    stage_grid(images, nrow=nrow).save(os.path.join(run_dir, "samples", f"step-{step:07d}.png"))
