"""The real trainer (trainer/run.py) through the real slurm/train.sbatch on the local two-node cluster.

- a tiny CPU job (1 node x 2 gloo processes) completes with checkpoints, metrics.jsonl and an export;
- the early warning (USR1 to the batch shell), a preemption (TERM to the whole job) and SLURM's own
  preemption signal (TERM to the job's steps, here on 2 nodes) each end in a committed checkpoint on all
  ranks, a requeue and a resumed run whose losses equal the uninterrupted run's;
- a 2-node job (1 process per node) trains with ranks on n1 and n2 and matches the 1-node run's losses.

    bash slurm/local_cluster.sh start   # as root, once
    pytest -m slurm tests/slurm/test_slurm_train.py

Tolerance: the runs are compared with rtol 1e-5. The trainer makes every run of a config see the same
batches and the same noise (resumed or not, 1 node or 2), so they agree to float32 rounding; 2-rank gloo
all-reduces are not promised to be bit-identical from run to run, hence a tolerance and not equality
(in the runs measured on this machine every loss was bit-identical).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run_helpers import read_metrics

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 60
CKPT_EVERY = 25
# A small model on synthetic MNIST-shaped data. Batch 16 per rank (global 32 on 2 ranks either way) makes a step
# slow enough (0.1-0.3 s on 2 shared cores) that a signal sent after a few steps lands well before the end.
TINY = [
    "data.synthetic=true", "data.synthetic_size=256",
    "model.encoder.channels=[8,16]", "model.stages.0.channels=[16,8]", "model.stages.1.width=8",
    "model.stages.1.num_blocks=1", "model.latent_dim=16", "model.norm=group",
    "train.batch_size=16", "train.eval_batches=2", "train.num_samples=4", "train.log_every=1",
    f"train.max_steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.keep_ckpts=2", "run.tensorboard=false",
]
RTOL = 1e-5


def submit(run_dir: Path, nodes: int, procs: int) -> str:
    """python -m slurm.submit for the real trainer (CPU variant), from the run's parent folder (outside the repo)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NSTAGE_TRAIN_SCRIPT", "NSTAGE_ACCELERATE_CONFIG")}
    env["PYTHONPATH"] = str(REPO)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--config", "mnist", *TINY, f"run.dir={run_dir}",
         "--nodes", str(nodes), "--gpus-per-node", "0", "--procs-per-node", str(procs), "--time", "10",
         "--job-name", "nstage-test-train"],
        cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.isdigit(), done.stdout
    return job_id


def rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir, tolerant=True)  # tolerant: a line may be being written right now


def train_rows(run_dir: Path) -> list[dict]:
    """The training rows (the evaluation rows carry val_* keys and no lr)."""
    return [r for r in rows(run_dir) if "lr" in r]


def log_of(run_dir: Path, job_id: str) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    # Read while the job writes: the last bytes may be half of a multi-byte character (tqdm's bar).
    return path.read_text(errors="replace") if path.exists() else ""


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))


def assert_same_losses(run_dir: Path, reference: Path) -> None:
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, STEPS + 1)), "every step exactly once"
    assert [r["step"] for r in train_rows(reference)] == list(range(1, STEPS + 1))
    got = {r["step"]: r for r in train_rows(run_dir)}
    want = {r["step"]: r for r in train_rows(reference)}
    for key in ("loss", "kl", "rec_1", "rec_2"):
        bad = [(s, got[s][key], want[s][key]) for s in want
               if not math.isclose(got[s][key], want[s][key], rel_tol=RTOL, abs_tol=0.0)]
        assert not bad, f"{key} differs from the reference run at (step, got, want): {bad[:5]}"
    val = [r for r in rows(run_dir) if "val_loss" in r]
    val_ref = [r for r in rows(reference) if "val_loss" in r]
    assert [r["step"] for r in val] == [r["step"] for r in val_ref] == [STEPS]
    assert math.isclose(val[0]["val_loss"], val_ref[0]["val_loss"], rel_tol=RTOL, abs_tol=0.0)


def wait_for_steps(slurm, job_id: str, run_dir: Path, n: int, timeout: float = 150) -> None:
    """Poll metrics.jsonl every 0.1 s (scontrol once a second) until the run has logged n steps."""
    deadline, next_check = time.monotonic() + timeout, 0.0
    while len(train_rows(run_dir)) < n:
        if time.monotonic() > next_check:
            state = slurm.state(job_id)
            assert state["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), (
                f"job {job_id} is {state['JobState']} before {n} steps\n{log_of(run_dir, job_id)}")
            next_check = time.monotonic() + 1
        assert time.monotonic() < deadline, f"job {job_id}: no {n} steps in {timeout} s\n{log_of(run_dir, job_id)}"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def uninterrupted(slurm, tmp_path_factory) -> tuple[str, dict, Path]:
    """One uninterrupted 1-node x 2-process job of TINY, shared by all tests: (job id, final state, run dir)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    job_id = submit(run_dir, nodes=1, procs=2)
    try:
        state = slurm.wait_done(job_id, timeout=180)
    finally:
        slurm.cancel(job_id)  # nothing left to cancel unless the wait failed
    return job_id, state, run_dir


def test_tiny_cpu_job_completes(uninterrupted):
    job_id, state, run_dir = uninterrupted
    log = log_of(run_dir, job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0", log
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "finished", "step": STEPS}
    assert log.count("[train.sbatch] job") == 1
    # checkpoints: the periodic ones and the final one, the newest train.keep_ckpts=2 kept
    assert committed_steps(run_dir) == [2 * CKPT_EVERY, STEPS]
    final = run_dir / "checkpoints" / f"step-{STEPS:07d}"
    assert json.loads((final / "trainer_state.json").read_text())["step"] == STEPS
    assert {p.name for p in final.glob("data_rank*.json")} == {"data_rank0.json", "data_rank1.json"}
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in train_rows(run_dir))
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2 and [h["rank"] for h in run["hosts"]] == [0, 1]
    assert len({h["node"] for h in run["hosts"]}) == 1, "a 1-node job has both ranks on one node"

    from models import load_pretrained
    model = load_pretrained(str(run_dir / "export"))
    assert model.config.latent_dim == 16
    images = model.sample(2)
    assert len(images) == 2 and images[-1].shape == (2, 1, 28, 28)  # one output per stage


def interrupt_and_resume(slurm, job_ids: list[str], run_dir: Path, signal_cmd: list[str],
                         nodes: int = 1, procs: int = 2) -> tuple[int, str]:
    """Submit, signal after a few steps, expect a checkpoint, one requeue and a completed resumed run."""
    job_ids.append(job_id := submit(run_dir, nodes=nodes, procs=procs))
    wait_for_steps(slurm, job_id, run_dir, 3)
    subprocess.run([*signal_cmd, job_id], check=True, timeout=20)
    slurm.wait(job_id, lambda s: s["Restarts"] == "1" and s["JobState"] == "PENDING", timeout=90,
               what="the requeue")
    status = json.loads((run_dir / "status.json").read_text())
    stop = status["step"]
    assert status["state"] == "preempted" and 3 <= stop < STEPS, status
    assert stop in committed_steps(run_dir)
    ckpt = run_dir / "checkpoints" / f"step-{stop:07d}"
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {f"random_states_{r}.pkl" for r in range(nodes * procs)}
    assert not (run_dir / "STOP").exists()
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, stop + 1))
    slurm.release_requeued(job_id)

    state = slurm.wait_done(job_id, timeout=180)
    log = log_of(run_dir, job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "finished", "step": STEPS}
    assert log.count("[train.sbatch] job") == 2, "one log across both runs (--open-mode=append)"
    assert f"resumed from {run_dir}/checkpoints/step-{stop:07d} at step {stop}" in log
    run = json.loads((run_dir / "run.json").read_text())
    assert run["resumed_from"] == str(run_dir / "checkpoints" / f"step-{stop:07d}")
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, STEPS + 1)), "every step exactly once"
    return stop, log


def test_early_warning_usr1_checkpoints_requeues_and_resumes(slurm, job_ids, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    # what #SBATCH --signal=B:USR1@90 sends before the time limit
    stop, log = interrupt_and_resume(slurm, job_ids, run_dir, ["scancel", "--signal=USR1", "--batch"])
    assert "got USR1" in log
    assert f"stopped by STOP file at step {stop}" in log
    assert_same_losses(run_dir, uninterrupted[2])


def test_preemption_term_checkpoints_requeues_and_resumes(slurm, job_ids, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    stop, log = interrupt_and_resume(slurm, job_ids, run_dir, ["scancel", "--signal=TERM", "--full"])
    assert "got TERM" in log
    # SLURM delivers a --full TERM to the batch step's processes; srun runs in its own session, so it does
    # not reach srun (which would SIGKILL the tasks) nor the tasks: the batch shell's STOP file stops them.
    assert f"stopped by STOP file at step {stop}" in log
    assert "forcing job termination" not in log
    assert_same_losses(run_dir, uninterrupted[2])


def test_term_to_the_steps_on_two_nodes_checkpoints_requeues_and_resumes(slurm, job_ids, uninterrupted, tmp_path):
    # TERM to the job's steps only (how SLURM's own preemption signals a job): each node's launcher and the
    # workers get it, the workers on both nodes commit, the launchers exit non-zero, status.json requeues
    run_dir = tmp_path / "run"
    stop, log = interrupt_and_resume(slurm, job_ids, run_dir, ["scancel", "--signal=TERM"], nodes=2, procs=1)
    assert f"stopped by SIGTERM at step {stop}" in log
    assert "got TERM" not in log, "the batch shell is not signalled"
    run = json.loads((run_dir / "run.json").read_text())
    assert [h["node"] for h in run["hosts"]] == ["n1", "n2"]
    assert_same_losses(run_dir, uninterrupted[2])


def test_two_nodes_one_process_each_match_one_node(slurm, job_ids, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job_ids.append(job_id := submit(run_dir, nodes=2, procs=1))
    state = slurm.wait_done(job_id, timeout=180)
    log = log_of(run_dir, job_id)
    assert state["JobState"] == "COMPLETED" and state["NodeList"] == "n[1-2]", log
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2
    assert [(h["rank"], h["node"], h["local_rank"]) for h in run["hosts"]] == [(0, "n1", 0), (1, "n2", 0)]
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "finished", "step": STEPS}
    assert STEPS in committed_steps(run_dir) and (run_dir / "export" / "model.safetensors").is_file()
    assert_same_losses(run_dir, uninterrupted[2])
