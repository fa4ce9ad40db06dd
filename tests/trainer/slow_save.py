"""`trainer/run.py` with one checkpoint save made to hang at a chosen point, so a test can kill -9 it there.

    SLOW_SAVE=tmp:10 python tests/trainer/slow_save.py [key=value ...]      # hang with .tmp-step-0000010 written
    SLOW_SAVE=marker:10 python tests/trainer/slow_save.py [key=value ...]   # hang after the rename, before COMMITTED

Everything else is the real trainer: only `trainer.checkpoint`'s fsync helpers are wrapped.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from trainer import checkpoint as ck  # noqa: E402
from trainer.run import main  # noqa: E402

phase, step = os.environ["SLOW_SAVE"].split(":")
name = f"step-{int(step):07d}"

if phase == "tmp":  # every file of the checkpoint is in .tmp-step-N; the rename has not happened
    _fsync_tree = ck.fsync_tree

    def fsync_tree(path: str) -> None:
        _fsync_tree(path)
        if os.path.basename(path) == f".tmp-{name}":
            time.sleep(600)

    ck.fsync_tree = fsync_tree
elif phase == "marker":  # step-N is in place but COMMITTED is not written yet
    _fsync_path = ck._fsync_path

    def fsync_path(path: str) -> None:
        _fsync_path(path)
        final = os.path.join(path, name)
        if os.path.isdir(final) and not os.path.exists(os.path.join(final, ck.MARKER)):
            time.sleep(600)

    ck._fsync_path = fsync_path
else:
    raise SystemExit(f"SLOW_SAVE={phase}:{step}: phase must be tmp or marker")

if __name__ == "__main__":
    sys.exit(main())
