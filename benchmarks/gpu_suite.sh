#!/usr/bin/env bash
# The GPU suite for a lent GPU machine (no internet; Python 3.12, torch 2.11, triton 3.6, nvcc), in three
# `run` calls of at most 10 minutes each, back to back so the machine stays warm (a later call then finds
# the extension built by the first and skips the build; on a fresh machine it builds again, ~1-2 min):
#
#   GIT_COMMIT=<commit> bash benchmarks/gpu_suite.sh lease   # ONE call for a 15-minute device budget (below)
#
# or, where a session has 30 minutes of device time, three calls:
#
#   GIT_COMMIT=<commit> bash benchmarks/gpu_suite.sh tests   # env, build, cuda_tests, e2e_tests, tests, overhead
#   GIT_COMMIT=<commit> bash benchmarks/gpu_suite.sh e2e     # build, tests_triton_gemm, end-to-end, timeline
#   GIT_COMMIT=<commit> bash benchmarks/gpu_suite.sh ops     # build, op benchmarks
#
# <commit>: `git describe --always --dirty --abbrev=12` on the development machine (the device machine gets
# the working tree without .git, uncommitted changes included: -dirty says so).
#
#   GIT_COMMIT=... bash benchmarks/gpu_suite.sh profile  # optional 4th call: overhead, timeline and
#                                                        # Nsight Compute per kernel
#   GIT_COMMIT=... bash benchmarks/gpu_suite.sh inductor # issue 20 item 3, one call: whether inductor owns
#                                                        # an op (benchmarks/README.md, next GPU session)
#
# With no argument (or `all`) every step except profile runs in one call, cut by the time budget.
#
# `lease` fits what a drawn session gets now: 15 minutes of device time in all, machine start (1-2 min)
# included, so one 600 s call (`run` with timeout_s=600) and no second start. In order: env, build,
# cuda_tests (issue 9's verdict), e2e_tests (the tests that decide issue 20's defaults: tests/test_cuda_graph.py
# and tests/test_fused_compile.py), e2e (eager / fused / fused+graph at the official per-GPU batches, short
# timing, no timeline; UNIFORMERV2_AUTOTUNE=quick so that cold Triton GEMM autotuning does not eat the step),
# e2e_compile (torch.compile, default mode, of the reference and of the fused model on the Kinetics B/16
# cases), then the other tests, tests_triton_gemm and overhead with what is left. Budget 550 s; caps
# cuda_tests 100 s, e2e_tests 80 s, e2e 120 s, e2e_compile 150 s, tests 200 s (150 s per test),
# tests_triton_gemm 90 s. The summary compares every e2e row with eager and the best compile row.
#
# Steps (each logged with its exit code and seconds; a failing step does not stop the next one):
#   env      nvidia-smi, nvcc, python/torch/triton versions, commit             -> env.txt
#   build    pip install --no-deps --no-build-isolation -e . (builds the CUDA extension for this GPU's
#            arch only; falls back to `setup.py build_ext --inplace`), then the backend status
#   overhead benchmarks/launch_overhead.py: host us per call of the pieces of an op  -> launch_overhead.md
#   cuda_tests   pytest tests/test_cuda_kernels.py tests/test_backends.py (-v, xdist if present)
#   tests        pytest on the other test files (TRITON_INTERPRET unset: Triton runs on the GPU)
#   tests_triton_gemm  the FFN, spatial attention, local MHRA and fused-model tests with the Triton GEMM kernels
#                (UNIFORMERV2_TRITON_GEMM=triton; `tests` runs the default, cuBLAS)
#   timeline benchmarks/profile_kernels.py --timeline over every backend and variant: GPU busy time and the
#            top kernels of one forward+backward per op                          -> timeline.md
#   profile  Nsight Compute over every kernel of one forward+backward per op    -> ncu_kernels.md
#   ops      every benchmarks/bench_<op>.py (not e2e) with $SUITE_OP_ARGS
#   e2e_tests    pytest tests/test_cuda_graph.py tests/test_fused_compile.py (the graphed step, fused+compile)
#   e2e      benchmarks/bench_e2e.py eager + fused + fused-cuda + fused-triton-gemm + fused+graph at the
#            official per-GPU batches, $SUITE_E2E_ARGS, and one profiled step per provider  -> e2e_timeline.md
#   e2e_compile  bench_e2e.py compile (default and max-autotune) + fused+compile (default and reduce-overhead)
#            on every official case (slow: compilation; `lease`: default mode, Kinetics B/16 only)
#   ops_inductor  bench_<op>.py for $SUITE_INDUCTOR_OPS (default ffn,layer_norm,spatial_attention: the ops
#            where torch.compile was ahead or even on the H100) with the rows $SUITE_INDUCTOR_OP_PROVIDERS
#            (default compile, inductor (the op's inductor backend), triton and cuda), $SUITE_OP_ARGS
#   e2e_inductor  bench_e2e.py fused and fused+inductor-ffn training steps at the Kinetics B/16 (32 clips)
#            and L/14 (16 clips) official batches -> e2e_inductor table (rows join e2e.csv)
# (`inductor` runs env, build, ops_inductor, e2e_inductor in one 600 s call: ~6 min on the H100 estimate,
# not measured yet; it does not fit `lease`, whose budget the tests already take to the end)
# Everything finishes inside $SUITE_BUDGET_S (default 560 s, for a 10-minute call): each step gets a
# `timeout` of min(its cap, what is left minus a reserve for the summary). A benchmark cut short keeps the
# rows it measured (<name>.partial.csv).
#
# Output, in "${OUT:-./gpu_out}" (few files, because a lent machine returns at most 8):
#   summary.md            steps with exit codes and times, test summary, every benchmark's table
#   suite.log             the whole log
#   env.txt               machine, versions, commit
#   gpu_suite_results.tar.gz   everything: logs/ (build, tests, one per benchmark), results/ (CSV,
#                              markdown tables, plots; merge into benchmarks/results with
#                              `python benchmarks/harness merge <dir>/results`)
# SUITE_KEEP_FILES=1 also leaves the unpacked tree in $OUT/files.
#
# Environment knobs: SUITE_STEPS (comma list; the defaults per call are in the `case` below), SUITE_BUDGET_S,
# SUITE_OP_ARGS (default "--frames 8 --batch 16 --rep 30 --warmup 5 --mode fwd,fwd+bwd": b16 and l14 at 8
# frames; the first H100 run needed ~90 s per benchmark for that, of a 105 s cap), SUITE_E2E_ARGS
# (default "--rep 1000 --warmup 100"; `lease`: "--rep 100 --warmup 10"), SUITE_TEST_ARGS (extra pytest arguments, shell-quoted:
# '-k "a and b"' works), PYTHON.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"
mkdir -p "$STAGE/logs" "$STAGE/results"
LOG="$OUT/suite.log"
: >"$LOG"
PYTHON="${PYTHON:-python3}"
BUDGET_DEFAULT=560
RESERVE=30
case "${1:-all}" in
    all) DEFAULT_STEPS="env,build,cuda_tests,e2e_tests,tests,overhead,tests_triton_gemm,timeline,ops,e2e,e2e_compile" ;;
    e2e_compile) DEFAULT_STEPS="env,build,e2e_compile" ;;
    tests) DEFAULT_STEPS="env,build,cuda_tests,e2e_tests,tests,overhead" ;;
    ops) DEFAULT_STEPS="env,build,ops" ;;
    e2e) DEFAULT_STEPS="env,build,tests_triton_gemm,e2e,timeline" ;;
    lease) DEFAULT_STEPS="env,build,cuda_tests,e2e_tests,e2e,e2e_compile,tests,tests_triton_gemm,overhead" ;;
    profile) DEFAULT_STEPS="env,build,overhead,timeline,profile" ;;
    inductor) DEFAULT_STEPS="env,build,ops_inductor,e2e_inductor" ;;
    *) echo "usage: $0 [all|lease|tests|ops|e2e|e2e_compile|profile|inductor]" >&2; exit 2 ;;
esac
# step caps (seconds) and the e2e providers; `lease` shrinks them to share one 600 s call
CAP_CUDA_TESTS=300 CAP_E2E_TESTS=240 CAP_TESTS=440 CAP_TRITON_GEMM=240 CAP_E2E=300 CAP_E2E_COMPILE=500
TEST_TIMEOUT=300 E2E_TIMELINE=1 OVERHEAD_REPS=1000
E2E_PROVIDERS="eager,fused,fused-cuda,fused-triton-gemm,fused+graph"
# issue 20: torch.compile of the reference model (both modes: the faster is "compile") and of the fused model
E2E_COMPILE_PROVIDERS="compile,compile-max-autotune,fused+compile,fused+compile-reduce-overhead"
E2E_COMPILE_CONFIGS=""  # every official case
E2E_TEST_FILES="tests/test_cuda_graph.py tests/test_fused_compile.py"
# issue 20 item 3: does inductor own an op (selection.INDUCTOR_DECISION): each op's inductor backend against
# our kernels and torch.compile, then the fused training step with the FFN on inductor against fused
INDUCTOR_OPS="${SUITE_INDUCTOR_OPS:-ffn,layer_norm,spatial_attention}"
INDUCTOR_OP_PROVIDERS="${SUITE_INDUCTOR_OP_PROVIDERS:-compile,inductor,triton,cuda}"
INDUCTOR_E2E_PROVIDERS="fused,fused+inductor-ffn"
INDUCTOR_E2E_CONFIGS="k400_b16_f8x224,k400_l14_f8x224"
if [ "${1:-all}" = lease ]; then
    # the issue-20 comparison runs before the general tests: its decision tests, eager / fused / graph at the
    # official batches, then torch.compile (default mode) of the reference and the fused model on the
    # Kinetics B/16 cases; the tests get the rest of the call
    BUDGET_DEFAULT=550 CAP_CUDA_TESTS=100 CAP_E2E_TESTS=80 CAP_E2E=120 CAP_E2E_COMPILE=150 CAP_TESTS=200
    CAP_TRITON_GEMM=90 TEST_TIMEOUT=150 E2E_TIMELINE=0 OVERHEAD_REPS=300
    E2E_PROVIDERS="eager,fused,fused+graph"  # the default plans and the CUDA graph
    E2E_ARGS_DEFAULT="--rep 100 --warmup 10"
    E2E_COMPILE_PROVIDERS="compile,fused+compile"
    E2E_COMPILE_CONFIGS="k400_b16_f8x224"
    export UNIFORMERV2_AUTOTUNE="${UNIFORMERV2_AUTOTUNE:-quick}"
fi
if [ "${1:-all}" = inductor ]; then
    BUDGET_DEFAULT=550
    E2E_ARGS_DEFAULT="--rep 100 --warmup 10"
    export UNIFORMERV2_AUTOTUNE="${UNIFORMERV2_AUTOTUNE:-quick}"
fi
STEPS=",${SUITE_STEPS:-$DEFAULT_STEPS},"
OP_ARGS="${SUITE_OP_ARGS:---frames 8 --batch 16 --rep 30 --warmup 5 --mode fwd,fwd+bwd}"
E2E_ARGS="${SUITE_E2E_ARGS:-${E2E_ARGS_DEFAULT:---rep 1000 --warmup 100}}"
BUDGET="${SUITE_BUDGET_S:-$BUDGET_DEFAULT}"
DEVICE="${SUITE_DEVICE:-cuda}"  # cpu only to try the script itself on a machine without a GPU
if [ "$DEVICE" = cpu ] && [ -z "${SUITE_E2E_ARGS:-}" ]; then
    # dry run: the tiny model, one timed run, torch.compile through dynamo alone (inductor takes minutes here)
    E2E_ARGS="--configs tiny_k400 --mode fwd --rep 1 --no-flops --compile-backend eager"
    [ -n "$E2E_COMPILE_CONFIGS" ] && E2E_COMPILE_CONFIGS="tiny_k400"
    INDUCTOR_E2E_CONFIGS="tiny_k400"
    [ -z "${SUITE_OP_ARGS:-}" ] && OP_ARGS="--quick --models tiny --mode fwd --rep 1"
fi
START=$SECONDS
STATUS_FILE="$STAGE/steps.tsv"
: >"$STATUS_FILE"
unset TRITON_INTERPRET || true
export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg
if [ -z "${GIT_COMMIT:-}" ]; then
    GIT_COMMIT="$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
fi
export GIT_COMMIT

log() { echo "[gpu_suite $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

want() { [[ "$STEPS" == *",$1,"* ]]; }

# Wheels carried in the repository's ignored .whl/ folder (the machine has no internet), e.g. PyAV for the
# video tests: installed into /tmp/site, first on PYTHONPATH (see benchmarks/README.md)
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$REPO"/.whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
        && log "installed carried wheels: $(cd "$REPO/.whl" && ls ./*.whl | tr '\n' ' ')" \
        || log "WARNING: the carried wheels in .whl/ did not install"
fi

# run_step NAME CAP_SECONDS COMMAND...: runs with a timeout, output to logs/NAME.log and the suite log.
run_step() {
    local name="$1" cap="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    if [ "$left" -lt 10 ]; then
        log "SKIP $name: time budget spent"
        printf '%s\t%s\t%s\n' "$name" "skipped (budget)" 0 >>"$STATUS_FILE"
        return 0
    fi
    local limit=$((cap < left ? cap : left))
    log "START $name (limit ${limit}s): $*"
    local t0=$SECONDS rc=0
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$STAGE/logs/$name.log" 2>&1 || rc=$?
    cat "$STAGE/logs/$name.log" >>"$LOG"
    local secs=$((SECONDS - t0))
    local what="rc=$rc"
    [ "$rc" -eq 124 ] && what="rc=124 (timed out after ${limit}s)"
    log "END $name: $what, ${secs}s"
    printf '%s\t%s\t%s\n' "$name" "$what" "$secs" >>"$STATUS_FILE"
    return 0
}

# ---------------------------------------------------------------------------------------------- env
if want env; then
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $GIT_COMMIT"
        echo "host: $(hostname)"
        echo "--- nvidia-smi"
        nvidia-smi 2>&1 || echo "nvidia-smi failed"
        nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
        echo "--- nvcc"
        nvcc --version 2>&1 || echo "no nvcc on PATH"
        # the host compilers the extension build uses, and the C++ runtime Python loads: the first H100 run
        # crashed (SIGSEGV) formatting a TORCH_CHECK message, with /opt/gcc as the host compiler
        echo "--- host compilers"
        for cc in "${CC:-gcc}" "${CXX:-g++}" /opt/gcc/bin/gcc; do
            command -v "$cc" >/dev/null 2>&1 && echo "$cc: $(command -v "$cc"): $("$cc" --version 2>&1 | head -1)"
        done
        "$PYTHON" -c "import torch.utils.cpp_extension as c; print('torch picks', c.get_cxx_compiler())" 2>&1 || true
        ldconfig -p 2>/dev/null | grep 'libstdc++.so.6 ' | head -3 || true
        echo "--- python"
        "$PYTHON" - <<'EOF' 2>&1 || true
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable", e)
try:
    import xformers; print("xformers", xformers.__version__)
except Exception as e:
    print("xformers: not importable", type(e).__name__)
EOF
        echo "--- pip list (selected)"
        "$PYTHON" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|xformers|numpy|matplotlib|pytest|ninja|setuptools) ' || true
    } >"$STAGE/env.txt" 2>&1
    cp "$STAGE/env.txt" "$OUT/env.txt"
    cat "$STAGE/env.txt" >>"$LOG"
    printf '%s\t%s\t%s\n' env "rc=0" 0 >>"$STATUS_FILE"
fi

# -------------------------------------------------------------------------------------------- build
if want build; then
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # this GPU only: half the compile time of the default two
        cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ' || true)"
        case "$cap" in
            9.0) export TORCH_CUDA_ARCH_LIST="9.0a" ;;
            "") ;;
            *) export TORCH_CUDA_ARCH_LIST="$cap" ;;
        esac
    fi
    log "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}"
    # (python -c, not heredocs: `export -f` does not carry a heredoc inside a function to the child bash)
    build() {
        # A later call on the same (still warm) machine finds the extension of an earlier call: the build
        # info records torch, the archs and a digest of csrc/, so an up-to-date one is kept.
        if PYTHONPATH="$PWD" "$PYTHON" -c "$BUILD_IS_CURRENT"; then
            echo "the CUDA extension is already built from these sources for this torch and arch: build skipped"
        else
            UNIFORMERV2_BUILD_CUDA=1 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -v -e . ||
                { echo "pip install -e failed; trying setup.py build_ext --inplace"; \
                  UNIFORMERV2_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace; }
        fi
        PYTHONPATH="$PWD" "$PYTHON" -c "$BUILD_STATUS"
    }
    BUILD_IS_CURRENT='
import os, sys
from uniformerv2_kernels import backends
want = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
sys.exit(0 if backends.cuda_extension_error() is None and want in ("", backends.build_info().get("ARCH_LIST")) else 1)
'
    BUILD_STATUS='
from uniformerv2_kernels import backends
print("build info:", backends.build_info())
for name, reasons in backends.status().items():
    print(name + ": " + ("available" if not reasons else "; ".join(reasons)))
err = backends.cuda_extension_error()
if err:
    raise SystemExit(f"CUDA extension unusable: {err}")
'
    export BUILD_IS_CURRENT BUILD_STATUS
    export -f build
    export PYTHON
    run_step build 240 bash -c build
    # the package must import even when the build step failed: run from the checkout
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    if "$PYTHON" -c "import uniformerv2_kernels.info" >/dev/null 2>&1; then
        "$PYTHON" -m uniformerv2_kernels.info >>"$STAGE/logs/build.log" 2>&1 || true
    fi
    for so in "$REPO"/uniformerv2_kernels/_C*.so; do  # which C++ runtime the extension resolves to
        [ -e "$so" ] || continue
        { echo "--- ldd $so"; ldd "$so" 2>&1 | grep -E 'libstdc|libgcc|not found'; } >>"$STAGE/logs/build.log"
    done
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# -------------------------------------------------------------------------------------------- tests
# -v: one line per finished test, so a step cut by its timeout still says which tests passed and failed
# (the second H100 run's cold-cache `pytest tests` was cut at 420 s with an empty summary)
PYTEST_ARGS="-v -rfEs --durations=15 -p no:cacheprovider -W ignore::DeprecationWarning"
if "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
    PYTEST_ARGS="$PYTEST_ARGS -n 12"  # 16 cores, one GPU: Triton's compiles are CPU-bound
fi
if "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1; then
    PYTEST_ARGS="$PYTEST_ARGS --timeout=$TEST_TIMEOUT"  # a hung test must not eat the whole step
fi
# SUITE_TEST_ARGS is split with the shell's quoting rules, so a -k expression with spaces survives:
# SUITE_TEST_ARGS='-k "attention and not triton_gemm"'
EXTRA_TEST_ARGS=()
if [ -n "${SUITE_TEST_ARGS:-}" ]; then
    eval "EXTRA_TEST_ARGS=(${SUITE_TEST_ARGS})"
fi
if want cuda_tests; then
    # first and on its own: the CUDA kernels' tests decide whether they are verified (issue 9)
    # shellcheck disable=SC2086
    run_step cuda_tests "$CAP_CUDA_TESTS" "$PYTHON" -m pytest tests/test_cuda_kernels.py tests/test_backends.py $PYTEST_ARGS \
        ${EXTRA_TEST_ARGS[@]+"${EXTRA_TEST_ARGS[@]}"}
fi
if want e2e_tests; then
    # the tests that decide issue 20's defaults: the CUDA-graph training step (resume, drop-path masks) and
    # torch.compile of the fused model (inductor), before the comparison they qualify
    # shellcheck disable=SC2086
    run_step e2e_tests "$CAP_E2E_TESTS" "$PYTHON" -m pytest $E2E_TEST_FILES $PYTEST_ARGS \
        ${EXTRA_TEST_ARGS[@]+"${EXTRA_TEST_ARGS[@]}"}
fi

# ------------------------------------------------------------------------------------------- benches
if want ops; then
    for script in benchmarks/bench_*.py; do
        name="$(basename "$script" .py)"
        [ "$name" = bench_e2e ] && continue
        # shellcheck disable=SC2086
        run_step "$name" 105 "$PYTHON" "$script" --device "$DEVICE" --out "$STAGE/results" $OP_ARGS
    done
fi
if want e2e; then
    # shellcheck disable=SC2086
    E2E_TIMELINE_ARGS=()
    [ "$E2E_TIMELINE" = 1 ] && E2E_TIMELINE_ARGS=(--timeline "$STAGE/results/e2e_timeline.md")
    run_step bench_e2e "$CAP_E2E" "$PYTHON" benchmarks/bench_e2e.py --device "$DEVICE" --out "$STAGE/results" \
        --providers "$E2E_PROVIDERS" --mode fwd,fwd+bwd ${E2E_TIMELINE_ARGS[@]+"${E2E_TIMELINE_ARGS[@]}"} $E2E_ARGS
fi
if want ops_inductor; then
    for op in ${INDUCTOR_OPS//,/ }; do
        # shellcheck disable=SC2086
        run_step "bench_${op}_inductor" 110 "$PYTHON" "benchmarks/bench_${op}.py" --device "$DEVICE" \
            --out "$STAGE/results" --providers "$INDUCTOR_OP_PROVIDERS" $OP_ARGS
    done
fi
if want e2e_inductor; then
    # training steps only (the decision's end-to-end half); the e2e and e2e_compile steps' rows of the same
    # commit join these in the report
    # shellcheck disable=SC2086
    run_step bench_e2e_inductor 240 "$PYTHON" benchmarks/bench_e2e.py --device "$DEVICE" --out "$STAGE/results" \
        --providers "$INDUCTOR_E2E_PROVIDERS" --configs "$INDUCTOR_E2E_CONFIGS" --mode fwd+bwd --table e2e_inductor \
        $E2E_ARGS
fi
if want e2e_compile; then
    # its own table name keeps the e2e step's table; the rows join e2e.csv (the report reads both)
    E2E_COMPILE_CASES=()
    [ -n "$E2E_COMPILE_CONFIGS" ] && E2E_COMPILE_CASES=(--configs "$E2E_COMPILE_CONFIGS")
    # shellcheck disable=SC2086
    run_step bench_e2e_compile "$CAP_E2E_COMPILE" "$PYTHON" benchmarks/bench_e2e.py --device "$DEVICE" \
        --out "$STAGE/results" --providers "$E2E_COMPILE_PROVIDERS" --mode fwd,fwd+bwd --table e2e_compile \
        ${E2E_COMPILE_CASES[@]+"${E2E_COMPILE_CASES[@]}"} $E2E_ARGS
fi

if want tests; then
    TESTS_IGNORE="--ignore=tests/test_cuda_kernels.py --ignore=tests/test_backends.py"
    if want e2e_tests; then  # already run by e2e_tests
        for f in $E2E_TEST_FILES; do TESTS_IGNORE="$TESTS_IGNORE --ignore=$f"; done
    fi
    # shellcheck disable=SC2086
    run_step tests "$CAP_TESTS" "$PYTHON" -m pytest tests $TESTS_IGNORE $PYTEST_ARGS \
        ${EXTRA_TEST_ARGS[@]+"${EXTRA_TEST_ARGS[@]}"}
fi
if want tests_triton_gemm; then
    # the `tests` step runs the default GEMM plan (cuBLAS + a Triton epilogue); this one the Triton GEMM
    # kernels (UNIFORMERV2_TRITON_GEMM=triton), kept and timed against it
    # shellcheck disable=SC2086
    run_step tests_triton_gemm "$CAP_TRITON_GEMM" env UNIFORMERV2_TRITON_GEMM=triton "$PYTHON" -m pytest \
        tests/test_ffn.py tests/test_spatial_attention.py tests/test_local_temporal_mhra.py \
        tests/test_fused_model.py $PYTEST_ARGS ${EXTRA_TEST_ARGS[@]+"${EXTRA_TEST_ARGS[@]}"}
fi

if want overhead; then
    # Host time per call (seconds): an ATen op, a Triton launch, a custom op, a Python backward on the
    # autograd device thread, each fused op on tiny inputs, then whole model steps eager vs fused at a tiny
    # width (benchmarks/launch_overhead.py; the per-op table is written before the model steps run)
    OVERHEAD_ARGS="--device cuda --dtype bfloat16 --reps $OVERHEAD_REPS"
    [ "$DEVICE" = cpu ] && OVERHEAD_ARGS="--device cpu --reps 100"  # dry run
    # shellcheck disable=SC2086
    run_step overhead 120 "$PYTHON" benchmarks/launch_overhead.py $OVERHEAD_ARGS \
        --out "$STAGE/results/launch_overhead.md"
fi
if want timeline; then
    # torch.profiler (a minute): per op and per backend / variant (benchmarks/README.md: the variants a GPU
    # run decides between), host launch time vs GPU busy time of one forward+backward, and the top kernels,
    # ATen's and cuBLAS's included
    PROFILED="triton,triton-triton-gemm,cuda"
    TIMELINE_ARGS="--device cuda --dtype bfloat16 --backend $PROFILED"
    [ "$DEVICE" = cpu ] && TIMELINE_ARGS="--interpret --model tiny --frames 3 --batch 2 --dtype float32"  # dry run
    # shellcheck disable=SC2086
    run_step timeline 150 "$PYTHON" benchmarks/profile_kernels.py $TIMELINE_ARGS \
        --timeline "$STAGE/results/timeline.md" ${SUITE_PROFILE_ARGS:-}
fi
if want profile; then
    # Nsight Compute on one forward+backward of every fused op (b16, 8 frames, 16 clips, bf16): DRAM bytes
    # against L2 / L1 bytes per kernel, occupancy, registers (benchmarks/profile_kernels.py)
    NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1 || true)"
    if [ -n "$NCU" ]; then
        # shellcheck disable=SC2046
        run_step profile 300 "$NCU" --csv --print-units base --clock-control none --target-processes all \
            --profile-from-start off --metrics "$("$PYTHON" benchmarks/profile_kernels.py --metrics)" \
            "$PYTHON" benchmarks/profile_kernels.py --device cuda --dtype bfloat16 ${SUITE_PROFILE_ARGS:-}
        "$PYTHON" benchmarks/profile_kernels.py --summarize "$STAGE/logs/profile.log" \
            >"$STAGE/results/ncu_kernels.md" 2>&1 || true
    else
        log "SKIP profile: no ncu found"
        printf '%s\t%s\t%s\n' profile "skipped (no ncu)" 0 >>"$STATUS_FILE"
    fi
fi

# ------------------------------------------------------------------------------------------ summary
{
    echo "# GPU suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $GIT_COMMIT"
    echo
    grep -E '^(device|torch|triton|xformers|python) ' "$STAGE/env.txt" 2>/dev/null | sed 's/^/    /' || true
    echo
    echo "| step | result | seconds |"
    echo "| --- | --- | --- |"
    while IFS=$'\t' read -r name what secs; do echo "| $name | $what | $secs |"; done <"$STATUS_FILE"
    echo
    echo "Total: $((SECONDS - START)) s of a ${BUDGET} s budget."
    for step in cuda_tests tests tests_triton_gemm; do
        [ -f "$STAGE/logs/$step.log" ] || continue
        echo
        echo "## Tests: $step"
        echo
        echo '```'
        # per-test lines (-v) count even when the step was cut by its timeout
        for outcome in PASSED FAILED ERROR SKIPPED; do
            echo "$outcome: $(grep -cE " $outcome( |$)" "$STAGE/logs/$step.log" || true)"
        done
        grep -E ' (FAILED|ERROR) |^(FAILED|ERROR) |^SKIPPED|^=+ .* in [0-9.]+s' "$STAGE/logs/$step.log" \
            | sort -u | tail -60 || true
        echo '```'
    done
    echo
    if [ -f "$STAGE/results/launch_overhead.md" ]; then
        sed 's/^# /## /' "$STAGE/results/launch_overhead.md"
        echo
    fi
    if [ -f "$STAGE/results/e2e_timeline.md" ]; then
        sed 's/^# /## /' "$STAGE/results/e2e_timeline.md"
        echo
    fi
    if [ -f "$STAGE/results/timeline.md" ]; then
        sed 's/^# /## /' "$STAGE/results/timeline.md"
        echo
    fi
    if [ -f "$STAGE/results/ncu_kernels.md" ]; then
        echo "## Nsight Compute, one forward+backward per op (benchmarks/profile_kernels.py)"
        echo
        cat "$STAGE/results/ncu_kernels.md"
        echo
    fi
    shopt -s nullglob
    e2e_csvs=("$STAGE"/results/e2e*.csv)
    if [ ${#e2e_csvs[@]} -gt 0 ]; then
        echo "## End to end against eager and the best torch.compile row (issue 20)"
        echo
        "$PYTHON" benchmarks/bench_e2e.py --device cpu --report "${e2e_csvs[@]}" 2>&1 | sed 's/^## /### /' \
            || echo "(report failed)"
        echo
    fi
    echo "## Benchmarks"
    echo
    csvs=("$STAGE"/results/*.csv)
    if [ ${#csvs[@]} -gt 0 ]; then
        echo "### Variants beside the defaults they may replace (ratio < 1: the variant is faster)"
        echo
        "$PYTHON" benchmarks/harness variants "${csvs[@]}" 2>&1 || echo "(variants failed)"
        echo
        "$PYTHON" benchmarks/harness summarize --all "${csvs[@]}" 2>&1 || echo "(summarize failed)"
    else
        echo "(no benchmark results)"
    fi
} >"$STAGE/summary.md" 2>&1
cp "$STAGE/summary.md" "$OUT/summary.md"
cp "$LOG" "$STAGE/logs/suite.log"
tar -czf "$OUT/gpu_suite_results.tar.gz" -C "$STAGE" logs results summary.md steps.tsv $( [ -f "$STAGE/env.txt" ] && echo env.txt )
if [ "${SUITE_KEEP_FILES:-0}" = 1 ]; then
    mkdir -p "$OUT/files" && cp -r "$STAGE"/. "$OUT/files/"
fi
rm -rf "$STAGE"
log "done in $((SECONDS - START)) s; results in $OUT"
cat "$OUT/summary.md"
