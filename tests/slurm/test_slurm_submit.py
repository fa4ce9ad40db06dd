"""slurm.submit and slurm/train.sbatch without a cluster: render, `bash -n`, and run the rendered script
with stand-ins for srun/scontrol/accelerate on PATH, to check the arguments each node's launcher gets.

    pytest tests/slurm/test_slurm_submit.py
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import submit
from slurm.submit import Job, SubmitError, render

REPO = Path(submit.__file__).resolve().parent.parent


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def stubs(tmp_path, monkeypatch):
    """A bin/ with srun (runs its command once per node, SLURM_NODEID=0..N-1), scontrol (hostnames from
    STUB_HOSTS, logs every call) and accelerate (records argv + env per node, writes STUB_STATUS as
    <run.dir>/status.json). Returns the folder the records land in."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    _exe(bin_dir / "srun", "#!/bin/bash\n"
         'while [[ $1 == --* ]]; do shift; done\n'
         'rc=0\n'
         'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || rc=$?; done\n'
         'exit $rc\n')
    _exe(bin_dir / "scontrol", "#!/bin/bash\n"
         'echo "$*" >> "$STUB_OUT/scontrol.log"\n'
         'if [[ $1 == show && $2 == hostnames ]]; then printf "%s\\n" $STUB_HOSTS; fi\n')
    _exe(bin_dir / "accelerate", f"#!{sys.executable}\n"
         "import json, os, sys, pathlib\n"
         "argv = sys.argv[1:]\n"
         "rec = {'argv': argv, 'use_cpu': os.environ.get('ACCELERATE_USE_CPU')}\n"
         "out = pathlib.Path(os.environ['STUB_OUT'])\n"
         "(out / f\"launch-{os.environ['SLURM_NODEID']}.json\").write_text(json.dumps(rec))\n"
         "run_dir = pathlib.Path([a for a in argv if a.startswith('run.dir=')][-1].split('=', 1)[1])\n"
         "if os.environ.get('STUB_STATUS'):\n"
         "    (run_dir / 'status.json').write_text(os.environ['STUB_STATUS'])\n")
    monkeypatch.setattr(submit, "_accelerate_executable", lambda: str(bin_dir / "accelerate"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_OUT", str(out))
    monkeypatch.setenv("STUB_HOSTS", "gpu-a gpu-b gpu-c")
    monkeypatch.delenv("NSTAGE_TRAIN_SCRIPT", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    return out


def run_rendered(tmp_path: Path, job: Job, nnodes: int, status: dict | None, extra_env=None):
    """Run the rendered script as the batch shell of job 1234 on `nnodes` nodes; (exit code, launches, log)."""
    script = tmp_path / "job.sbatch"
    script.write_text(render(job))
    job.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SLURM_JOB_ID="1234", SLURM_NNODES=str(nnodes), SLURM_JOB_NODELIST="gpu-[a-c]",
               STUB_STATUS=json.dumps(status) if status else "", **(extra_env or {}))
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    out = Path(env["STUB_OUT"])
    launches = [json.loads((out / f"launch-{i}.json").read_text()) for i in range(nnodes)
                if (out / f"launch-{i}.json").exists()]
    log = (out / "scontrol.log").read_text() if (out / "scontrol.log").exists() else ""
    return done, launches, log


def opt(argv: list[str], name: str) -> str:
    """The value after option `name` in argv (exactly once)."""
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


def test_one_node_cpu_two_procs(tmp_path, stubs):
    job = Job(config="mnist", overrides=["train.max_steps=20"], nodes=1, gpus_per_node=0, procs_per_node=2,
              workdir=tmp_path)
    text = render(job)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert "#SBATCH --nodes=1\n" in text
    assert not [line for line in text.splitlines() if line.startswith("#SBATCH --gpu")]
    assert "#SBATCH --cpus-per-task=2\n" in text
    assert f"#SBATCH --output={tmp_path}/runs/mnist/slurm-%j.out\n" in text

    done, launches, log = run_rendered(tmp_path, job, 1, {"state": "finished", "step": 20})
    assert done.returncode == 0, done.stdout + done.stderr
    [launch] = launches
    argv = launch["argv"]
    assert argv[0] == "launch"
    assert opt(argv, "--num_machines") == "1"
    assert opt(argv, "--num_processes") == "2"
    assert opt(argv, "--machine_rank") == "0"
    assert opt(argv, "--main_process_ip") == "gpu-a"
    assert opt(argv, "--main_process_port") == str(20000 + 1234)
    assert "--multi_gpu" in argv  # the way to get 2 real gloo processes on CPUs
    assert "--config_file" not in argv
    assert launch["use_cpu"] == "1"
    script_at = argv.index(str(REPO / "trainer" / "run.py"))
    assert argv[script_at + 1:] == ["--config", "mnist", "train.max_steps=20", f"run.dir={tmp_path}/runs/mnist"]
    assert "requeue" not in log


def test_two_nodes_eight_gpus_deepspeed(tmp_path, stubs):
    zero2 = tmp_path / "zero2.yaml"
    zero2.write_text("distributed_type: DEEPSPEED\n")
    job = Job(config="celeba128", nodes=2, gpus_per_node=8, partition="gpu", account="proj1",
              accelerate_config=str(zero2), workdir=tmp_path)
    text = render(job)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj1", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@90", "#SBATCH --open-mode=append"):
        assert line + "\n" in text, line

    done, launches, _ = run_rendered(tmp_path, job, 2, {"state": "finished", "step": 5})
    assert done.returncode == 0, done.stdout + done.stderr
    assert [opt(x["argv"], "--machine_rank") for x in launches] == ["0", "1"]
    for launch in launches:
        argv = launch["argv"]
        assert opt(argv, "--num_machines") == "2"
        assert opt(argv, "--num_processes") == "16"
        assert opt(argv, "--main_process_ip") == "gpu-a"
        assert opt(argv, "--config_file") == str(zero2)
        # srun runs one launcher per node; DeepSpeed's own pdsh launcher must stay out of it
        assert opt(argv, "--deepspeed_multinode_launcher") == "standard"
        assert "--multi_gpu" not in argv  # it would override the DeepSpeed config
        assert launch["use_cpu"] is None


def test_deepspeed_json_is_absolute_when_submitted_outside_the_repo(tmp_path, stubs):
    # trainer/accelerate/zero2.yaml names trainer/accelerate/zero2.json relative to the repository root,
    # and the job runs in the submission directory (here tmp_path, outside the repository)
    done = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--config", "celeba128", "--nodes", "2", "--gpus-per-node", "8",
         "--accelerate-config", "zero2", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60,
    )
    assert done.returncode == 0, done.stderr
    subprocess.run(["bash", "-n"], input=done.stdout, text=True, check=True)
    assert f"#SBATCH --chdir={tmp_path}\n" in done.stdout
    assert f"ACCELERATE_CONFIG={REPO}/trainer/accelerate/zero2.yaml\n" in done.stdout
    assert f"DEEPSPEED_CONFIG_FILE={REPO}/trainer/accelerate/zero2.json\n" in done.stdout

    job = Job(config="celeba128", nodes=2, gpus_per_node=8, accelerate_config="zero2", workdir=tmp_path)
    done, launches, _ = run_rendered(tmp_path, job, 2, {"state": "finished", "step": 5})
    assert done.returncode == 0, done.stdout + done.stderr
    for launch in launches:
        assert opt(launch["argv"], "--config_file") == str(REPO / "trainer" / "accelerate" / "zero2.yaml")
        assert opt(launch["argv"], "--deepspeed_config_file") == str(REPO / "trainer" / "accelerate" / "zero2.json")


def test_deepspeed_json_relative_to_the_submission_directory_wins(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "mine.json").write_text("{}")
    (tmp_path / "mine.yaml").write_text("distributed_type: DEEPSPEED\n"
                                        "deepspeed_config:\n  deepspeed_config_file: ds/mine.json\n")
    job = Job(config="celeba128", gpus_per_node=8, accelerate_config="mine.yaml", workdir=tmp_path)
    assert f"DEEPSPEED_CONFIG_FILE={tmp_path}/ds/mine.json\n" in render(job)

    (tmp_path / "ds" / "mine.json").unlink()
    with pytest.raises(SubmitError, match="ds/mine.json"):
        render(job)


@pytest.mark.slow
def test_real_launcher_gets_the_absolute_deepspeed_json(tmp_path, stubs, monkeypatch):
    # the real `accelerate launch` with trainer/accelerate/zero2.yaml, run from outside the repository:
    # the worker must see a DeepSpeed JSON path it can open (the YAML's relative path would not resolve)
    probe = _exe(tmp_path / "probe.py", "import json, os, pathlib, sys\n"
                 "path = os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']\n"
                 "json.loads(pathlib.Path(path).read_text())\n"
                 "run_dir = pathlib.Path(sys.argv[-1].split('=', 1)[1])\n"
                 "(run_dir / 'ds_config_seen').write_text(path)\n"
                 "(run_dir / 'status.json').write_text(json.dumps({'state': 'finished', 'step': 0}))\n")
    real = str(Path(sys.executable).parent / "accelerate")
    monkeypatch.setattr(submit, "_accelerate_executable", lambda: real)
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)  # what #SBATCH --chdir does for the batch shell
    job = Job(config="mnist", nodes=1, gpus_per_node=0, procs_per_node=1, accelerate_config="zero2", workdir=work)
    done, _, _ = run_rendered(work, job, 1, None, extra_env={"NSTAGE_TRAIN_SCRIPT": str(probe)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (job.run_dir / "ds_config_seen").read_text() == str(REPO / "trainer" / "accelerate" / "zero2.json")


def test_two_nodes_ddp_uses_multi_gpu(tmp_path, stubs):
    job = Job(config="celeba128", nodes=2, gpus_per_node=8, workdir=tmp_path)
    done, launches, _ = run_rendered(tmp_path, job, 2, {"state": "finished", "step": 5})
    assert done.returncode == 0, done.stderr
    assert all("--multi_gpu" in x["argv"] for x in launches)


def test_dry_run_cli_two_nodes_eight_gpus(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--config", "celeba128", "train.lr=2e-4", "--nodes", "2",
         "--gpus-per-node", "8", "--time", "2-00:00:00", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert "#SBATCH --nodes=2\n" in text and "#SBATCH --gpus-per-node=8\n" in text
    assert "#SBATCH --time=2-00:00:00\n" in text
    assert "PROCS_PER_NODE=8\n" in text
    assert 'NUM_PROCESSES=$((SLURM_NNODES * PROCS_PER_NODE))' in text
    assert '--num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES"' in text
    assert 'MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "--machine_rank \"$SLURM_NODEID\"" in text
    assert f"TRAIN_ARGS=(--config celeba128 train.lr=2e-4 run.dir={tmp_path}/runs/celeba128)" in text
    assert not (tmp_path / "runs").exists(), "--dry-run must not create the run directory"


def test_user_values_reach_the_trainer_verbatim(tmp_path, stubs):
    evil = "note=$(touch PWNED); `touch PWNED2` 'q\" ${HOME}"
    job = Job(config="configs/x $(id).yaml", overrides=[evil, "run.dir=runs/x"], nodes=1, gpus_per_node=0, procs_per_node=1,
              workdir=tmp_path)
    done, [launch], _ = run_rendered(tmp_path, job, 1, {"state": "finished", "step": 1})
    assert done.returncode == 0, done.stderr
    assert launch["argv"][-4:] == ["--config", "configs/x $(id).yaml", evil, f"run.dir={tmp_path}/runs/x"]
    assert not list(tmp_path.rglob("PWNED*"))


def test_preempted_requeues_finished_does_not_failed_fails(tmp_path, stubs):
    job = Job(config="mnist", nodes=1, gpus_per_node=0, procs_per_node=2, workdir=tmp_path)

    done, _, log = run_rendered(tmp_path, job, 1, {"state": "preempted", "step": 7})
    assert done.returncode == 0, done.stderr
    assert "requeue 1234\n" in log

    (Path(os.environ["STUB_OUT"]) / "scontrol.log").unlink()
    done, _, log = run_rendered(tmp_path, job, 1, {"state": "preempted", "step": 7},
                                extra_env={"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"})
    assert done.returncode == 0 and "requeue 77_3\n" in log

    for status in ({"state": "failed", "error": "NaN"}, None):
        (Path(os.environ["STUB_OUT"]) / "scontrol.log").unlink()
        done, _, log = run_rendered(tmp_path, job, 1, status)
        assert done.returncode != 0, status
        assert "requeue" not in log


def test_stale_status_from_an_earlier_run_is_ignored(tmp_path, stubs):
    job = Job(config="mnist", nodes=1, gpus_per_node=0, procs_per_node=2, workdir=tmp_path)
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "status.json").write_text(json.dumps({"state": "preempted", "step": 3}))
    (job.run_dir / "STOP").write_text("")
    done, _, log = run_rendered(tmp_path, job, 1, None)  # this run crashes without a status
    assert done.returncode != 0
    assert "requeue" not in log
    assert not (job.run_dir / "STOP").exists()


def test_list_items_by_index_are_overrides(tmp_path):
    job = Job(config="mnist", overrides=["model.stages.1.loss=l2", "model.encoder.channels=[8,16]"],
              gpus_per_node=8, workdir=tmp_path)
    assert job.train_args[2:4] == ["model.stages.1.loss=l2", "model.encoder.channels=[8,16]"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus_per_node=0), "--procs-per-node"),
    (dict(gpus_per_node=8, procs_per_node=4), "one process per GPU"),
    (dict(gpus_per_node=8, nodes=0), "at least 1 node"),
    (dict(gpus_per_node=8, time="1 day"), "--time"),
    (dict(gpus_per_node=8, partition="gpu; rm -rf /"), "--partition"),
    (dict(gpus_per_node=8, overrides=["--lr 3"]), "key=value"),
    (dict(gpus_per_node=8, overrides=["model.0stages=1"]), "key=value"),
    (dict(gpus_per_node=8, overrides=["run.dir=/tmp/has space"]), "run.dir"),
    (dict(gpus_per_node=8, overrides=["run.dir=/tmp/run%j"]), "run.dir"),
    (dict(gpus_per_node=8, warn_seconds=0), "--warn-seconds"),
])
def test_bad_settings_fail_with_a_message(tmp_path, kwargs, message):
    with pytest.raises(SubmitError, match=message.replace("-", r"\-").replace("%", r"\%")):
        Job(config="mnist", workdir=tmp_path, **kwargs)


def test_missing_accelerate_config_names_the_choices(tmp_path):
    job = Job(config="mnist", gpus_per_node=8, accelerate_config="no_such_config", workdir=tmp_path)
    with pytest.raises(SubmitError, match="no_such_config"):
        render(job)


def test_cli_error_exit_code(tmp_path):
    done = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", "mnist", "--gpus-per-node", "0",
                           "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert done.returncode == 2
    assert "--procs-per-node" in done.stderr
