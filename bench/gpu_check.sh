#!/usr/bin/env bash
# Accept an install on a GPU machine: one command, no network, about 6-7 minutes on one H200.
#
#   bash bench/gpu_check.sh                    # log: ./gpu_check-<date>-<time>.log
#   bash bench/gpu_check.sh /tmp/check.log     # log where you like
#
# What it runs, all of it printed to the terminal and written to the one log file:
#   1. the GPUs (nvidia-smi, then name, memory and driver as CSV) and the versions of python, torch,
#      CUDA, cuDNN, accelerate, deepspeed, webdataset and omegaconf;
#   2. the GPU test suite, `python -m pytest -m gpu tests/gpu -v -rA --durations=15` (about 2-4 minutes):
#      bf16, fp16 with a real loss-scale overflow, the adversarial refiner in bf16 and fp16, DeepSpeed
#      ZeRO-1/2/3 (bf16) and exporting a ZeRO-3 checkpoint, torch.compile, SyncBatchNorm, SIGTERM then
#      resume against uninterrupted runs (it prints the measured run-to-run noise), train.sync_free and
#      train.cuda_graph (captured steps: within that noise, a NaN step skipped inside the replay, a second
#      capture at adv.start, with torch.compile), sampling, evaluation under accelerate launch, the loop
#      benchmark;
#      with 2 GPUs also DDP parity, ZeRO-2 on 2 processes and SyncBatchNorm across GPUs (else skipped,
#      with the reason). Its runs are tiny models on synthetic data, several at a time on the GPU;
#   3. the training benchmark `python bench/train.py --config celeba128 --batch 32 --device cuda
#      --mixed-precision bf16 --channels-last --sync-free --cuda-graph --shards` (images/s and model FLOP
#      utilisation of the hand-written, plain and our loops; ours with train.sync_free=true and with
#      train.cuda_graph=true beside ours; ours on shards it writes, with 8 loader workers, against ours on
#      the synthetic stream; about 4 minutes). GPU_CHECK_BENCH_ARGS="--adv" adds the adversarial
#      refiner's cost per step (two more loops, one compiled).
#
# Exit status: 0 when every test passed (2-GPU tests skipped on one GPU) and the benchmark ran; else
# non-zero (the suite's status if it failed, else the benchmark's; 124 means a time limit was reached).
# No CUDA GPU visible to torch: it stops after the versions, with status 2.
#
# Runs from the repository without `pip install`: the repository is put on PYTHONPATH (an existing
# PYTHONPATH is kept after it). Python: $PYTHON, else `python` if there is one, else `python3`.
# Time limits (seconds): GPU_CHECK_TEST_TIMEOUT (default 300), GPU_CHECK_BENCH_TIMEOUT (default 300).
# GPU_CHECK_BENCH_ARGS: extra arguments for the benchmark (e.g. "--modes eager" to skip its compiled loops).
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
LOG=${1:-gpu_check-$(date +%Y%m%d-%H%M%S).log}
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-300}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-300}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset NSTAGE_GPU_TESTS_ON_CPU  # the suite's CPU dry run (a development aid) must not stand in for the GPU
: > "$LOG" || exit 2

say() { printf '%s\n' "$*" | tee -a "$LOG"; }

# step NAME COMMAND...: the command's output to the terminal and the log; returns the command's status
# (PIPESTATUS[0]: tee's own status would hide it).
step() {
    local name=$1 start=$SECONDS rc
    shift
    say ""
    say "=== $name: $*"
    "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "=== $name: exit $rc after $((SECONDS - start)) s"
    return "$rc"
}

GIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
say "nstage-vae GPU check, $(date -Is), $(hostname), repository $REPO (git $GIT)"
say "log: $LOG"

if command -v nvidia-smi >/dev/null 2>&1; then
    step "nvidia-smi" nvidia-smi
    step "GPUs" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
    say "nvidia-smi: not found on PATH"
fi

step "versions" "$PYTHON" - <<'EOF'
import importlib.metadata as md
import sys

print(f"python {sys.version.split()[0]} ({sys.executable})")
for pkg in ("torch", "accelerate", "deepspeed", "webdataset", "omegaconf", "safetensors", "pytest", "pytest-timeout"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg} NOT INSTALLED")
import torch

print(f"torch CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"cuda available {torch.cuda.is_available()}, devices {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
if torch.cuda.is_available():
    print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
sys.exit(0 if torch.cuda.is_available() else 2)
EOF
rc=$?
if [ "$rc" -ne 0 ]; then
    say "FAILED: torch sees no CUDA GPU (or could not be imported); nothing to check. Log: $LOG"
    exit 2
fi

step "GPU tests" timeout -k 30 "$TEST_TIMEOUT" \
    "$PYTHON" -m pytest -m gpu tests/gpu -v -rA --durations=15 -p no:cacheprovider
tests_rc=$?

step "training benchmark" timeout -k 15 "$BENCH_TIMEOUT" "$PYTHON" bench/train.py --config celeba128 --batch 32 \
    --device cuda --mixed-precision bf16 --channels-last --sync-free --cuda-graph --shards ${GPU_CHECK_BENCH_ARGS:-}
bench_rc=$?

say ""
say "tests: $([ "$tests_rc" -eq 0 ] && echo passed || echo "FAILED (exit $tests_rc)");" \
    "benchmark: $([ "$bench_rc" -eq 0 ] && echo ran || echo "FAILED (exit $bench_rc)"); total ${SECONDS} s; log: $LOG"
[ "$tests_rc" -ne 0 ] && exit "$tests_rc"
exit "$bench_rc"
