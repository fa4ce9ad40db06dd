"""The training config: one typed tree (`model`, `data`, `train`, `run`) over OmegaConf structured configs.

Resolution order: the dataclass defaults, then the model preset named by `model.preset` (from
`models.MODEL_PRESETS`), then the preset file (`trainer/configs/<name>.yaml` or a path), then the
command line's dotted `key=value` overrides. Values are parsed as YAML (`model.encoder.channels=[8,16]`),
list items are reached by index (`model.stages.1.loss=l2`). An unknown key fails with the valid keys
of its section; a bad value fails at start-up with the field's name.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models import MODEL_PRESETS, ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_CONFIG = "mnist"
DEFAULT_SHARDS = "data/mnist28"
# torch.compile modes that capture CUDA graphs of their own: they cannot go inside train.cuda_graph's capture.
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class ModelSection(ModelConfig):
    """The architecture schema from `models` plus the two keys that are not architecture."""
    preset: str = "mnist_msvae"  # a key of models.MODEL_PRESETS: the base the other model keys override
    sync_bn: bool = False  # SyncBatchNorm across ranks (GPU only: torch refuses it on CPU modules)

    def architecture(self) -> ModelConfig:
        d = dataclasses.asdict(self)
        d.pop("preset"), d.pop("sync_bn")
        return ModelConfig.from_dict(d)


@dataclass
class DataConfig:
    shards: str = DEFAULT_SHARDS  # directory (or URL prefix) holding manifest.json and the tar shards
    train_split: str = "train"
    val_split: str = "test"
    synthetic: bool = False  # deterministic synthetic stream: rank r takes its slice of one global batch
    synthetic_size: int = 4096  # samples per synthetic "epoch"
    auto_build: str = ""  # "mnist": build the shards from the packaged MNIST when manifest.json is missing
    # The one path auto_build builds at, so that a mistyped data.shards fails instead of building there.
    # load_config sets it to the preset's own data.shards; setting it on the command line opts another path in.
    auto_build_at: str = DEFAULT_SHARDS
    num_workers: int = 2
    shuffle_buffer: int = 2000
    tolerant: bool = False  # skip (count and log) corrupt samples instead of failing, up to max_errors
    max_errors: int = 10


@dataclass
class TrainConfig:
    max_steps: int = 2000  # optimizer steps
    max_time: float = 0.0  # wall-clock seconds after which the run checkpoints and stops (0: no limit)
    batch_size: int = 64  # per device, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # official code: beta1 = 0.5
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warmup, then cosine decay to lr * min_lr_ratio at max_steps
    min_lr_ratio: float = 0.1
    clip_grad: float = 0.0  # max global grad norm (0: report the norm, never clip)
    ema_decay: float = 0.999  # 0 disables the EMA (the export then uses the raw weights)
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20  # held-out batches per rank per evaluation (0: the whole split)
    ckpt_every: int = 500
    keep_ckpts: int = 2
    sample_every: int = 500
    num_samples: int = 64  # images per sample grid
    seed: int = 0
    compile: bool = False  # torch.compile the model's forward and, separately, the per-stage losses
    # torch.compile's mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    channels_last: bool = True
    # The host reads each step's numbers one step late (skips are decided on the device either way), so it
    # never waits for the GPU between steps; logs and stop requests then take effect a step later. Not
    # under DeepSpeed. See trainer/loop.py advance().
    sync_free: bool = False
    # Capture the step's two device-only parts (forward, losses, backward, finite check, clip; then the
    # masked optimizer steps) as CUDA graphs after a few eager steps, and replay them: no kernel launches
    # from Python. One CUDA process, bf16 or fp32, not DeepSpeed. On CPU the parts run uncaptured over the
    # same static buffers. See trainer/step_graph.py.
    cuda_graph: bool = False
    init_from: str = ""  # an export directory to start from (fine-tuning); ignored when resuming
    max_bad_steps: int = 5  # abort after this many consecutive non-finite steps
    export_weights: str = "ema"  # ema | raw: what the end-of-run export holds
    # Test hook: "STEP:RANK" puts a NaN into that rank's batch from that step on; "STEP:RANK:d_loss" makes
    # that rank's discriminator loss NaN instead (adversarial runs).
    inject_nan: str = ""
    # Test hook: at this step (1-based) the fp16 loss scale is multiplied by 2**100, so the backward
    # overflows for real and the GradScaler skips the update. 0: off. Needs fp16 without DeepSpeed.
    inject_overflow: int = 0


@dataclass
class AdvConfig:
    """Adversarial refiner stages: training settings, not architecture (the export's config.json never
    holds them, so an msvae export starts an adversarial run and an adversarial export loads as msvae).
    See models/discriminator.py for the discriminator's form and trainer/loop.py for the step order."""
    stages: list[int] = field(default_factory=list)  # 1-based refiner stages with a discriminator, e.g. [2]; []: off
    weight: float = 0.01  # weight of each listed stage's generator term, g_adv_<i>
    loss: str = "hinge"  # hinge | nonsat (non-saturating logistic)
    feature_matching: float = 0.0  # weight of the l1 feature-matching term on the discriminator's features
    # The optimizer update (0-based count of applied updates) from which the generator term and the
    # discriminator's training are on; before it the run is exactly the plain model's (no warm-up of D).
    start: int = 0
    lr: float = 2.0e-4  # the discriminators' Adam, constant
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    clip_grad: float = 0.0  # max grad norm of the discriminators (0: report, never clip)
    width: int = 64  # PatchGAN width
    num_layers: int = 3  # PatchGAN stride-2 convs
    spectral_norm: bool = True


@dataclass
class RunConfig:
    dir: str = ""  # default: runs/<config name>; running the same command again resumes it
    name: str = ""  # the config name (set from --config)
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        t = self.train
        positive = ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every", "ckpt_every",
                    "keep_ckpts", "sample_every", "max_bad_steps")
        for name in positive:
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name}: must be >= 1, got {getattr(t, name)}")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            raise ValueError(f"train.lr: must be a positive number, got {t.lr}")
        if not 0 <= t.ema_decay < 1:
            raise ValueError(f"train.ema_decay: must be in [0, 1), got {t.ema_decay}")
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if t.compile_mode not in modes:
            raise ValueError(f"train.compile_mode: must be one of {', '.join(modes)}, got {t.compile_mode!r}")
        if t.cuda_graph and t.compile and t.compile_mode in GRAPH_COMPILE_MODES:
            raise ValueError(f"train.cuda_graph: train.compile_mode={t.compile_mode} captures CUDA graphs of its own; "
                             f"use compile_mode=default or max-autotune-no-cudagraphs with train.cuda_graph")
        if t.cuda_graph and t.inject_nan.endswith(":d_loss"):
            raise ValueError("train.inject_nan=STEP:RANK:d_loss is decided in Python inside the captured step; "
                             "with train.cuda_graph inject into the input (STEP:RANK)")
        if t.export_weights not in ("ema", "raw"):
            raise ValueError(f"train.export_weights: must be 'ema' or 'raw', got {t.export_weights!r}")
        if t.export_weights == "ema" and t.ema_decay == 0:
            raise ValueError("train.export_weights=ema needs train.ema_decay > 0; set export_weights=raw")
        if len(t.betas) != 2:
            raise ValueError(f"train.betas: need two values, got {t.betas}")
        if self.data.auto_build not in ("", "mnist"):
            raise ValueError(f"data.auto_build: must be '' or 'mnist', got {self.data.auto_build!r}")
        if self.model.preset not in MODEL_PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.model.preset!r}; "
                             f"allowed: {', '.join(MODEL_PRESETS)}")
        self.model.architecture().validate()
        self._validate_adv()
        return self

    def _validate_adv(self) -> None:
        a, arch = self.adv, self.model.architecture()
        if not a.stages:
            return
        from models.discriminator import ADV_LOSSES
        for i in a.stages:
            if not 2 <= i <= arch.num_stages:
                raise ValueError(f"adv.stages: {i} is not a refiner stage; refiners are stages 2..{arch.num_stages} "
                                 f"(1-based; stage 1 is the VAE's decoder)")
        if len(set(a.stages)) != len(a.stages):
            raise ValueError(f"adv.stages: each stage once, got {a.stages}")
        if a.loss not in ADV_LOSSES:
            raise ValueError(f"adv.loss: must be one of {', '.join(ADV_LOSSES)}, got {a.loss!r}")
        if a.weight < 0 or a.feature_matching < 0 or a.start < 0 or a.clip_grad < 0:
            raise ValueError("adv.weight, adv.feature_matching, adv.start and adv.clip_grad must be >= 0")
        if not (a.lr > 0 and math.isfinite(a.lr)) or len(a.betas) != 2:
            raise ValueError(f"adv.lr must be a positive number and adv.betas two values, got {a.lr}, {a.betas}")
        sizes = arch.stage_sizes()
        for i in a.stages:
            self.disc_config().validate(sizes[i - 1], where=f"adv (stage {i}, {sizes[i - 1]} px)")

    def disc_config(self):
        from models.discriminator import DiscriminatorConfig
        return DiscriminatorConfig(channels=self.model.channels, width=self.adv.width,
                                   num_layers=self.adv.num_layers, spectral_norm=self.adv.spectral_norm)

    def adv_sizes(self) -> dict[int, int]:
        """{stage: resolution} of the adversarial stages."""
        sizes = self.model.architecture().stage_sizes()
        return {i: sizes[i - 1] for i in sorted(self.adv.stages)}


def _find_config(name_or_path: str) -> tuple[str, str]:
    if os.path.isfile(name_or_path):
        return name_or_path, os.path.splitext(os.path.basename(name_or_path))[0]
    path = os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        presets = sorted(os.path.splitext(f)[0] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
        raise FileNotFoundError(f"--config {name_or_path!r} is neither a file nor a preset; presets: {', '.join(presets)}")
    return path, name_or_path


def _section_keys(node, prefix: str) -> list[str]:
    keys = []
    for k in node.keys():
        keys.append(f"{prefix}.{k}" if prefix else str(k))
    return keys


def _check_key(cfg, dotted: str) -> None:
    """Reject an unknown key, listing the valid keys of the deepest section that exists."""
    parts = dotted.split(".")
    node, prefix = cfg, ""
    for part in parts[:-1]:
        try:
            child = node[int(part)] if OmegaConf.is_list(node) else node[part]
        except (KeyError, IndexError, ValueError, OmegaConfBaseException):
            break
        if not OmegaConf.is_config(child):
            break
        node, prefix = child, f"{prefix}.{part}" if prefix else part
    else:
        last = parts[-1]
        if OmegaConf.is_list(node):
            if last.isdigit() and int(last) < len(node):
                return
            raise KeyError(f"unknown config key {dotted!r}: {prefix} has {len(node)} items (indices 0..{len(node) - 1})")
        if last in node:
            return
    valid = ", ".join(_section_keys(node, prefix)) if not OmegaConf.is_list(node) else f"{prefix}.0..{len(node) - 1}"
    raise KeyError(f"unknown config key {dotted!r}; valid keys under {prefix or 'the top level'}: {valid}")


def _apply(cfg, items: list[tuple[str, object]], origin: str) -> None:
    for key, value in items:
        _check_key(cfg, key)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise ValueError(f"{origin}: bad value for {key}: {str(e).splitlines()[0]}") from None


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out += _flatten(v, key)
        else:
            out.append((key, v))
    return out


_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$")


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    items = []
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not of the form key=value (e.g. train.max_steps=200)")
        key, raw = o.split("=", 1)
        # YAML 1.1 reads 3:1 as the base-60 integer 181: keep such values as text (train.inject_nan=STEP:RANK).
        value = raw if raw == "" or _SEXAGESIMAL.match(raw) else yaml.safe_load(raw)
        items.append((key.strip(), value))
    return items


def load_config(config: str = DEFAULT_CONFIG, overrides: list[str] | None = None) -> Config:
    """Build the validated `Config` from a preset name or YAML path plus dotted overrides."""
    path, name = _find_config(config)
    with open(path) as f:
        file_items = _flatten(yaml.safe_load(f) or {})
    cli_items = parse_overrides(overrides or [])
    # model.preset decides the base the other model keys override, so it is resolved first.
    preset = dict(file_items + cli_items).get("model.preset", ModelSection.preset)
    if preset not in MODEL_PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; allowed: {', '.join(MODEL_PRESETS)}")
    arch = MODEL_PRESETS[preset]()
    base = Config(model=ModelSection(**{f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)}, preset=preset))
    cfg = OmegaConf.structured(base)
    _apply(cfg, file_items, path)
    cfg.data.auto_build_at = cfg.data.shards  # before the command line, which may move data.shards
    _apply(cfg, cli_items, "command line")
    out: Config = OmegaConf.to_object(cfg)
    out.run.name = out.run.name or name
    out.run.dir = out.run.dir or os.path.join("runs", out.run.name)
    return out.validate()


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_file(path: str) -> Config:
    """Read a resolved config.yaml written into a run directory."""
    with open(path) as f:
        d = yaml.safe_load(f)
    cfg = OmegaConf.structured(Config)
    _apply(cfg, _flatten({k: v for k, v in d.items()}), path)
    return OmegaConf.to_object(cfg)
