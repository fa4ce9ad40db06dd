"""What the trainer tests and the GPU tests share: reading a run directory and comparing runs.

Importable as `run_helpers` from every test folder (pytest puts `tests/`, the folder of the top
conftest.py, on sys.path).
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "trainer" / "run.py"
# What must agree between runs; images_per_s is a timing, loss_scale is fp16 bookkeeping.
CURVE_KEYS = ("loss", "kl", "rec_1", "rec_2", "lr", "grad_norm", "val_loss", "val_kl", "val_rec_1", "val_rec_2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    dir: Path  # the run directory (trainer runs) or the output directory (other commands)
    rc: int
    log: str

    @property
    def rows(self) -> list[dict]:
        return read_metrics(self.dir)

    def status(self) -> dict:
        return json.loads((self.dir / "status.json").read_text())


class Waits:
    """Polling a running launch (one with `proc`, `dir`, `text()` and `kill()`) until its run shows something."""

    def wait_for(self, cond, timeout: float, what: str, poll: float = 0.02):
        deadline = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            if self.proc.poll() is not None:
                raise AssertionError(f"exited (rc={self.proc.returncode}) before {what}:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.text()[-4000:]}")
            time.sleep(poll)

    def wait_for_step(self, step: int, timeout: float = 120) -> int:
        """Wait until metrics.jsonl holds a training row with step >= `step`; return that step."""
        def seen():
            rows = train_rows(read_metrics(self.dir, tolerant=True))
            return rows[-1]["step"] if rows and rows[-1]["step"] >= step else 0
        return self.wait_for(seen, timeout, f"step {step} in {self.dir}/metrics.jsonl")


def ok(run: Run) -> Run:
    assert run.rc == 0, f"{run.dir}: exit code {run.rc}\n{run.log[-6000:]}"
    return run


def read_metrics(run_dir: Path, tolerant: bool = False) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if not tolerant:
                raise
    return rows


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


def assert_steps_once(rows: list[dict], max_steps: int) -> None:
    steps = [r["step"] for r in train_rows(rows)]
    assert steps == list(range(1, max_steps + 1)), f"training rows are not steps 1..{max_steps} once each: {steps}"


def curve(rows: list[dict]) -> list[tuple]:
    """(step, key, value, scale) for every compared number, training and validation rows alike; `scale` is
    the row's total loss, the yardstick for its additive terms (kl is ~1% of it)."""
    out = []
    for r in rows:
        scale = abs(r.get("loss", r.get("val_loss", 0.0)))
        out += [(r["step"], k, r[k], scale) for k in CURVE_KEYS if k in r]
    return out


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))
