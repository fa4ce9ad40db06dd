"""Fixtures of the trainer's in-process tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """Each in-process set-up gets its own accelerate state (a process-wide singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield monkeypatch
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
