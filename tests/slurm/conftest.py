"""Fixtures for the tests that need the local SLURM cluster (bash slurm/local_cluster.sh start, as root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_TRAINER = Path(__file__).resolve().parent / "fake_trainer.py"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE")


def _sinfo_reason() -> str | None:
    """None when a SLURM controller answers with nodes n1 and n2; else why not."""
    if not shutil.which("sinfo"):
        return "sinfo not installed: run `bash slurm/local_cluster.sh start` as root"
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: is slurmctld running? (bash slurm/local_cluster.sh start)"
    if done.returncode != 0:
        return f"sinfo failed ({done.stderr.strip()}): run `bash slurm/local_cluster.sh start` as root"
    nodes = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    if not {"n1", "n2"} <= nodes:
        return f"sinfo shows nodes {sorted(nodes)}, not the local cluster's n1 and n2"
    return None


class Slurm:
    """Small helpers around sbatch / scontrol / scancel for the tests."""

    def state(self, job_id: str) -> dict[str, str]:
        done = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, f"scontrol show job {job_id}: {done.stderr}"
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def wait(self, job_id: str, until, timeout: float = 150, what: str = "") -> dict[str, str]:
        """Poll until until(state) is true; fail with the job's state and log when it ended or timed out."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if until(state):
                return state
            ended = state.get("JobState") in FINAL
            if ended or time.monotonic() > deadline:
                log = Path(state.get("StdOut", "")).read_text() if Path(state.get("StdOut", "/")).is_file() else ""
                raise AssertionError(f"job {job_id}: {'ended' if ended else 'timed out'} waiting for {what}; "
                                     f"state {state.get('JobState')} restarts {state.get('Restarts')} "
                                     f"exit {state.get('ExitCode')}\n--- log ---\n{log}")
            time.sleep(1)

    def wait_done(self, job_id: str, timeout: float = 150) -> dict[str, str]:
        return self.wait(job_id, lambda s: s["JobState"] in FINAL, timeout, "the end of the job")

    def submit_fake(self, run_dir: Path, *overrides: str, nodes: int = 1, procs: int = 2) -> str:
        """Submit the real train.sbatch with the stand-in trainer (CPU variant); the job id."""
        env = dict(os.environ, NSTAGE_TRAIN_SCRIPT=str(FAKE_TRAINER), PYTHONPATH=str(REPO))
        done = subprocess.run(
            [sys.executable, "-m", "slurm.submit", "--config", "fake", f"run.dir={run_dir}", *overrides,
             "--nodes", str(nodes), "--gpus-per-node", "0", "--procs-per-node", str(procs), "--time", "10",
             "--job-name", "nstage-test"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.strip()
        assert job_id.isdigit(), done.stdout
        return job_id

    def release_requeued(self, job_id: str) -> None:
        """Cut SLURM's hold on a requeued job (`StartTime=now`), once its nodes have finished cleaning up.

        Started at once, the new run can get a credential in the same second as the old run's was revoked,
        and slurmd then refuses it ("Job credential revoked") and the job fails.
        """
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout
            if "comp" not in out:
                break
            time.sleep(0.5)
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=20)

    def cancel(self, job_id: str) -> None:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=20)


@pytest.fixture(scope="session")
def slurm():
    reason = _sinfo_reason()
    if reason:
        pytest.skip(f"local SLURM cluster not reachable: {reason}")
    return Slurm()


@pytest.fixture
def job_ids(slurm):
    """Collects the test's job ids and cancels any still alive at the end, so a failure leaves no job behind."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        slurm.cancel(job_id)
