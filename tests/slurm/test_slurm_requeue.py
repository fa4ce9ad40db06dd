"""Early warning, preemption and requeue through the real slurm/train.sbatch on the local cluster.

The trainer is the stand-in tests/slurm/fake_trainer.py (a test double that plays the trainer's stop
protocol under a real `accelerate launch` with real gloo ranks), so this checks the batch shell, srun,
the launcher's signal handling and the requeue decision, not training itself.

    bash slurm/local_cluster.sh start   # as root, once
    pytest -m slurm tests/slurm/test_slurm_requeue.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 24


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def interrupt_and_resume(slurm, job_ids, run_dir: Path, signal_cmd: list[str], nodes=1, procs=2) -> tuple[str, dict]:
    """Submit, wait for 3 steps, send the signal, expect one requeue and a completed second run."""
    job_ids.append(job_id := slurm.submit_fake(run_dir, f"train.max_steps={STEPS}", "fake.step_seconds=0.5",
                                               nodes=nodes, procs=procs))
    slurm.wait(job_id, lambda s: len(metrics(run_dir)) >= 3, timeout=150, what="3 training steps")
    subprocess.run([*signal_cmd, job_id], check=True, timeout=20)
    # the batch shell requeues the job: back to PENDING with a begin-time hold of about 2 minutes
    slurm.wait(job_id, lambda s: s["Restarts"] == "1" and s["JobState"] == "PENDING", timeout=90,
               what="the requeue")
    stopped_at = json.loads((run_dir / "status.json").read_text())
    assert stopped_at["state"] == "preempted" and 3 <= stopped_at["step"] < STEPS
    assert (run_dir / "checkpoints" / f"step-{stopped_at['step']:07d}" / "COMMITTED").exists()
    assert not (run_dir / "STOP").exists()
    slurm.release_requeued(job_id)

    state = slurm.wait_done(job_id, timeout=150)
    log = next(run_dir.glob("slurm-*.out")).read_text()
    assert state["JobState"] == "COMPLETED", log
    assert state["Restarts"] == "1", "the finished run must not requeue again"
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "finished", "step": STEPS}
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "every step exactly once across both runs"
    assert {r["restart"] for r in rows if r["step"] <= stopped_at["step"]} == {0}
    assert {r["restart"] for r in rows if r["step"] > stopped_at["step"]} == {1}
    run = json.loads((run_dir / "run.json").read_text())
    assert run["resumed_from"] == stopped_at["step"] and run["world_size"] == nodes * procs
    assert log.count("[train.sbatch] job") == 2, "one log across both runs (--open-mode=append)"
    return log, run


def test_early_warning_usr1_to_batch_shell(slurm, job_ids, tmp_path):
    # what #SBATCH --signal=B:USR1@90 sends before the time limit
    log, _ = interrupt_and_resume(slurm, job_ids, tmp_path / "run",
                                  ["scancel", "--signal=USR1", "--batch"])
    assert "got USR1" in log
    assert not list((tmp_path / "run").glob("signals-rank*.log")), "USR1 must not reach the launcher or workers"


def test_preemption_term_to_whole_job(slurm, job_ids, tmp_path):
    log, _ = interrupt_and_resume(slurm, job_ids, tmp_path / "run",
                                  ["scancel", "--signal=TERM", "--full"])
    assert "got TERM" in log
    assert "forcing job termination" not in log, "srun must not see the TERM (it would SIGKILL the tasks)"


def test_term_to_job_steps_on_two_nodes(slurm, job_ids, tmp_path):
    # SIGTERM to the training step only (as SLURM's own preemption signals steps): both nodes' launchers
    # forward it to their workers and exit non-zero; status.json, not the exit code, decides the requeue.
    log, run = interrupt_and_resume(slurm, job_ids, tmp_path / "run", ["scancel", "--signal=TERM"],
                                    nodes=2, procs=1)
    assert run["nodes"] == ["n1", "n2"]
    received = [(tmp_path / "run" / f"signals-rank{r}.log").read_text() for r in range(2)]
    assert all("SIGTERM" in text for text in received), received


def test_finished_job_does_not_requeue(slurm, job_ids, tmp_path):
    run_dir = tmp_path / "run"
    job_ids.append(job_id := slurm.submit_fake(run_dir, "train.max_steps=3", "fake.step_seconds=0.1"))
    state = slurm.wait_done(job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0"
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "finished", "step": 3}


def test_crashed_job_fails_without_requeue(slurm, job_ids, tmp_path):
    run_dir = tmp_path / "run"
    job_ids.append(job_id := slurm.submit_fake(run_dir, "train.max_steps=5", "fake.step_seconds=0.1",
                                               "fake.fail_at_step=2"))
    state = slurm.wait_done(job_id)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", state
    assert not (run_dir / "status.json").exists()
