"""The GPU suite: every test here is marked `gpu` and skipped, with the reason, where
`torch.cuda.is_available()` is false; tests marked `gpus(2)` are skipped on fewer than 2 GPUs.

    python -m pytest -m gpu tests/gpu -v -rA       # or: bash bench/gpu_check.sh (versions, suite, benchmark)

The runs the tests read (gpu_helpers.RUNS) are started together when the first test begins, up to 8 at a
time (`NSTAGE_GPU_TEST_WORKERS`), only those that the selected, not skipped tests name in their `gpu_runs`
marker. A SIGTERM (from `timeout`) interrupts the session and kills every run still going.

Development aid: `NSTAGE_GPU_TESTS_ON_CPU=1` runs the same tests on a machine without a GPU, on the CPU
(bf16 runs in fp32, fp16 on torch's CPU GradScaler, DDP over gloo, `--device cpu`), to check command lines
and assertions before a GPU is at hand. Tests marked `real_gpu` (torch.compile, SyncBatchNorm) are skipped
there. It proves nothing about GPUs; nothing sets it by default, and bench/gpu_check.sh unsets it.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from gpu_helpers import ON_CPU, RunPool

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_runs(*names): the shared runs (gpu_helpers.RUNS) a test reads")
    config.addinivalue_line("markers", "gpus(n): needs n CUDA GPUs")
    config.addinivalue_line("markers", "real_gpu: skipped in the NSTAGE_GPU_TESTS_ON_CPU=1 dry run")


def _skip_reason(item) -> str | None:
    if ON_CPU:
        if item.get_closest_marker("real_gpu"):
            return "NSTAGE_GPU_TESTS_ON_CPU=1 dry run: this test needs a real GPU"
        return None
    if not torch.cuda.is_available():
        return (f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda})")
    need = item.get_closest_marker("gpus")
    if need and torch.cuda.device_count() < need.args[0]:
        return f"needs {need.args[0]} GPUs; torch.cuda.device_count() is {torch.cuda.device_count()}"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue  # this hook sees the whole session's items
        item.add_marker(pytest.mark.gpu)
        reason = _skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def _interrupt(signum, _frame):
    # timeout(1) signals its child and then its whole process group: the second SIGTERM must not cut the
    # teardown short. pytest handles the KeyboardInterrupt by tearing down: the pool kills its launches.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def pool(request, tmp_path_factory):
    """Starts every run the selected, not skipped GPU tests name; `pool.result(name)` waits for one."""
    names = set()
    for item in request.session.items:
        runs = item.get_closest_marker("gpu_runs")
        if runs and not item.get_closest_marker("skip") and HERE in Path(item.path).resolve().parents:
            names.update(runs.args)
    workers = int(os.environ.get("NSTAGE_GPU_TEST_WORKERS", "0")) or (2 if ON_CPU else 8)
    p = RunPool(tmp_path_factory.mktemp("gpu_runs"), workers)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` in gpu_check.sh sends SIGTERM
    try:
        p.start(names)
        yield p
    finally:
        p.close()
        signal.signal(signal.SIGTERM, previous)
