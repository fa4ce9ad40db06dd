"""Atomic, resumable checkpoints: `run.dir/checkpoints/step-{N:07d}/` with a `COMMITTED` marker written last.

Layout of one checkpoint:
- what `accelerator.save_state` writes: model, optimizer, GradScaler (fp16), accelerate's RNG states,
  or DeepSpeed's ZeRO shards;
- `trainer_state.json`: step counters, world size, the config name (JSON);
- `ema.safetensors`: the EMA weights (safetensors);
- `data_rank{r}.json`: each rank's data-stream position (JSON);
- `config.yaml`: the resolved config, so a checkpoint can be exported on its own;
- `COMMITTED`: written last, after everything else is fsynced and the folder renamed into place.

Our own state is JSON or safetensors. Accelerate's and DeepSpeed's parts are loaded with
unpickled by those libraries when loading, so resuming trusts the run directory; exported
weights (`trainer.export`) never need pickle.

Commit protocol: every rank writes into `.tmp-step-N` (a name that never matches `step-*`), all
ranks fsync and meet at a barrier, then the main process renames the folder to `step-N`, fsyncs
the parent and writes `COMMITTED`. A folder without the marker is ignored on resume and removed by
the next save. Retention runs only after the new checkpoint is committed.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

STEP_RE = re.compile(r"^step-(\d{7,})$")
MARKER = "COMMITTED"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def committed_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every committed checkpoint, oldest first."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    ckpts = committed_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            _fsync_path(os.path.join(root, f))
        _fsync_path(root)


def write_json(path: str, obj) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator, run_dir: str, step: int, *, trainer_state: dict, ema: dict | None,
                    stream_state: dict, config_yaml: str, keep: int) -> str:
    """Collective: every rank calls it. Returns the committed folder."""
    from safetensors.torch import save_file

    root = checkpoint_dir(run_dir)
    final = os.path.join(root, f"step-{step:07d}")
    tmp = os.path.join(root, f".tmp-step-{step:07d}")
    if os.path.isfile(os.path.join(final, MARKER)):
        # Resumed at this very step (a rerun after the end): nothing changed since that commit, and
        # deleting it before a replacement is committed could leave no checkpoint at all.
        return final
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for stale in (tmp, final):  # a half-written or uncommitted folder from a killed save
            if os.path.exists(stale):
                shutil.rmtree(stale)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()

    accelerator.save_state(tmp)
    write_json(os.path.join(tmp, f"data_rank{accelerator.process_index}.json"), stream_state)
    if accelerator.is_main_process:
        write_json(os.path.join(tmp, "trainer_state.json"), trainer_state)
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(tmp, "ema.safetensors"))
    # Every rank has finished writing before any node walks the folder to fsync it: the folder may be
    # shared between nodes, and a rank's write_json renames its temporary file away during the walk.
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process or accelerator.is_main_process:
        fsync_tree(tmp)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        os.rename(tmp, final)
        _fsync_path(root)
        with open(os.path.join(final, MARKER), "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(final)
        _retain(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _retain(run_dir: str, keep: int) -> None:
    ckpts = committed_checkpoints(run_dir)
    newest = ckpts[-1][0] if ckpts else -1
    for step, path in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    root = checkpoint_dir(run_dir)
    for name in os.listdir(root):  # uncommitted leftovers older than the newest commit
        m = STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and int(m.group(1)) < newest and not os.path.isfile(os.path.join(path, MARKER)):
            shutil.rmtree(path, ignore_errors=True)


def is_deepspeed_checkpoint(path: str) -> bool:
    """DeepSpeed's engine writes its ZeRO shards into a `pytorch_model*` folder; plain accelerate writes files."""
    return any(d.startswith("pytorch_model") and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))


def load_ema(path: str) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file
    f = os.path.join(path, "ema.safetensors")
    return load_file(f) if os.path.isfile(f) else None


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
