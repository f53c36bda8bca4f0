#!/usr/bin/env bash
# The GPU check (shared GPU.md): build, GPU tests, benchmarks in one run of under 8 minutes.
#   bash scripts/gpu_check.sh OUT_DIR [STAGE]    (on the device machine: bash scripts/gpu_check.sh "$OUT")
# STAGE (each under 8 minutes; a 15-minute device session fits two or three, in this order of need), or several
# joined by commas (core,ops) run in that order in one call under one budget (GPU_CHECK_BUDGET_S, default 465 s):
#   core       (default) build csrc, pytest -m gpu, latency gate, the CUDA / Triton group_norm_act timings (unless
#              ops is joined), throughput --quick with its torch.compile rows
#   ops        per-op benchmarks of the Triton and CUDA kernels against eager and torch.compile (kernel issues)
#   sct        the finite-difference JVP accuracy table and the continuous-time step benchmark (sCT issue)
#   reference  the Fashion-MNIST reference runs (EDM, CD, CT, iCT, sCT) and the shipped model's export; needs the
#              data carried along: here `mkdir -p data && cp -r /usr/share/datasets/fashion-mnist data/`, and the
#              device call names `data` in carry
# Environment: GPU_CHECK_BUDGET_S (whole run), GPU_CHECK_THROUGHPUT_COMPILE_S (240), GPU_CHECK_OPS_COMPILE_S (170; 0 =
# no per-op compile rows), GPU_CHECK_SCT_BUDGET_MS (2000 per bench_sct row), GPU_CHECK_PYTEST_SELECT (core's GPU tests:
# files / pytest arguments; default all), GPU_CHECK_CUDA_GRAPH (1: the reference runs train with --cuda-graph).
# The H100 session (two calls, 806 s of device time with the start and transfers): core with GPU_CHECK_BUDGET_S=445 and
# GPU_CHECK_THROUGHPUT_COMPILE_S=230 (344 s), then ops,sct with 460 / 85 / 800 (426 s). The fourth H200 session (893
# s with the start): core,ops with 450 / 170 / 0 (pytest-gpu 160 s, throughput 133 s whose compile rows the old
# whole-run budget skipped, per-op benchmarks cut by the budget), then ops alone with 215 / 0 (93 s, warm machine).
# (Those budgets predate two changes: the throughput compile budget now counts the compile rows' own time, so the
# rows before them come on top, and the latency gate runs before throughput, which the budget cuts instead.)
# The fifth H200 session (799 s of device time with the start): core with GPU_CHECK_BUDGET_S=375,
# GPU_CHECK_THROUGHPUT_COMPILE_S=150 and GPU_CHECK_PYTEST_SELECT naming the kernel, sampler, sCM, editing and metric
# test files (347 s; the throughput compile rows were skipped, since reordered), then reference with 475 (376 s).
# Next GPU session (planned in stop 32, which had none; stop 33 added tests/test_functorch_gpu.py, stop 34
# tests/test_cuda_graph_gpu.py, stop 35 tests/test_sync_free_gpu.py and tests/test_gn_param_grads.py): core with
# GPU_CHECK_BUDGET_S=380, GPU_CHECK_THROUGHPUT_COMPILE_S=150 and GPU_CHECK_PYTEST_SELECT="tests/test_ops_cuda.py
# tests/test_graphed.py tests/test_train_gpu.py tests/test_functorch_gpu.py tests/test_cuda_graph_gpu.py
# tests/test_sync_free_gpu.py tests/test_gn_param_grads.py tests/test_ops_triton.py" (the rewritten GroupNorm
# forward's GPU tests, the sampler (TrigFlow models too since stop 35), the training loop, the kernels under vmap /
# grad since stop 33's Function rewrite, the captured training step, the eager step's one host sync, the GroupNorm
# kernels' in-place scale / shift and parameter-gradient kernel of stop 35; the
# core stage also times group_norm_act into cuda-ops.json, and throughput's cmfast-graph rows the captured step),
# then reference on the same warm machine with what is left less 20 s (~420 s: its deadline shortens the four runs
# after the teacher to fit), with GPU_CHECK_CUDA_GRAPH=1 if test_cuda_graph_gpu.py passed in core.
# Writes at most 8 files into OUT_DIR: gpu_check.log and the result files; prints a summary table last.
# Each step has its own time limit so that one slow step cannot eat the others' time; a failed step is reported
# in the summary and the run goes on.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUT_DIR [core|ops|sct|reference]}"
STAGE="${2:-core}"
IFS=, read -r -a STAGES <<< "$STAGE"
[ "${#STAGES[@]}" -gt 0 ] || STAGES=("")
for st in "${STAGES[@]}"; do
    case "$st" in core|ops|sct|reference) ;; *) echo "gpu_check: unknown stage '$st' (core, ops, sct, reference)" >&2; exit 2;; esac
done
has_stage() { local st; for st in "${STAGES[@]}"; do [ "$st" = "$1" ] && return 0; done; return 1; }
# Time budgets of the torch.compile rows inside the benchmarks (overridable so that joined stages fit one call).
THROUGHPUT_COMPILE_S="${GPU_CHECK_THROUGHPUT_COMPILE_S:-240}"
OPS_COMPILE_S="${GPU_CHECK_OPS_COMPILE_S:-170}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
: > "$LOG"
declare -a SUMMARY=()

BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"   # the whole script stays under 8 minutes (GPU.md)

run() {  # run NAME LIMIT_S CMD...: timed, logged, summarized; the limit shrinks to what is left of the budget
    local name="$1" limit="$2"; shift 2
    local left=$((BUDGET_S - SECONDS - 5))
    if [ "$left" -lt 10 ]; then
        SUMMARY+=("$(printf '%-22s skipped (time budget spent)' "$name")")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "==== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    tail -n 25 "$LOG" | sed 's/^/    /'
    SUMMARY+=("$(printf '%-22s rc=%-4s %4ss' "$name" "$rc" "$dt")")
}

# 1. Machine and versions.
run env 15 bash -c 'nvidia-smi -L; python -c "import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())"'

# 2. Install (editable: maps kernels/ to cmfast.kernels; no build there), then build csrc/ into the JIT cache and
#    print the build time.
CMFAST_BUILD_CUDA=0 run install 40 python -m pip install -q --no-deps --no-build-isolation -e .
# Every stage: backend auto now picks CUDA kernels for training (the measured table), so the extension is built
# here (10 s on the H200) rather than inside the first timed or time-capped run.
run build-csrc 60 python -m cmfast._build

if has_stage core; then
# 3. Compiled Triton and CUDA kernels (and the GPU paths of the sampler, training, sCM) against float64 references.
#    With pytest-xdist (in the GPU image) 6 workers share the GPU: Triton compiles one kernel at a time per process,
#    so the workers compile in parallel, and a test that kills its process (an illegal address) costs one worker.
#    The first H200 run took 45 s; the cmfast-train --compile GPU tests (inductor compiles) are new since.
XDIST=""
python -c "import xdist" 2>/dev/null && XDIST="-n 6"
# GPU_CHECK_PYTEST_SELECT (space-separated test files or pytest arguments, no quoting) narrows the GPU tests to
# those of the code changed since the last full run, so that core and reference fit one 15-minute session (two calls
# of under 10 minutes); empty: all of them.
read -r -a SELECT <<< "${GPU_CHECK_PYTEST_SELECT:-}"
CMFAST_TRITON_AUTOTUNE=0 run pytest-gpu 180 python -m pytest -m gpu -q --maxfail=20 -p no:cacheprovider $XDIST \
    --ignore=benchmarks/test_latency.py -o addopts="" -rfE --durations=15 "${SELECT[@]}"

# 4. The latency gate (about 25 s) before the headline benchmark, which ends when the budget does: run after it,
#    the gate was skipped whenever the throughput rows used up the budget (the default budgets did).
run latency-gate 60 python -m pytest benchmarks/test_latency.py -m gpu -q -p no:cacheprovider -o addopts="" \
    --benchmark-enable --benchmark-json="$OUT/latency.json"
# rc 1: slower than the committed baseline of this device; 2: no latency run to read; 3: no baseline for this device
# (not gated: commit the one written to OUT)
run regress 10 python benchmarks/regress.py compare "$OUT/latency.json" --write-baseline "$OUT"

# 4b. The group_norm_act forward and backward, CUDA against Triton and eager (no compile rows, ~15 s): issue 5's goal
#     at batch 1 and 8, timed on every core run since the one-launch forward was rewritten (stop 32: registers, one
#     read of the group). Into cuda-ops.json, which the ops stage, when joined, writes whole (and this step is left
#     out then).
has_stage ops || run bench-gn-cuda 45 python benchmarks/bench_cuda.py --quick --ops group_norm_act --no-compile \
    --out "$OUT/cuda-ops.json"

# 5. The headline benchmark (the ceilings, copy bandwidth and bf16 matmul, are measured inside it): batch 1 and 256,
#    the CT step at 256: the sampling rows (eager / cmfast / cmfast-auto, then torch.compile's), then the training
#    rows (the compiled one last); the compile rows share their budget (the time spent in them). The rows before the
#    compile rows took 44 s in the first H200 run, 133 s in the fourth and ~170 s in the fifth, with the training
#    and fmnist-small rows then still before them: that run reached no compile row. It writes its JSON
#    after every row: a run cut by the budget keeps the rows it measured. (Integer seconds in the budgets.)
#    --deadline-s: the step's own limit (what is left of the budget) less a margin, so that rows which would run into
#    it are skipped and the JSON ends complete; cut by the limit's SIGINT it said complete: false, which
#    benchmarks/make_tables.py leaves out of the README.
TP_LIMIT=$((THROUGHPUT_COMPILE_S + 140))
TP_LEFT=$((BUDGET_S - SECONDS - 5))
[ "$TP_LIMIT" -gt "$TP_LEFT" ] && TP_LIMIT=$TP_LEFT
run throughput "$TP_LIMIT" python benchmarks/throughput.py --quick --budget-s "$THROUGHPUT_COMPILE_S" \
    --deadline-s "$((TP_LIMIT > 25 ? TP_LIMIT - 15 : 10))" --out "$OUT/throughput-quick.json"
fi

if has_stage ops; then
# 3. Per-op: every kernel against eager and torch.compile of the same torch composition (without compile rows the
#    first H200 run took 15 s and 18 s); compile rows stop at each script's --budget-s, the JSON says how many.
run bench-triton-ops $((OPS_COMPILE_S + 40)) python benchmarks/bench_ops.py --quick --budget-s "$OPS_COMPILE_S" \
    --out "$OUT/triton-ops.json"
run bench-cuda-ops $((OPS_COMPILE_S + 60)) python benchmarks/bench_cuda.py --quick --budget-s "$OPS_COMPILE_S" \
    --out "$OUT/cuda-ops.json"
fi

if has_stage sct; then
# 3. The tangent's error per (precision, eps, order) on DDPM++ CIFAR-10 against an fp64 JVP, then the step benchmark.
#    The first H200 run took 45 s and 145 s; the 4-point rows (15 accuracy rows, 4 step rows) add an estimated
#    20 s and 25-50 s.
run fd-jvp-accuracy 150 python benchmarks/fd_jvp_accuracy.py --out "$OUT/fd_jvp_accuracy.json"
run bench-sct 280 python benchmarks/bench_sct.py --budget-ms "${GPU_CHECK_SCT_BUDGET_MS:-2000}" --out "$OUT/bench_sct.json"
fi

if has_stage reference; then
# 3. Five training runs (each capped by --time-limit) scored with FD-FMNIST, and the best 1-step model exported.
#    Side by side (--parallel: edm alone, then cd, ct, ict, sct at once; the step is host-bound, so one run leaves
#    the GPU idle half the time or more) unless GPU_CHECK_REFERENCE_PARALLEL=0 (one after another).
PARALLEL=(--parallel)
[ "${GPU_CHECK_REFERENCE_PARALLEL:-1}" = "0" ] && PARALLEL=()
# GPU_CHECK_CUDA_GRAPH=1: the runs train with cmfast-train --cuda-graph (each step replayed as one CUDA graph;
# tests/test_cuda_graph_gpu.py in the core stage checks it first). Off by default until a GPU has run it.
CUDA_GRAPH=()
[ "${GPU_CHECK_CUDA_GRAPH:-0}" = "1" ] && CUDA_GRAPH=(--cuda-graph)
# --deadline-s (its limit, what is left of the budget, less 10 s): cd, started when the teacher ends, gets the cap
# that still leaves time for its scores, the rates and the export.
REF_LIMIT=440
REF_LEFT=$((BUDGET_S - SECONDS - 5))
[ "$REF_LIMIT" -gt "$REF_LEFT" ] && REF_LIMIT=$REF_LEFT
run reference-runs "$REF_LIMIT" python scripts/reference_runs.py --profile "${GPU_CHECK_REFERENCE_PROFILE:-gpu}" \
    --out /tmp/cmfast-ref --data-dir data "${PARALLEL[@]}" "${CUDA_GRAPH[@]}" --deadline-s "$((REF_LIMIT > 20 ? REF_LIMIT - 10 : 10))" \
    --results "$OUT/reference_runs.json" --export fmnist --export-dir "$OUT"
fi

# 5. Summary.
echo
echo "==== summary (log: $LOG)"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
ls -l "$OUT"
