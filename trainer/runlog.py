"""What a run writes besides checkpoints: metrics.jsonl (+ TensorBoard), status.json and run.json."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch.distributed as dist

from . import checkpoint as ckpt_lib
from .config import Config


class MetricsLog:
    """metrics.jsonl (one JSON object per log step) plus TensorBoard, main process only."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path, self.enabled, self.tb = os.path.join(run_dir, "metrics.jsonl"), enabled, None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            self._truncate(resume_step)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run in a directory without checkpoints
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=(resume_step or 0) + 1)

    def _truncate(self, step: int) -> None:
        """Drop rows after the checkpoint's step, so the file reads as one run with each step once."""
        with open(self.path) as f:
            rows = [line for line in f if line.strip()]
        keep = []
        for line in rows:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                pass  # a torn last line from a killed process
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_status(run_dir: str, state: str, step: int, **extra) -> None:
    ckpt_lib.write_json(os.path.join(run_dir, "status.json"), {"state": state, "step": step, **extra})


def run_info(accelerator, cfg: Config) -> dict:
    import importlib.metadata as md

    hosts = [None] * accelerator.num_processes
    # node: SLURM's node name, which tells apart nodes that share one host (slurmd -N, the tests' cluster)
    mine = {"rank": accelerator.process_index, "host": socket.gethostname(),
            "node": os.environ.get("SLURMD_NODENAME"), "local_rank": accelerator.local_process_index}
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(hosts, mine)
    else:
        hosts = [mine]
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                           capture_output=True, text=True, timeout=10)
        sha = r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        sha = None
    versions = {}
    for pkg in ("nstage-vae", "torch", "accelerate", "webdataset", "safetensors", "deepspeed", "einops", "omegaconf"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"git_sha": sha, "versions": versions, "python": sys.version.split()[0],
            "world_size": accelerator.num_processes, "hosts": hosts,
            "distributed_type": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision,
            "global_batch": cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes,
            "argv": sys.argv}
