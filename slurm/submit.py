"""Render slurm/train.sbatch for a run and submit it with sbatch.

    # one node, 8 GPUs (DDP); prints the job id
    python -m slurm.submit --config celeba128 --nodes 1 --gpus-per-node 8 --time 24:00:00 --partition gpu
    # 4 nodes x 8 GPUs with DeepSpeed ZeRO-2 (trainer/accelerate/zero2.yaml), with config overrides
    python -m slurm.submit --config celeba128 train.lr=2e-4 --nodes 4 --gpus-per-node 8 --accelerate-config zero2
    # CPU variant: 2 processes per node, no GPUs (clusters without GPUs, the tests)
    python -m slurm.submit --config mnist train.max_steps=20 --nodes 1 --gpus-per-node 0 --procs-per-node 2
    # print the rendered batch script instead of submitting it
    python -m slurm.submit --config celeba128 --nodes 2 --gpus-per-node 8 --dry-run

The run directory is `run.dir` when given, else runs/<config name>; it is made absolute and always
passed to the trainer as run.dir=..., so the job, its requeues and a later resubmission share it.
The SLURM log goes to <run.dir>/slurm-<job id>.out and the rendered script to <run.dir>/train.sbatch.
A DeepSpeed accelerate config names its JSON (deepspeed_config_file) by a path that accelerate resolves
in the directory the job runs in; the packaged ones (trainer/accelerate/zero*.yaml) name it relative to
the repository root. The script passes that JSON to `accelerate launch --deepspeed_config_file` as an
absolute path, so a job submitted from any directory finds it.
User values reach the script only shell-quoted (shlex.quote) or after validation, and sbatch is run
with an argument list, never through a shell.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "train.sbatch"
ACCELERATE_CONFIGS = REPO / "trainer" / "accelerate"

# dotted key (list items by index: model.stages.1.loss) = any value
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*=.*", re.DOTALL)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
# minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"[0-9]+(-[0-9]{1,2})?(:[0-9]{1,2}){0,2}")
# paths that go into #SBATCH lines: sbatch does not parse quotes there, and expands %j etc.
_HEADER_PATH = re.compile(r"/[A-Za-z0-9_./+-]*")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class SubmitError(ValueError):
    """A bad setting; the message says what to change."""


@dataclass
class Job:
    """Everything the template needs, validated."""

    config: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: int | None = None  # None: = gpus_per_node
    cpus_per_task: int | None = None  # None: 4 per GPU, or 1 per CPU process
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None  # None: nstage-<config name>
    accelerate_config: str | None = None  # a name in trainer/accelerate/ or a path; None: DDP
    warn_seconds: int = 90
    workdir: Path = field(default_factory=Path.cwd)

    def __post_init__(self):
        if not self.config or any(c in self.config for c in "\n\r\0"):
            raise SubmitError(f"--config {self.config!r}: give a preset name or a config file path")
        for o in self.overrides:
            if not _OVERRIDE.fullmatch(o) or "\0" in o:
                raise SubmitError(f"override {o!r} is not key=value (for example train.max_steps=200)")
        if self.nodes < 1:
            raise SubmitError(f"--nodes {self.nodes}: needs at least 1 node")
        if self.gpus_per_node < 0:
            raise SubmitError(f"--gpus-per-node {self.gpus_per_node}: must be >= 0 (0 = CPU variant)")
        if self.gpus_per_node == 0 and self.procs_per_node is None:
            raise SubmitError("--gpus-per-node 0 (CPU variant) needs --procs-per-node P, the CPU processes per node")
        if self.procs_per_node is None:
            self.procs_per_node = self.gpus_per_node
        if self.procs_per_node < 1:
            raise SubmitError(f"--procs-per-node {self.procs_per_node}: needs at least 1 process per node")
        if self.gpus_per_node and self.procs_per_node != self.gpus_per_node:
            raise SubmitError(
                f"--procs-per-node {self.procs_per_node} with --gpus-per-node {self.gpus_per_node}: "
                "on GPUs there is one process per GPU; leave --procs-per-node out"
            )
        if self.cpus_per_task is None:
            self.cpus_per_task = 4 * self.gpus_per_node if self.gpus_per_node else self.procs_per_node
        if self.cpus_per_task < 1:
            raise SubmitError(f"--cpus-per-task {self.cpus_per_task}: must be >= 1")
        if not _TIME.fullmatch(self.time):
            raise SubmitError(f"--time {self.time!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
        if self.partition is not None and not _PARTITION.fullmatch(self.partition):
            raise SubmitError(f"--partition {self.partition!r}: letters, digits, '_.-' (comma-separated list)")
        if self.account is not None and not _NAME.fullmatch(self.account):
            raise SubmitError(f"--account {self.account!r}: letters, digits and '_.-' only")
        if self.job_name is None:
            self.job_name = "nstage-" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.config_name)
        if not _NAME.fullmatch(self.job_name):
            raise SubmitError(f"--job-name {self.job_name!r}: letters, digits and '_.-' only")
        if self.warn_seconds < 10:
            raise SubmitError(f"--warn-seconds {self.warn_seconds}: give the trainer at least 10 s to checkpoint")
        self.workdir = Path(self.workdir).resolve()
        _check_header_path(self.workdir, "the working directory")
        _check_header_path(self.run_dir, "run.dir")

    @property
    def config_name(self) -> str:
        """`mnist` for a preset name, the file stem for a config path (configs/foo.yaml -> foo)."""
        c = self.config
        return Path(c).stem if ("/" in c or c.endswith((".yaml", ".yml"))) else c

    @property
    def run_dir(self) -> Path:
        """run.dir from the overrides (last one wins), else runs/<config name>; absolute."""
        given = [o.split("=", 1)[1] for o in self.overrides if o.split("=", 1)[0] == "run.dir"]
        run_dir = Path(given[-1]) if given else Path("runs") / self.config_name
        return run_dir if run_dir.is_absolute() else (self.workdir / run_dir).resolve()

    @property
    def train_args(self) -> list[str]:
        """The trainer's arguments: --config, the overrides, and the absolute run.dir last."""
        kept = [o for o in self.overrides if o.split("=", 1)[0] != "run.dir"]
        return ["--config", self.config, *kept, f"run.dir={self.run_dir}"]

    def accelerate_config_path(self) -> Path | None:
        c = self.accelerate_config
        if not c:
            return None
        path = Path(c) if ("/" in c or c.endswith((".yaml", ".yml", ".json"))) else ACCELERATE_CONFIGS / f"{c}.yaml"
        path = path if path.is_absolute() else (self.workdir / path).resolve()
        if not path.is_file():
            have = sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")) if ACCELERATE_CONFIGS.is_dir() else []
            raise SubmitError(f"accelerate config {c!r} not found at {path}; names in {ACCELERATE_CONFIGS}: {have}")
        return path


def deepspeed_config_file(accelerate_config: Path, workdir: Path) -> Path | None:
    """The DeepSpeed JSON that an accelerate YAML names (deepspeed_config.deepspeed_config_file), absolute.

    A relative path is looked up where accelerate itself would look, the job's working directory, then
    in the repository root, which the packaged trainer/accelerate/zero*.yaml are written against.
    None when the YAML names no such file (DDP, or DeepSpeed settings inline in the YAML).
    """
    try:
        settings = yaml.safe_load(accelerate_config.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SubmitError(f"cannot read accelerate config {accelerate_config}: {e}") from None
    ds = settings.get("deepspeed_config") if isinstance(settings, dict) else None
    name = ds.get("deepspeed_config_file") if isinstance(ds, dict) else None
    if not name:
        return None
    path = Path(str(name))
    candidates = [path] if path.is_absolute() else [workdir / path, REPO / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise SubmitError(f"{accelerate_config} names deepspeed_config_file {str(name)!r}, which is not at "
                      f"{' or '.join(str(c) for c in candidates)}; fix that path in the YAML (an absolute path is safest)")


def _check_header_path(path: Path, what: str) -> None:
    if not _HEADER_PATH.fullmatch(str(path)):
        raise SubmitError(
            f"{what} {str(path)!r} must consist of letters, digits and '_./+-' only: it goes into an #SBATCH line, "
            "where sbatch neither parses quotes nor leaves '%' alone. Choose another run.dir or directory."
        )


def _accelerate_executable() -> str:
    """The `accelerate` of the interpreter running this (the environment the job will use)."""
    local = Path(sys.executable).parent / "accelerate"
    found = str(local) if local.is_file() else shutil.which("accelerate")
    if not found:
        raise SubmitError("no `accelerate` executable next to this Python or on PATH: pip install accelerate")
    return found


def render(job: Job, template: str | None = None) -> str:
    """The batch script for `job`: the template with every {{placeholder}} filled."""
    template = TEMPLATE.read_text() if template is None else template
    q = shlex.quote
    accel_config = job.accelerate_config_path()
    ds_config = deepspeed_config_file(accel_config, job.workdir) if accel_config else None

    def opt_line(option: str, value) -> str:
        return f"#SBATCH --{option}={value}" if value else f"# (no --{option}: the cluster's default)"

    values = {
        "job_name": job.job_name,
        "nodes": str(job.nodes),
        "gpus_line": opt_line("gpus-per-node", job.gpus_per_node) if job.gpus_per_node
        else "# (CPU variant: no GPUs requested)",
        "cpus_per_task": str(job.cpus_per_task),
        "time": job.time,
        "partition_line": opt_line("partition", job.partition),
        "account_line": opt_line("account", job.account),
        "warn_seconds": str(job.warn_seconds),
        "run_dir": str(job.run_dir),  # validated by _check_header_path: no quoting needed or possible
        "workdir": str(job.workdir),
        "procs_per_node": str(job.procs_per_node),
        "use_cpu": "0" if job.gpus_per_node else "1",
        "accelerate_config": q(str(accel_config)) if accel_config else "''",
        "deepspeed_config_file": q(str(ds_config)) if ds_config else "''",
        "accelerate": q(_accelerate_executable()),
        "python": q(sys.executable),
        "train_script": q(str(REPO / "trainer" / "run.py")),
        "train_args": " ".join(q(a) for a in job.train_args),
        "after_step": q(str(REPO / "slurm" / "requeue.py")),
    }

    def fill(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {{{{{m.group(1)}}}}} has no value")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(fill, template)


def submit(job: Job, script: str) -> str:
    """Write <run.dir>/train.sbatch (the log directory must exist before sbatch) and sbatch it; the job id."""
    if not shutil.which("sbatch"):
        raise SubmitError("sbatch not found: run this on a SLURM login node (or start slurm/local_cluster.sh)")
    trainer = Path(os.environ.get("NSTAGE_TRAIN_SCRIPT") or REPO / "trainer" / "run.py")
    if not trainer.is_file():
        raise SubmitError(f"trainer script {trainer} not found")
    job.run_dir.mkdir(parents=True, exist_ok=True)
    path = job.run_dir / "train.sbatch"
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, cwd=job.workdir)
    if done.returncode != 0:
        raise SubmitError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
    job_id = done.stdout.strip().split(";")[0]  # --parsable prints <id>[;<cluster>]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed no job id: {done.stdout!r}")
    return job_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m slurm.submit", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--config", required=True, help="trainer preset name or config file path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides, e.g. train.max_steps=200")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node; 0 = CPU variant")
    p.add_argument("--procs-per-node", type=int, help="processes per node (CPU variant; default = GPUs per node)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per node's task (default 4 per GPU, or 1 per CPU process)")
    p.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    p.add_argument("--partition", help="partition (default: the cluster's)")
    p.add_argument("--account", help="account (default: the cluster's)")
    p.add_argument("--job-name", help="job name (default nstage-<config name>)")
    p.add_argument("--accelerate-config", default=os.environ.get("NSTAGE_ACCELERATE_CONFIG") or None,
                   help="accelerate config: a name in trainer/accelerate/ (zero2) or a path; default DDP "
                        "(or $NSTAGE_ACCELERATE_CONFIG)")
    p.add_argument("--warn-seconds", type=int, default=90,
                   help="early-warning signal this many seconds before the time limit (default 90)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = Job(
            config=args.config, overrides=args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            procs_per_node=args.procs_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
            partition=args.partition, account=args.account, job_name=args.job_name,
            accelerate_config=args.accelerate_config, warn_seconds=args.warn_seconds,
        )
        script = render(job)
        if args.dry_run:
            print(script, end="")
            return 0
        job_id = submit(job, script)
    except SubmitError as e:
        print(f"slurm.submit: error: {e}", file=sys.stderr)
        return 2
    print(job_id)
    print(f"slurm.submit: job {job_id}, logs in {job.run_dir}/slurm-{job_id}.out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
