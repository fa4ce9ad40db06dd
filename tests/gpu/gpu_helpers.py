"""Launch the real command lines on GPUs and read what they leave behind, for the tests in this folder.

Every trainer run goes through `accelerate launch` with one of the shipped configs in `trainer/accelerate/`
(never the user's default config) and the process count and precision given on the command line:

    python -m accelerate.commands.launch --config_file trainer/accelerate/1gpu.yaml --num_processes 1 \\
        --num_machines 1 --mixed_precision bf16 --main_process_port PORT trainer/run.py key=value ...

It is started through the interpreter that runs the tests, with the repository on PYTHONPATH, so nothing
needs to be pip-installed and no `accelerate` script needs to be on PATH.

The runs the tests read are named in `RUNS` and built by `RunPool`: several at a time on background threads
(tiny runs leave one GPU mostly idle and spend their time in imports and CUDA start-up), each at most once
per session, started when the first GPU test begins, whatever test needs them first.

`NSTAGE_GPU_TESTS_ON_CPU=1` is a development aid (see conftest.py): the same commands on the CPU.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from run_helpers import (REPO, RUN_PY, Run, Waits, assert_steps_once, curve, free_port, ok, read_metrics,  # noqa: F401
                         tensors, train_rows)

ACCELERATE_CONFIGS = REPO / "trainer" / "accelerate"

ON_CPU = os.environ.get("NSTAGE_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
# fp32 on the GPU without TF32 (which cuDNN uses for convolutions by default): for tests that compare
# runs whose batches are split differently, where TF32's 10-bit mantissa would dominate the difference.
EXACT_FP32 = {"NVIDIA_TF32_OVERRIDE": "0"}

# A tiny 2-stage model on 28 px synthetic images with batch norm (the presets' norm: the one DeepSpeed's
# bf16 broke), 20 steps of batch 16, every row logged. 160 synthetic samples: an epoch is 10 steps.
TINY = ["data.synthetic=true", "data.synthetic_size=160", "model.norm=batch", "model.latent_dim=16",
        "model.encoder.channels=[8,16]", "model.stages.0.channels=[16,8]", "model.stages.1.width=8",
        "model.stages.1.num_blocks=1", "train.batch_size=16", "train.eval_batches=2", "train.num_samples=4",
        "train.max_steps=20", "train.log_every=1", "train.eval_every=10", "train.sample_every=10",
        "train.ckpt_every=10", "train.warmup_steps=5", "train.lr=3e-4"]
# The same model for 200 steps: long enough on a GPU that a SIGTERM sent at step 30 lands inside the run.
LONG_STEPS = 200
LONG = [*TINY, f"train.max_steps={LONG_STEPS}", "train.ckpt_every=50", "train.eval_every=50",
        "train.sample_every=100"]
STOP_AT = 30  # the SIGTERM run is signalled once metrics.jsonl shows this step
OVERFLOW_STEP = 12  # fp16: train.inject_overflow; late enough that the scaler's own first back-offs are over
FP16 = [*TINY, f"train.inject_overflow={OVERFLOW_STEP}", "train.warmup_steps=100", "train.max_bad_steps=1"]
# The adversarial refiner on stage 2 from the first update: a tiny spectral-norm PatchGAN beside TINY.
ADV = ["adv.stages=[2]", "adv.width=8", "adv.num_layers=2", "adv.start=0", "adv.feature_matching=1.0"]
CUDA_GRAPH = "train.cuda_graph=true"
# NaN in the input from step GRAPH_NAN_STEP (after the capture at step 4), 3 bad steps allowed: the run aborts
# at GRAPH_NAN_STEP + 2; a checkpoint every step.
GRAPH_NAN_STEP = 8
GRAPH_NAN = [f"train.inject_nan={GRAPH_NAN_STEP}:0", "train.max_bad_steps=3", "train.ckpt_every=1",
             "train.keep_ckpts=20"]


def precision(p: str) -> str:
    """bf16 becomes fp32 in the CPU dry run; fp16 stays (the trainer uses torch's CPU GradScaler there)."""
    return "no" if ON_CPU and p == "bf16" else p


def env(**extra: str) -> dict[str, str]:
    """This environment without anything a launcher left behind, with the repository importable."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("ACCELERATE_", "TORCHELASTIC_")) and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                           "MASTER_ADDR", "MASTER_PORT")}
    e.update(PYTHONUNBUFFERED="1", DS_BUILD_OPS="0", OMP_NUM_THREADS="1",
             PYTHONPATH=os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p))
    e.update(extra)
    return e


def accelerate_launch(config: str, procs: int, mixed_precision: str) -> list[str]:
    """`accelerate launch` with a shipped config (1gpu, 8gpu_ddp, zero1/2/3), these processes and precision."""
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml"), "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", precision(mixed_precision),
            "--main_process_port", str(free_port())]


# ----------------------------------------------------------------------------- processes
_live: set["Launch"] = set()
_live_lock = threading.Lock()
_closing = threading.Event()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below `pid`. torch's elastic launcher starts its workers in sessions of their own, so
    killing the launcher's process group would leave them running."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class Launch(Waits):
    """A command in its own session, its output in `log_path`; killed with all its descendants on timeout
    and when the test session ends."""

    def __init__(self, cmd: list[str], log_path: Path, out_dir: Path, extra_env: dict | None = None):
        self.dir, self.log_path, self.cmd = Path(out_dir), Path(log_path), cmd
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with _live_lock:
            if _closing.is_set():
                raise RuntimeError("the test session is ending; not starting " + " ".join(cmd[:6]))
            self._log = open(self.log_path, "w")
            self._log.write("$ " + " ".join(cmd) + "\n")
            self._log.flush()
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(**(extra_env or {})), stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            _live.add(self)

    def text(self) -> str:
        try:
            self._log.flush()
        except ValueError:  # closed (by a kill from another thread)
            pass
        return self.log_path.read_text(errors="replace")

    def trainer_pids(self) -> list[int]:
        """The trainer processes below the launcher (`trainer/run.py` in their command line), outermost only."""
        found = [p for p in descendants(self.proc.pid) if str(RUN_PY) in _cmdline(p)]
        return [p for p in found if not any(p in descendants(q) for q in found if q != p)]

    def wait(self, timeout: float) -> Run:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s, killed: {' '.join(self.cmd)}\n"
                                 f"{self.text()[-4000:]}") from None
        self._done()
        return Run(self.dir, rc, self.text())

    def kill(self) -> None:
        """SIGKILL the launcher and every process below it."""
        if self.proc.poll() is None:
            for pid in [*descendants(self.proc.pid), self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(30)
        self._done()

    def _done(self) -> None:
        if not self._log.closed:
            self._log.close()
        with _live_lock:
            _live.discard(self)


def kill_all() -> None:
    """Stop every launch still running and refuse new ones (the end of the session, or an interrupt)."""
    _closing.set()
    with _live_lock:
        launches = list(_live)
    for launch in launches:
        launch.kill()


atexit.register(kill_all)


def trainer(run_dir: Path, overrides: list[str], *, config: str = "1gpu", procs: int = 1, mixed_precision: str = "bf16",
            extra_env: dict | None = None) -> Launch:
    """`trainer/run.py` under `accelerate launch`, its output in `<run_dir>.<ms>.log`."""
    run_dir = Path(run_dir)
    cmd = [*accelerate_launch(config, procs, mixed_precision), str(RUN_PY), *overrides, f"run.dir={run_dir}"]
    e = dict(extra_env or {})
    if ON_CPU and procs > 1 and not config.startswith("zero"):
        e["ACCELERATE_USE_CPU"] = "1"  # DDP over gloo (DeepSpeed picks gloo by itself on CPU)
    return Launch(cmd, run_dir.parent / f"{run_dir.name}.{int(time.time() * 1000)}.log", run_dir, e)


def train(run_dir: Path, overrides: list[str], *, timeout: float = 300, **kw) -> Run:
    """Run the trainer to its end; the caller asserts on `rc`."""
    return trainer(run_dir, overrides, **kw).wait(timeout)


def command(out_dir: Path, name: str, args: list[str], *, timeout: float = 300, extra_env: dict | None = None) -> Run:
    """Run `python ARGS...` in the repository; its output in `<out_dir>/<name>.log`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Launch([sys.executable, *args], out_dir / f"{name}.log", out_dir, extra_env).wait(timeout)


# ----------------------------------------------------------------------------- metrics and weights
def by_step(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in train_rows(rows)}


def curve_distance(a: list[dict], b: list[dict]) -> tuple[float, dict[str, float]]:
    """The largest difference between two runs' logged numbers, each relative to its yardstick (the row's
    loss for the loss terms, the number itself for lr and grad_norm): overall and per key. Both runs must
    have logged the same rows and keys; a non-finite number on either side is an infinite distance."""
    ca, cb = curve(a), curve(b)
    assert [x[:2] for x in ca] == [x[:2] for x in cb], "the runs logged different rows or keys"
    per_key: dict[str, float] = {}
    for (_, key, x, _), (_, _, y, scale) in zip(ca, cb):
        ref = abs(y) if key in ("lr", "grad_norm") else scale
        d = abs(x - y) / max(ref, 1e-12) if math.isfinite(x) and math.isfinite(y) else math.inf
        per_key[key] = max(per_key.get(key, 0.0), d)
    return max(per_key.values(), default=0.0), per_key


def assert_curves_close(a: list[dict], b: list[dict], rtol: float, grad_rtol: float) -> dict[str, float]:
    """Loss terms within rtol x the row's loss, lr within rtol, grad_norm within grad_rtol; returns the
    measured distances per key (for the log)."""
    _, per_key = curve_distance(a, b)
    bad = {k: d for k, d in per_key.items() if d > (grad_rtol if k == "grad_norm" else rtol)}
    assert not bad, f"curves differ beyond rtol={rtol} (grad_norm {grad_rtol}): {bad}; all: {per_key}"
    return per_key


def weight_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all floating tensors together: 0 for identical weights. (Per tensor, small
    biases near zero would turn last-bit noise into large ratios.)"""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    norm = sum(float(b[k].double().pow(2).sum()) for k in keys)
    return math.sqrt(diff / max(norm, 1e-300))


def assert_all_finite(state: dict, what: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.float().isfinite().all())]
    assert not bad, f"{what}: non-finite values in {len(bad)} tensors, e.g. {bad[:5]}"


def load_export(path: Path):
    """`models.load_pretrained` on the test device; every weight and buffer must be finite."""
    from models import load_pretrained
    model = load_pretrained(str(path), device=DEVICE)
    assert_all_finite(model.state_dict(), str(path))
    return model


def assert_finished(run: Run, max_steps: int, *, grad_norm: bool = True):
    """Trained to the end: exit 0, status finished, every step logged once with finite losses, the final
    checkpoint committed, and an export that loads with finite weights. Returns the loaded model."""
    ok(run)
    status = run.status()
    assert status["state"] == "finished" and status["step"] == max_steps, status
    rows = run.rows
    assert_steps_once(rows, max_steps)
    keys = ("loss", "grad_norm") if grad_norm else ("loss",)
    bad = [(r["step"], k, r[k]) for r in train_rows(rows) for k in keys if not math.isfinite(r[k])]
    assert not bad, f"non-finite training numbers: {bad[:5]}"
    final = run.dir / "checkpoints" / f"step-{max_steps:07d}"
    assert (final / "COMMITTED").is_file(), sorted(p.name for p in (run.dir / "checkpoints").iterdir())
    return load_export(run.dir / "export")


# ----------------------------------------------------------------------------- the shared runs
@dataclass
class Spec:
    """`build(directory, *results of deps)` -> anything; deps are other RUNS names."""
    build: Callable
    deps: tuple[str, ...] = ()


@dataclass
class Preempted:
    stopped: Run  # the launch that was sent SIGTERM
    status: dict  # its status.json, read before the relaunch rewrote it
    rows: list[dict]  # its metrics.jsonl, likewise
    seen: int  # the step metrics.jsonl showed when the signal was sent
    resumed: Run  # the same command again, to the end


def _sigterm_then_resume(d: Path) -> Preempted:
    """LONG in bf16: SIGTERM to the trainer process once step STOP_AT is logged, then the same command again.
    Under `accelerate launch --num_processes 1` the launcher is a plain parent (no elastic agent) that does not
    forward signals, so the signal goes to the trainer below it, as a scheduler's does."""
    launch = trainer(d / "run", LONG)
    seen = launch.wait_for_step(STOP_AT, timeout=300)
    pids = launch.trainer_pids()
    assert len(pids) == 1, f"expected one trainer process below the launcher, found {pids}"
    os.kill(pids[0], signal.SIGTERM)
    stopped = launch.wait(120)
    status = json.loads((d / "run" / "status.json").read_text()) if (d / "run" / "status.json").is_file() else {}
    rows = read_metrics(d / "run")
    return Preempted(stopped, status, rows, seen, train(d / "run", LONG))


def _mnist_like_shards(d: Path) -> Path:
    """Tiny 1-channel 28 px PNG shards (train 64, test 32 smooth random images) written by shards.write the
    way MNIST's are, so the bf16 run's export can be evaluated on them."""
    import numpy as np

    from shards.write import _image_info, _task, write_shards

    rng = np.random.default_rng(0)
    image = _image_info(28, 1, "png", 0)
    tasks = {split: [_task(f"{split}_{i:05d}", {"id": f"{split}/{i:05d}", "label": i % 10}, image,
                           pixels=np.kron(rng.integers(0, 256, (7, 7)), np.ones((4, 4))).astype(np.uint8))
                     for i in range(n)]
             for split, n in (("train", 64), ("test", 32))}
    write_shards(d / "shards", tasks, image=image, crop={"kind": "none"}, source={"dataset": "gpu-test"},
                 shard_samples=16, workers=1, overwrite=False, progress=False)
    return d / "shards"


def _evaluate(d: Path, bf16: Run, shards: Path) -> Run:
    cmd = [*accelerate_launch("1gpu", 1, "no"), "-m", "trainer.evaluate", str(bf16.dir / "export"),
           "--shards", str(shards), "--split", "test", "--n", "32", "--batch-size", "16", "--no-inception",
           "--out", str(d / "metrics.json")]
    return Launch(cmd, d / "evaluate.log", d).wait(300)


def _zero3_exports(d: Path, zero3: Run) -> tuple[Run, Run]:
    ema = command(d / "ema", "export", ["-m", "trainer.export", str(zero3.dir), "--out", str(d / "ema")])
    raw = command(d / "raw", "export", ["-m", "trainer.export", str(zero3.dir), "--weights", "raw",
                                        "--out", str(d / "raw")])
    return ema, raw


RUNS: dict[str, Spec] = {
    # 1 GPU; the slowest first, since the pool starts them in this order. The benchmark's eager loops only
    # (the compiled ones are the "compile" run's and gpu_check.sh's celeba128 benchmark's business).
    "bench": Spec(lambda d: command(d, "bench", [
        "bench/train.py", "--device", DEVICE, "--config", "mnist", "--steps", "20", "--interval", "5",
        "--repeats", "1", "--modes", "eager", "--mixed-precision", precision("bf16")])),
    "bf16_sigterm": Spec(_sigterm_then_resume),
    "compile": Spec(lambda d: train(d / "run", [*TINY, "train.compile=true"], timeout=420)),
    "zero3": Spec(lambda d: train(d / "run", TINY, config="zero3")),
    "zero2": Spec(lambda d: train(d / "run", TINY, config="zero2")),
    "zero1": Spec(lambda d: train(d / "run", TINY, config="zero1")),
    "bf16": Spec(lambda d: train(d / "run", LONG)),
    "bf16_again": Spec(lambda d: train(d / "run", LONG)),
    "bf16_sync_free": Spec(lambda d: train(d / "run", [*LONG, "train.sync_free=true"])),
    "bf16_cuda_graph": Spec(lambda d: train(d / "run", [*LONG, CUDA_GRAPH])),
    "bf16_cuda_graph_sync_free": Spec(lambda d: train(d / "run", [*LONG, CUDA_GRAPH, "train.sync_free=true"])),
    "cuda_graph_nan": Spec(lambda d: train(d / "run", [*TINY, CUDA_GRAPH, *GRAPH_NAN])),
    "cuda_graph_adv": Spec(lambda d: train(d / "run", [*TINY, *ADV, "adv.start=5", CUDA_GRAPH])),
    "cuda_graph_compile": Spec(lambda d: train(d / "run", [*TINY, CUDA_GRAPH, "train.compile=true"], timeout=420)),
    "fp16_overflow": Spec(lambda d: train(d / "run", FP16, mixed_precision="fp16")),
    "fp16_overflow_sync_free": Spec(lambda d: train(d / "run", [*FP16, "train.sync_free=true"], mixed_precision="fp16")),
    "sync_bn": Spec(lambda d: train(d / "run", [*TINY, "model.sync_bn=true"])),
    "adv_bf16": Spec(lambda d: train(d / "run", [*TINY, *ADV])),
    "adv_fp16": Spec(lambda d: train(d / "run", [*FP16, *ADV], mixed_precision="fp16")),
    "shards": Spec(_mnist_like_shards),
    "sample": Spec(lambda d, bf16: command(d, "sample", [
        "-m", "trainer.sample", str(bf16.dir / "export"), "--device", DEVICE, "--n", "16",
        "--out", str(d / "samples.png")]), deps=("bf16",)),
    "evaluate": Spec(_evaluate, deps=("bf16", "shards")),
    "zero3_export": Spec(_zero3_exports, deps=("zero3",)),
    # 2 GPUs. Parity runs are fp32 without TF32; the 1-process references see the same samples and noise
    # (the synthetic stream and the reparameterisation noise are sliced per rank from one global batch).
    "ddp2_group": Spec(lambda d: train(d / "run", [*TINY, "model.norm=group", "train.batch_size=8"],
                                       config="8gpu_ddp", procs=2, mixed_precision="no", extra_env=EXACT_FP32)),
    "ddp1_group": Spec(lambda d: train(d / "run", [*TINY, "model.norm=group", "train.batch_size=16"],
                                       mixed_precision="no", extra_env=EXACT_FP32)),
    "ddp2_sync_bn": Spec(lambda d: train(d / "run", [*TINY, "model.sync_bn=true", "train.batch_size=8"],
                                         config="8gpu_ddp", procs=2, mixed_precision="no", extra_env=EXACT_FP32)),
    "ddp2_no_sync_bn": Spec(lambda d: train(d / "run", [*TINY, "train.batch_size=8"],
                                            config="8gpu_ddp", procs=2, mixed_precision="no", extra_env=EXACT_FP32)),
    "ddp1_batch": Spec(lambda d: train(d / "run", [*TINY, "train.batch_size=16"],
                                       mixed_precision="no", extra_env=EXACT_FP32)),
    "zero2_2proc": Spec(lambda d: train(d / "run", [*TINY, "train.batch_size=8"], config="zero2", procs=2)),
}


class RunPool:
    """Builds named RUNS on background threads, `workers` at a time, each once; `result(name)` waits for one.

    A run's dependencies are submitted before it, and the executor takes work in submission order, so a
    build that waits for its dependencies only ever waits for builds already running: no deadlock."""

    def __init__(self, root: Path, workers: int, specs: dict[str, Spec] = RUNS):
        self.root, self.specs = Path(root), specs
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpu-run")
        self._futures: dict[str, Future] = {}
        self._lock = threading.RLock()

    def start(self, names) -> None:
        """Submit these runs in RUNS order (the slowest first)."""
        for name in [n for n in self.specs if n in set(names)]:
            self._submit(name)

    def _submit(self, name: str) -> Future:
        with self._lock:
            if name not in self._futures:
                spec = self.specs[name]
                for dep in spec.deps:
                    self._submit(dep)
                self._futures[name] = self._executor.submit(self._build, name, spec)
            return self._futures[name]

    def _build(self, name: str, spec: Spec):
        deps = [self._futures[d].result() for d in spec.deps]
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return spec.build(d, *deps)

    def result(self, name: str, timeout: float = 900):
        """The run's result (a failure to build it is raised again for every test that asks)."""
        return self._submit(name).result(timeout)

    def close(self) -> None:
        kill_all()
        self._executor.shutdown(wait=True, cancel_futures=True)
