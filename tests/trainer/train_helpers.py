"""Launch the real trainer (`trainer/run.py`) as 1 process, 2 gloo DDP processes or 2 DeepSpeed processes,
stop it for real (SIGTERM, STOP file, kill -9), and read what it leaves in its run directory.

Expensive runs are shared by all `test_train_*.py` files through `shared_run`, which builds each named run
once per session (a module-level cache, so that this folder needs no conftest.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from run_helpers import (CURVE_KEYS, REPO, RUN_PY, Run, Waits, assert_steps_once, curve, free_port, ok,  # noqa: F401
                         read_metrics, tensors, train_rows)

ACCELERATE = Path(sys.executable).parent / "accelerate"

# A tiny 2-stage model on 28 px synthetic images: ~0.1 s per step on one CPU thread. lr 3e-4: at 3e-3 Adam
# amplifies the 1e-7 rounding difference between a DDP all-reduce and a 1-process mean to 1e-3 within 20 steps. 160 synthetic
# samples make one epoch 10 global batches of 16, so step 10 ends an epoch for 1 x 16 and 2 x 8 alike.
TINY = ["data.synthetic=true", "data.synthetic_size=160", "model.norm=group", "model.latent_dim=16",
        "model.encoder.channels=[8,16]", "model.stages.0.channels=[16,8]", "model.stages.1.width=8",
        "model.stages.1.num_blocks=1", "train.eval_batches=2", "train.num_samples=4", "train.max_steps=20",
        "train.log_every=1", "train.eval_every=10", "train.sample_every=10", "train.warmup_steps=5",
        "train.lr=3e-4"]
GLOBAL_BATCH = 16


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("ACCELERATE_", "TORCHELASTIC_")) and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                           "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_BUILD_OPS="0",
             PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
    e.update(extra)
    return e


def command(procs: int = 1, *, deepspeed: bool = False, entry: Path | str = RUN_PY) -> tuple[list[str], dict]:
    """The command line and environment: `python trainer/run.py`, the CPU DDP launch, or ZeRO-2."""
    if deepspeed:
        return ([str(ACCELERATE), "launch", "--config_file", str(REPO / "trainer/accelerate/zero2.yaml"),
                 "--num_processes", str(procs), "--main_process_port", str(free_port()), str(entry)], env())
    if procs == 1:
        return [sys.executable, str(entry)], env()
    return ([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
             "--main_process_port", str(free_port()), str(entry)], env(ACCELERATE_USE_CPU="1"))


class Launch(Waits):
    """A running trainer (or launcher) in its own session, its output in `<run.dir>.log`."""

    def __init__(self, run_dir: Path, *overrides: str, procs: int = 1, deepspeed: bool = False,
                 entry: Path | str = RUN_PY, extra_env: dict | None = None):
        self.dir = Path(run_dir)
        self.log_path = self.dir.parent / f"{self.dir.name}.{int(time.time() * 1000)}.log"
        cmd, e = command(procs, deepspeed=deepspeed, entry=entry)
        e.update(extra_env or {})
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd + [*TINY, *overrides, f"run.dir={self.dir}"], cwd=REPO, env=e,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 240) -> Run:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.dir}: still running after {timeout} s:\n{self.text()[-3000:]}") from None
        self._log.close()
        return Run(self.dir, rc, self.text())

    def kill(self) -> None:
        """SIGKILL the whole session this launch started (the launcher and its workers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        self._log.close()

    def text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


def train(run_dir: Path, *overrides: str, procs: int = 1, deepspeed: bool = False, timeout: float = 240,
          **kw) -> Run:
    """Run the trainer to its end; the caller asserts on `rc`."""
    return Launch(run_dir, *overrides, procs=procs, deepspeed=deepspeed, **kw).wait(timeout)


def assert_curves_close(a: list[dict], b: list[dict], rtol: float, grad_rtol: float | None = None,
                        extra: tuple[str, ...] = ()) -> None:
    """Loss terms agree within rtol x the row's loss, lr and grad_norm within rtol (grad_rtol) of
    themselves; rtol=0 asks for bitwise-equal numbers. `extra`: more keys to compare (e.g. ADV_KEYS), each
    as a loss term, or as a grad norm when its name ends in grad_norm."""
    ca, cb = curve(a) + _extra_curve(a, extra), curve(b) + _extra_curve(b, extra)
    assert [x[:2] for x in ca] == [x[:2] for x in cb], "the runs logged different rows or keys"
    bad = []
    for (step, key, x, _), (_, _, y, scale) in zip(ca, cb):
        if key.endswith("grad_norm"):
            tol = (rtol if grad_rtol is None else grad_rtol) * abs(y)
        else:
            tol = rtol * (abs(y) if key == "lr" else scale)
        if not abs(x - y) <= tol:
            bad.append((step, key, x, y))
    assert not bad, f"{len(bad)} values differ beyond rtol={rtol} (grad_rtol={grad_rtol}); first: {bad[:5]}"


# What an adversarial run on stage 2 logs besides the plain model's terms (once adv.start is reached).
ADV_KEYS = ("g_adv_2", "fm_2", "d_loss", "d_real_2", "d_fake_2", "d_grad_norm")


def _extra_curve(rows: list[dict], keys: tuple[str, ...]) -> list[tuple]:
    """`curve`'s (step, key, value, scale) for keys outside CURVE_KEYS."""
    return [(r["step"], k, r[k], abs(r.get("loss", r.get("val_loss", 0.0)))) for r in rows for k in keys if k in r]


def without_timing(rows: list[dict]) -> list[dict]:
    """The rows less images_per_s: everything else two runs of the same computation log alike."""
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def assert_rows_equal(a: list[dict], b: list[dict]) -> None:
    """Bitwise: the same rows with the same keys and equal values (NaN equal to NaN), timing aside."""
    a, b = without_timing(a), without_timing(b)
    assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b], \
        "the runs logged different rows or keys"
    same = lambda x, y: x == y or (isinstance(x, float) and isinstance(y, float) and x != x and y != y)  # noqa: E731
    bad = [(x["step"], k, x[k], y[k]) for x, y in zip(a, b) for k in x if not same(x[k], y[k])]
    assert not bad, f"{len(bad)} values differ; first: {bad[:5]}"


def optimizer_state(path: Path) -> dict:
    """An `optimizer*.bin` that accelerate's save_state wrote (a torch state dict; no pickled objects)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def assert_optimizer_states_equal(a: dict, b: dict, ignore_groups=("lr",)) -> None:
    """Equal Adam moments and step counts, and equal param groups but for `ignore_groups` (by default lr:
    the trainer sets it each step)."""
    groups = lambda s: [{k: v for k, v in g.items() if k not in ignore_groups} for g in s["param_groups"]]  # noqa: E731
    assert groups(a) == groups(b)
    assert a["state"].keys() == b["state"].keys()
    diff = [(i, k) for i in a["state"] for k in a["state"][i]
            if not torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(b["state"][i][k]))]
    assert not diff, f"{len(diff)} optimizer state tensors differ, e.g. {diff[:3]}"


def assert_tensors_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} of {len(a)} tensors differ, e.g. {diff[:3]}"


def assert_checkpoints_equal(a: Path, b: Path, models=("model.safetensors", "ema.safetensors"),
                             optimizers=("optimizer.bin",), ignore_groups=("lr",)) -> None:
    """Two checkpoint directories hold bitwise-equal weights (`models`) and optimizer states (`optimizers`)."""
    for f in models:
        assert_tensors_equal(tensors(Path(a) / f), tensors(Path(b) / f))
    for f in optimizers:
        assert_optimizer_states_equal(optimizer_state(Path(a) / f), optimizer_state(Path(b) / f), ignore_groups)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def checkpoints(run_dir: Path) -> list[str]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def copy_run(src: Path, dst: Path, *, keep_ckpt: str) -> Path:
    """A copy of a run directory cut back to one checkpoint (as if the run had stopped there)."""
    shutil.copytree(src, dst)
    for name in checkpoints(dst):
        if name != keep_ckpt:
            shutil.rmtree(dst / "checkpoints" / name)
    for extra in ("export", "status.json"):
        p = dst / extra
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return dst


_CACHE: dict[str, object] = {}


def shared_run(name: str, tmp_path_factory, build):
    """Build the named run once per session: `build(directory)` -> any result; a failure is cached too,
    so that every test depending on a broken run fails at once with the same error."""
    if name not in _CACHE:
        try:
            _CACHE[name] = build(tmp_path_factory.mktemp(name))
        except BaseException as e:  # noqa: BLE001 - re-raised for every dependent test
            _CACHE[name] = e
    got = _CACHE[name]
    if isinstance(got, BaseException):
        raise got
    return got


# ----------------------------------------------------------------------------- the shared runs
def reference_1proc(tmp_path_factory) -> Run:
    """20 straight steps, 1 process, batch 16: checkpoints every 5, keep 3 (so retention deletes step 5)."""
    return shared_run("ref1", tmp_path_factory, lambda d: ok(train(
        d / "run", f"train.batch_size={GLOBAL_BATCH}", "train.ckpt_every=5", "train.keep_ckpts=3")))


def reference_ddp(tmp_path_factory) -> Run:
    """The same 20 steps as 2 gloo processes x batch 8, checkpoints every 10."""
    return shared_run("ref_ddp", tmp_path_factory, lambda d: ok(train(
        d / "run", f"train.batch_size={GLOBAL_BATCH // 2}", "train.ckpt_every=10", procs=2)))
