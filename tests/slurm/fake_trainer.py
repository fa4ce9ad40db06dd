"""TEST DOUBLE for trainer/run.py: honours the trainer's stop protocol and nothing else (no model, no data).

slurm/train.sbatch runs it in place of the trainer when NSTAGE_TRAIN_SCRIPT points here:

    NSTAGE_TRAIN_SCRIPT=tests/slurm/fake_trainer.py python -m slurm.submit --config fake \
        run.dir=/tmp/run train.max_steps=30 fake.step_seconds=0.5 --nodes 1 --gpus-per-node 0 --procs-per-node 2

The protocol it plays, the same as the real trainer's:
- real gloo process group over the ranks `accelerate launch` started (RANK, WORLD_SIZE, MASTER_ADDR...);
- SIGTERM / SIGUSR1 set a flag; at every step boundary each rank also looks for <run.dir>/STOP, and the
  ranks agree with an all-reduce (MAX), so all of them stop at the same step;
- on stop: every rank writes its part of checkpoints/step-NNNNNNN/, a barrier, then rank 0 writes
  COMMITTED, deletes STOP, writes status.json {"state": "preempted", "step": N}; all exit 0;
- at train.max_steps: the same checkpoint, then status.json {"state": "finished", "step": N};
- on start: resume from the newest committed checkpoint in run.dir.
It also writes what the tests check: metrics.jsonl (one line per step, rank 0), run.json (each rank's node),
and signals-rank<R>.log (the signals each rank received).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

_received: list[str] = []


def _on_signal(signum, frame):
    _received.append(signal.Signals(signum).name)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _newest_committed(run_dir: Path) -> int:
    steps = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMMITTED")]
    return max(steps, default=0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    kv = dict(o.split("=", 1) for o in args.overrides)
    run_dir = Path(kv.get("run.dir", f"runs/{args.config}"))
    max_steps = int(kv.get("train.max_steps", 20))
    step_seconds = float(kv.get("fake.step_seconds", 0.5))
    fail_at = int(kv.get("fake.fail_at_step", -1))

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGUSR1, _on_signal)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir.mkdir(parents=True, exist_ok=True)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))

    # each rank's node, gathered on rank 0 (what a multi-node test checks)
    nodes = [None] * world
    dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME", socket.gethostname()))
    step = _newest_committed(run_dir)
    if rank == 0:
        _write_json(run_dir / "run.json", {"world_size": world, "nodes": nodes, "resumed_from": step,
                                           "restart": restart})

    def checkpoint(state: str) -> None:
        ckpt = run_dir / "checkpoints" / f"step-{step:07d}"
        ckpt.mkdir(parents=True, exist_ok=True)
        _write_json(ckpt / f"rank{rank}.json", {"step": step})
        dist.barrier()  # every rank has written its part before the commit marker
        if rank == 0:
            (ckpt / "COMMITTED").write_text("")
            (run_dir / "STOP").unlink(missing_ok=True)
            _write_json(run_dir / "status.json", {"state": state, "step": step})
        dist.barrier()

    logged = 0
    while step < max_steps:
        time.sleep(step_seconds)
        if step == fail_at:
            raise RuntimeError(f"fake trainer: failing at step {step} as asked (fake.fail_at_step)")
        step += 1
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "restart": restart, "world_size": world}) + "\n")
        stop = torch.tensor([1 if (_received or (run_dir / "STOP").exists()) else 0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if len(_received) > logged:
            with open(run_dir / f"signals-rank{rank}.log", "a") as f:
                f.write(f"restart {restart} step {step}: {' '.join(_received[logged:])}\n")
            logged = len(_received)
        if stop.item() and step < max_steps:
            checkpoint("preempted")
            print(f"[fake_trainer] rank {rank}: preempted at step {step}", flush=True)
            dist.destroy_process_group()
            return 0
    checkpoint("finished")
    print(f"[fake_trainer] rank {rank}: finished at step {step}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
