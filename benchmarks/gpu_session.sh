#!/usr/bin/env bash
# One GPU session on a lent machine (device tool: runs in the repo root; torch + CUDA, nvcc, ninja; no network):
#
#     bash benchmarks/gpu_session.sh            # results and logs under $OUT (default ./gpu_out)
#
#   1. build the sampling kernels with CUDA (pip install -e . --no-deps --no-build-isolation, LARP_RT_CUDA=1;
#      fallback: setup.py build_ext --inplace), checked with larp_rt.kernels.available()
#   2. pytest -m gpu (tests/test_kernels_gpu.py, tests/test_gpu_fastpath.py, ...)
#   3. benchmarks/bench_gpu.py (fast path vs the authors' loop, floor ratios, decoder TFLOP/s) -> bench_gpu.json
#   4. benchmarks/bench_sampling.py --device cuda -> sampling_gpu.json
#
# Every part runs under `timeout` within a total budget (BUDGET_S, default 540 s = 9 min) and a failing part does
# not stop the others; $OUT/summary.txt lists each part's exit status (124 = timed out). PYTHON picks the
# interpreter (default: the first of python3, python that imports torch); PYLIB, if set, is appended to
# PYTHONPATH (e.g. a carried folder with pytest when the machine's Python has none).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then  # the first interpreter that has torch
    for cand in python3 python; do
        if "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
    done
    PY=${PY:-python3}
fi
BUDGET_S=${BUDGET_S:-540}
START=$(date +%s)
export PYTHONPATH="$PWD${PYLIB:+:$PYLIB}${PYTHONPATH:+:$PYTHONPATH}"
export LARP_RT_CUDA_ARCHS=${LARP_RT_CUDA_ARCHS:-90}  # H100 / H200 (sm_90) only: a faster build
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# part NAME MAX_SECONDS CMD...: run CMD with its output in $OUT/NAME.log, for at most MAX_SECONDS and what is left
part() {
    local name=$1 limit=$2 rem rc t0
    shift 2
    rem=$(( $(left) - 5 ))
    (( rem < limit )) && limit=$rem
    if (( limit < 15 )); then
        echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"
        return 0
    fi
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/session.log"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/session.log"
    return 0
}

{
    echo "date: $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" 2>&1
    command -v nvcc && nvcc --version | tail -n 1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

part build 200 env LARP_RT_CUDA=1 "$PY" -m pip install -e . --no-deps --no-build-isolation
if ! "$PY" -c "import sys, larp_rt.kernels as K; sys.exit(0 if K.available()['cuda'] else 1)" 2>/dev/null; then
    part build_inplace 150 env LARP_RT_CUDA=1 "$PY" setup.py build_ext --inplace
fi
"$PY" -c "import larp_rt.kernels as K, json; print(json.dumps(K.available(), indent=1))" > "$OUT/kernels.json" 2>&1

part pytest_gpu 150 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest_gpu.xml" tests
part bench_gpu 200 "$PY" benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json"
part bench_sampling 90 "$PY" benchmarks/bench_sampling.py --device cuda --out "$OUT/sampling_gpu.json"

echo "total: $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
