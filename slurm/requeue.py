"""After the training step of slurm/train.sbatch: requeue the job, or end it, from <run.dir>/status.json.

The batch script runs this as its last command (stdlib only, so it needs no installed package):

    python slurm/requeue.py --run-dir runs/celeba128 --step-status 0

- state "preempted" (every rank committed a checkpoint after STOP / SIGTERM / SIGUSR1):
  `scontrol requeue <job id>`, exit 0. The requeued job resumes from that checkpoint.
- state "finished": exit 0, no requeue.
- anything else ("failed", no file, unreadable file): exit non-zero, no requeue.

The job id is SLURM_JOB_ID, or `<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>` for an array task, and it
is checked to be digits before it goes to scontrol, which is run without a shell.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Mapping

_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")


def job_id_from_env(env: Mapping[str, str]) -> str:
    """The id `scontrol requeue` needs: the array task's `<array job>_<task>` or the plain job id."""
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else env.get("SLURM_JOB_ID", "")
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(
            f"refusing to requeue job id {job_id!r}: expected digits or <digits>_<digits> "
            "from SLURM_JOB_ID / SLURM_ARRAY_JOB_ID + SLURM_ARRAY_TASK_ID (is this running under sbatch?)"
        )
    return job_id


def read_status(run_dir: Path) -> dict | None:
    """<run_dir>/status.json as a dict, or None when it is missing or unreadable."""
    path = run_dir / "status.json"
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"[requeue] cannot read {path}: {e}", file=sys.stderr)
        return None
    return status if isinstance(status, dict) else None


def decide(status: dict | None, step_status: int) -> tuple[str, int]:
    """(action, exit code): ("requeue", 0), ("finished", 0) or ("failed", non-zero)."""
    state = status.get("state") if status else None
    if state == "preempted":
        return "requeue", 0
    if state == "finished":
        return "finished", 0
    return "failed", step_status if step_status != 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory the trainer wrote status.json into")
    p.add_argument("--step-status", type=int, default=0, help="exit status of the srun training step")
    args = p.parse_args(argv)

    status = read_status(args.run_dir)
    action, code = decide(status, args.step_status)
    print(f"[requeue] status.json: {status}; srun step exit status {args.step_status}: {action}", flush=True)
    if action != "requeue":
        return code
    try:
        job_id = job_id_from_env(os.environ)
    except ValueError as e:
        print(f"[requeue] {e}", file=sys.stderr)
        return 3
    print(f"[requeue] scontrol requeue {job_id}", flush=True)
    # SLURM ends this job as part of the requeue; nothing after this call is guaranteed to run.
    done = subprocess.run(["scontrol", "requeue", job_id], check=False)
    if done.returncode != 0:
        print(f"[requeue] scontrol requeue {job_id} failed ({done.returncode}); was the job submitted with --requeue?",
              file=sys.stderr)
        return 4
    return code


if __name__ == "__main__":
    sys.exit(main())
