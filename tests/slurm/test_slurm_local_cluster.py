"""The local cluster is real: two nodes, a 2-node job spans both, and gloo all-reduces across them.

    bash slurm/local_cluster.sh start   # as root, once
    pytest -m slurm tests/slurm/test_slurm_local_cluster.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _sbatch(tmp_path, body: str) -> str:
    script = tmp_path / "job.sbatch"
    script.write_text(body)
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def test_two_nodes_are_up(slurm):
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, check=True).stdout
    states = dict(line.split() for line in out.splitlines())
    assert set(states) >= {"n1", "n2"}
    assert all(states[n] in ("idle", "mix", "alloc") for n in ("n1", "n2")), states


def test_two_node_job_runs_one_task_per_node(slurm, job_ids, tmp_path):
    job_ids.append(job_id := _sbatch(tmp_path, textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --time=2
        #SBATCH --output={tmp_path}/out-%j.txt
        srun bash -c 'echo "task $SLURM_NODEID $SLURMD_NODENAME"' | sort
        """)))
    assert slurm.wait_done(job_id)["JobState"] == "COMPLETED"
    lines = (tmp_path / f"out-{job_id}.txt").read_text().split("\n")
    assert [line for line in lines if line.startswith("task")] == ["task 0 n1", "task 1 n2"]


def test_gloo_all_reduce_across_two_nodes(slurm, job_ids, tmp_path):
    (tmp_path / "allreduce.py").write_text(textwrap.dedent("""\
        import os, torch, torch.distributed as dist
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MAIN_IP']}:{os.environ['MAIN_PORT']}",
                                rank=rank, world_size=world)
        x = torch.tensor([rank + 1.0])
        dist.all_reduce(x)
        print(f"rank {rank} on {os.environ['SLURMD_NODENAME']}: sum {x.item()}", flush=True)
        dist.destroy_process_group()
        """))
    job_ids.append(job_id := _sbatch(tmp_path, textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --time=3
        #SBATCH --output={tmp_path}/out-%j.txt
        export MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        export MAIN_PORT=$((20000 + SLURM_JOB_ID % 20000))
        srun {sys.executable} {tmp_path}/allreduce.py
        """)))
    state = slurm.wait_done(job_id, timeout=180)
    out = (tmp_path / f"out-{job_id}.txt").read_text()
    assert state["JobState"] == "COMPLETED", out
    assert sorted(line for line in out.splitlines() if line.startswith("rank")) == [
        "rank 0 on n1: sum 3.0", "rank 1 on n2: sum 3.0"], out
