#!/usr/bin/env bash
# The prepared GPU check: on a machine with one CUDA GPU and PyTorch, but no OpenMM and no
# package registry, in under 8 minutes:
#   1. the CUDA-marked tests (pytest -m cuda tests/test_torch_energy.py),
#   2. the torch-energy benchmark (batch 256 ... 65,536, float32 and float64),
#   3. the gate and trainer benchmarks,
#   3b. with aa_vacuum_is's data in the cache (make_gpu_cache.py --full aa_vacuum_is): where
#      the time of its training iteration goes, at batch 512 and 2,048 (profile_iteration.py);
#   4. a shortened aa_300_450_gpu experiment (the pipeline's torch energy from the cached
#      system snapshot and data; skipped unless `make_gpu_cache.py --experiment` wrote them);
#   5. with --full NAME: the packaged experiment NAME, unshortened, on the device (its data
#      from `make_gpu_cache.py --full NAME`; time limit --full-limit seconds, default 400).
#      Its run directory is ${TMPDIR:-/tmp}/gpu_check_full/NAME: a run stopped by the limit
#      resumes there on the next call while the machine is the same one (a warm machine
#      keeps its files); --skip-checks leaves steps 1-4 out of that call.
#
# What it needs travels in gpu_cache/ (git-ignored; write it here with
# `python benchmarks/make_gpu_cache.py`, where OpenMM is installed, and carry "gpu_cache").
#
# Usage:
#   bash benchmarks/gpu_check.sh                  # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu     # a dry run here (smaller batches; the
#                                                 # experiment takes minutes on 2 cores)
#   bash benchmarks/gpu_check.sh --full aa_vacuum_is   # steps 1-4, then aa_vacuum_is in full
#   bash benchmarks/gpu_check.sh --skip-checks --full aa_vacuum_is   # ... and where it stopped
# Logs go to $OUT (the device machine's output folder) or ./gpu_check_out.

set -uo pipefail
DEVICE=cuda
FULL=""
FULL_LIMIT=400
CHECKS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --full) FULL="$2"; shift 2 ;;
        --full-limit) FULL_LIMIT="$2"; shift 2 ;;
        --skip-checks) CHECKS=0; shift ;;
        *) echo "unknown argument $1 (usage: gpu_check.sh [--device cuda|cpu] [--skip-checks] [--full NAME [--full-limit SECONDS]])"; exit 2 ;;
    esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
LOGS="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$LOGS"
CACHE="$ROOT/gpu_cache"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 BGFLOW_GATE_GPU_CACHE="$CACHE"
START=$SECONDS
FAILED=0

if [ ! -f "$CACHE/alanine_vacuum.pt" ] || [ ! -f "$CACHE/alanine_implicit.pt" ]; then
    echo "gpu_cache/ is missing: run 'python benchmarks/make_gpu_cache.py' where OpenMM is installed"
    exit 2
fi
# the package from this tree, its missing pure-Python imports from the carried wheels
SITE="$(mktemp -d)"
if ls "$CACHE"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CACHE"/wheels/*.whl || exit 2
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, report
    local name="$1" limit="$2"; shift 2
    echo "=== $name ($(( SECONDS - START )) s elapsed)"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; FAILED=1; }
}

if [ "$DEVICE" = cuda ]; then
    SIZES=256,1024,4096,16384,65536; GATE_SIZES=256,4096,65536; TRAIN_BATCH=1024; EXPERIMENT_LIMIT=120
else
    SIZES=256,1024; GATE_SIZES=256,4096; TRAIN_BATCH=256; EXPERIMENT_LIMIT=600
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

if [ "$CHECKS" -eq 1 ]; then
    step cuda_tests 60 "$PY" -m pytest -q -m cuda -p no:cacheprovider -rs tests/test_torch_energy.py
    step bench_energy 90 "$PY" benchmarks/bench_energy.py --only torch --device "$DEVICE" --cache "$CACHE" --sizes "$SIZES"
    step bench_gate 45 "$PY" benchmarks/bench_gate.py --device "$DEVICE" --sizes "$GATE_SIZES" --repeats 10
    step bench_trainer 60 "$PY" benchmarks/bench_trainer.py --device "$DEVICE" --batch "$TRAIN_BATCH" --iters 20 --repeats 2 --profile 5
    if ls "$CACHE"/data/alanine_vacuum_*.npz >/dev/null 2>&1; then  # make_gpu_cache.py --full aa_vacuum_is
        for BATCH in 512 2048; do  # does a 4x batch cost more per iteration here?
            step "profile_iteration_$BATCH" 40 "$PY" benchmarks/profile_iteration.py --device "$DEVICE" \
                --data-dir "$CACHE/data" --batch "$BATCH" --repeats 3 --iters 3
        done
    fi
    if [ -f "$CACHE/experiments.yaml" ]; then
        RUN="$(mktemp -d)/aa_300_450_gpu"  # the run directory stays here; its summary joins the logs
        step aa_300_450_gpu "$EXPERIMENT_LIMIT" "$PY" -m bgflow_gate.cli train --config "$CACHE/experiments.yaml" \
            --experiment aa_300_450_gpu --device "$DEVICE" --data-dir "$CACHE/data" --out "$RUN"
        cp "$RUN/summary.json" "$LOGS/aa_300_450_gpu_summary.json" 2>/dev/null
    else
        echo "=== aa_300_450_gpu skipped: no gpu_cache/experiments.yaml (make_gpu_cache.py --experiment writes it)"
    fi
fi
if [ -n "$FULL" ]; then
    RUN="${TMPDIR:-/tmp}/gpu_check_full/$FULL"
    RESUME=""
    if [ -d "$RUN" ]; then RESUME="--resume"; echo "=== $FULL: resuming the run in $RUN"; fi
    step "$FULL" "$FULL_LIMIT" "$PY" -m bgflow_gate.cli train --experiment "$FULL" --device "$DEVICE" \
        --data-dir "$CACHE/data" --out "$RUN" $RESUME
    cp "$RUN/summary.json" "$LOGS/${FULL}_summary.json" 2>/dev/null
fi
echo "=== done in $(( SECONDS - START )) s; $([ $FAILED -eq 0 ] && echo 'every step passed' || echo 'some step FAILED')"
exit $FAILED
