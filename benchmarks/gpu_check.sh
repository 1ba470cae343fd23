#!/usr/bin/env bash
# The one command a session with a lent GPU runs, from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUTDIR]        (default: $OUT if set, else benchmarks/out)
#     DRY_RUN=1 bash benchmarks/gpu_check.sh       the plan and each step's time budget; runs nothing
#     PLAN=full bash benchmarks/gpu_check.sh       the long plan (more than one 10-minute call)
#
# PLAN=quick (the default) fits one short call: at most 480 s of step budgets, 8 minutes on an H100,
# install included, in this order, each step writing its results under OUTDIR as it goes (a step
# stopped by its budget keeps what it finished):
#   device (25 s)        nvidia-smi and the versions: env.txt
#   install (40 s)       pip install --no-deps -e . with CSKD_SKIP_EXTENSION=1: no C++ build (compiling its
#                        9 objects takes a minute or more per file even on 16 cores, and the GPU path runs
#                        the Triton kernels, not the C++ ones; CI tests those): install.log.
#                        BUILD_EXTENSION=1 builds it (then raise INSTALL_TIMEOUT)
#   loss_tests (120 s)   the CUDA tests of the loss path: CSKDLoss (fp32 and bf16, grid and global, also
#                        under CUDA graphs) and its ops (position and channel attention, CKA, cross-Grams,
#                        cell projections, channel Gram, autocast): loss_tests.log (one line per test)
#   loss_bench (120 s)   the CSKDLoss benchmark at the released configuration (grid 5x5), providers
#                        released, triton, triton-graphs: bench.log, results/<device>.csv (after every case)
#   fraction_fp32 (75 s), fraction_bf16 (100 s)   python -m benchmarks.step_fraction --graphs --precision
#                        fp32 / bf16 (batch 8, 512x1024, 2 warm-ups, 5 repeats): step_fraction.log,
#                        step_fraction_{fp32,bf16}.json (written after every timing)
# That is 8 files, what one call brings back.
#
# PLAN=full: device, install (with the C++ extension), tests (every CUDA test), profile, fraction
# (TF32 off and on, the first with --graphs), bench (every benchmark, then the CUDA-graphed loss), tune;
# over 25 minutes of budgets, so split it with STEPS across calls on one warm machine, e.g.
# PLAN=full STEPS="tests profile", then SKIP_INSTALL=1 STEPS="bench", then SKIP_INSTALL=1 STEPS="fraction tune".
# PLAN=<step> runs one step (install first) of either plan; STEPS (space-separated step names)
# overrides the plan's list. A failing step does not stop the others; the exit status is non-zero if
# any step failed; a summary of each step's status and seconds is printed last.
#
# Environment: SKIP_INSTALL=1 (the package is already installed), TESTS_ARGS and BENCH_ARGS (extra
# pytest arguments), CUDA_TESTS_ONLY (default 1: only the tests that run on CUDA, 8 xdist workers when
# pytest-xdist is there; CI runs the CPU ones), BENCH_DEVICE (cuda | cpu | all, default cuda), and the
# budgets in seconds: DEVICE_TIMEOUT, INSTALL_TIMEOUT (quick 40, full 120), LOSS_TESTS_TIMEOUT,
# LOSS_BENCH_TIMEOUT, FRACTION_FP32_TIMEOUT, FRACTION_BF16_TIMEOUT (quick: above); TESTS_TIMEOUT 300,
# PROFILE_TIMEOUT 120 (each of two runs), FRACTION_TIMEOUT 240 (each of two runs), BENCH_TIMEOUT 240,
# GRAPHS_TIMEOUT 180 (the CUDA-graphed loss), TUNE_TIMEOUT 300 (full). Full-plan files: env.txt,
# install.log, tests.log, tests.xml, profile.log, bench.log, bench_graphs.log (and bench_graphs_opaque.log
# should it fail), step_fraction_{highest,high}.{log,json}, tune.{log,json}, results/<device>.csv.

set -u
cd "$(dirname "$0")/.." || exit 2
OUTDIR="${1:-${OUT:-benchmarks/out}}"
PY="${PYTHON:-python3}"
PLAN="${PLAN:-quick}"
FAILED=()
SUMMARY=()
export PYTHONUNBUFFERED=1

QUICK_STEPS="loss_tests loss_bench fraction_fp32 fraction_bf16"
FULL_STEPS="tests profile fraction bench tune"
case "$PLAN" in
  quick) PLAN_STEPS="$QUICK_STEPS" ;;
  full) PLAN_STEPS="$FULL_STEPS" ;;
  *) PLAN_STEPS="$PLAN" ;;
esac
STEPS="${STEPS:-$PLAN_STEPS}"
for name in $STEPS; do
  case " $QUICK_STEPS $FULL_STEPS " in
    *" $name "*) ;;
    *) echo "gpu_check: unknown step '$name' (PLAN=quick, PLAN=full, or steps of: $QUICK_STEPS $FULL_STEPS)" >&2
       exit 2 ;;
  esac
done
wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# The C++ extension: built by the full plan, skipped by the quick one (see the header).
if [ "$PLAN" = quick ]; then BUILD_EXTENSION="${BUILD_EXTENSION:-0}"; else BUILD_EXTENSION="${BUILD_EXTENSION:-1}"; fi
INSTALL_TIMEOUT="${INSTALL_TIMEOUT:-$([ "$BUILD_EXTENSION" = 1 ] && echo 120 || echo 40)}"

# Each step's budget in seconds (the sum of its commands' timeouts).
budget() {
  case "$1" in
    device) echo "${DEVICE_TIMEOUT:-25}" ;;
    install) [ "${SKIP_INSTALL:-0}" = 1 ] && echo 0 || echo "$INSTALL_TIMEOUT" ;;
    loss_tests) echo "${LOSS_TESTS_TIMEOUT:-120}" ;;
    loss_bench) echo "${LOSS_BENCH_TIMEOUT:-120}" ;;
    fraction_fp32) echo "${FRACTION_FP32_TIMEOUT:-75}" ;;
    fraction_bf16) echo "${FRACTION_BF16_TIMEOUT:-100}" ;;
    tests) echo "${TESTS_TIMEOUT:-300}" ;;
    profile) echo $((2 * ${PROFILE_TIMEOUT:-120})) ;;
    fraction) echo $((2 * ${FRACTION_TIMEOUT:-240})) ;;
    bench) echo $((${BENCH_TIMEOUT:-240} + ${GRAPHS_TIMEOUT:-180})) ;;
    tune) echo "${TUNE_TIMEOUT:-300}" ;;
  esac
}
describe() {
  case "$1" in
    device) echo "nvidia-smi, torch / triton versions -> env.txt" ;;
    install) if [ "${SKIP_INSTALL:-0}" = 1 ]; then echo "skipped (SKIP_INSTALL=1)"
             elif [ "$BUILD_EXTENSION" = 1 ]; then echo "pip install -e (C++ extension built, MAX_JOBS=nproc) -> install.log"
             else echo "pip install --no-deps -e . with CSKD_SKIP_EXTENSION=1 (no C++ build) -> install.log"; fi ;;
    loss_tests) echo "CUDA tests of CSKDLoss and its ops, fp32 and bf16, grid and global -> loss_tests.log" ;;
    loss_bench) echo "CSKDLoss benchmark, released config (grid 5x5): released, triton, triton-graphs -> bench.log, results/" ;;
    fraction_fp32) echo "step_fraction --precision fp32 --graphs -> step_fraction.log, step_fraction_fp32.json" ;;
    fraction_bf16) echo "step_fraction --precision bf16 --graphs -> step_fraction.log, step_fraction_bf16.json" ;;
    tests) echo "every CUDA test (pytest tests/) -> tests.log, tests.xml" ;;
    profile) echo "benchmarks.profile_loss, grid and global -> profile.log" ;;
    fraction) echo "step_fraction, matmul precision highest (--graphs) and high -> step_fraction_*.{log,json}" ;;
    bench) echo "every benchmark, then the CUDA-graphed loss -> bench*.log, results/" ;;
    tune) echo "tune_position_attention -> tune.{log,json}" ;;
  esac
}

ORDER="device install"
for name in loss_tests loss_bench fraction_fp32 fraction_bf16 tests profile fraction bench tune; do
  wants "$name" && ORDER="$ORDER $name"
done

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "gpu_check plan $PLAN (steps: $STEPS), output in $OUTDIR; nothing is run (DRY_RUN=1)"
  total=0
  number=0
  for name in $ORDER; do
    number=$((number + 1))
    seconds=$(budget "$name")
    total=$((total + seconds))
    printf 'step %d %-14s %4d s  %s\n' "$number" "$name" "$seconds" "$(describe "$name")"
  done
  echo "total $total s"
  exit 0
fi

mkdir -p "$OUTDIR/results"
CHECK_STARTED=$SECONDS
step() { printf '\n===== %s (budget %s s) =====\n' "$1" "$(budget "$1")"; STEP_STARTED=$SECONDS; }
# done_step NAME STATUS [WHY]: the step's line of the summary; a non-zero status is a failure (124: timed out).
done_step() {
  local note=ok
  if [ "$2" -ne 0 ]; then
    note="${3:-exit $2$([ "$2" -eq 124 ] && echo ', timed out')}"
    FAILED+=("$1 ($note)")
  fi
  SUMMARY+=("$(printf '%-14s %4d s of %4d  %s' "$1" $((SECONDS - STEP_STARTED)) "$(budget "$1")" "$note")")
}

step "device"
{
  timeout "$(budget device)" bash -c '
    nvidia-smi || echo "nvidia-smi failed"
    "$1" -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())"
    "$1" -c "import triton; print(\"triton\", triton.__version__)" || echo "triton not importable"
    nproc' _ "$PY"
} 2>&1 | tee "$OUTDIR/env.txt"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
done_step device $? "no CUDA device visible to torch"

step "install"
if [ "${SKIP_INSTALL:-0}" = 1 ]; then echo "skipped (SKIP_INSTALL=1)" > "$OUTDIR/install.log"; status=0; else
  # A fresh GPU machine may lack these; it may also have no internet (then this fails quickly and we go on).
  PY="$PY" BUILD_EXTENSION="$BUILD_EXTENSION" MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout "$INSTALL_TIMEOUT" bash -c '
    for module in ninja pytest_benchmark psutil; do
      "$PY" -c "import $module" 2>/dev/null || timeout 30 "$PY" -m pip install --timeout 10 --retries 0 "${module//_/-}" \
        || echo "could not install $module"
    done
    if [ "$BUILD_EXTENSION" = 1 ]; then
      "$PY" -m pip install --no-build-isolation -e ".[test,bench]" \
        || "$PY" -m pip install --no-build-isolation --no-deps -e . \
        || "$PY" setup.py build_ext --inplace
    else
      CSKD_SKIP_EXTENSION=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
    fi' > "$OUTDIR/install.log" 2>&1
  status=$?
fi
tail -n 3 "$OUTDIR/install.log"
if [ "$BUILD_EXTENSION" = 1 ] && [ "${SKIP_INSTALL:-0}" != 1 ]; then
  "$PY" -c 'import cskd_kernels._C' 2>/dev/null && echo "C++ extension: importable" \
    || { echo "C++ extension: NOT importable (see install.log)"; [ "$status" -ne 0 ] || status=1; }
elif [ "${SKIP_INSTALL:-0}" != 1 ]; then
  echo "C++ extension: not built (CSKD_SKIP_EXTENSION=1; BUILD_EXTENSION=1 builds it)"
fi
done_step install "$status"

PARALLEL=""
"$PY" -c "import xdist" 2>/dev/null && PARALLEL="-n 8 -p xdist"
PER_TEST=""
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 90"

if wants loss_tests; then
step "loss_tests"
# The loss path's files, those that exist; CSKD_CUDA_TESTS_ONLY keeps the tests that run on CUDA.
files=()
for name in cskd_loss cskd_loss_mse position_attention channel_attention cka cross_gram cell_projection \
            channel_gram autocast; do
  [ -e "tests/test_$name.py" ] && files+=("tests/test_$name.py")
done
files+=("tests/test_triton_op.py::test_cskd_loss_under_cuda_graphs_matches_eager")  # the loss as triton-graphs runs it
# -v: a line per test as it ends, so a stopped run still says which passed.
# shellcheck disable=SC2086
CSKD_CUDA_TESTS_ONLY="${CUDA_TESTS_ONLY:-1}" timeout "$(budget loss_tests)" "$PY" -m pytest "${files[@]}" -v -rfEs \
  -p no:cacheprovider $PARALLEL $PER_TEST ${TESTS_ARGS:-} > "$OUTDIR/loss_tests.log" 2>&1
status=$?
grep -E "^(FAILED|ERROR)" "$OUTDIR/loss_tests.log" | head -n 20
tail -n 1 "$OUTDIR/loss_tests.log"
done_step loss_tests "$status"
fi

if wants loss_bench; then
step "loss_bench"
# The released configuration only (grid 5x5, not its MSE variants); released first, the compile of
# triton-graphs last. The CSV is written after every case.
# shellcheck disable=SC2086
timeout "$(budget loss_bench)" "$PY" -m pytest benchmarks/test_bench_cskd_loss.py -q -rfEs -p no:cacheprovider \
  -k "released_config_grid5x5-full and (released-cuda or triton-cuda or triton-graphs-cuda)" \
  --bench-device "${BENCH_DEVICE:-cuda}" --bench-budget 0.5 --bench-results-dir "$OUTDIR/results" ${BENCH_ARGS:-} \
  > "$OUTDIR/bench.log" 2>&1
status=$?
grep -E "^(FAILED|ERROR)" "$OUTDIR/bench.log" | head -n 20
sed -n '/cskd benchmarks (speedup/,$p' "$OUTDIR/bench.log" | head -n 20
tail -n 1 "$OUTDIR/bench.log"
done_step loss_bench "$status"
fi

for precision in fp32 bf16; do
  wants "fraction_$precision" || continue
  step "fraction_$precision"
  # The CSKD loss's share of a DeepLabV3-R101 teacher + R18 student step, batch 8, 512x1024, eager and
  # with the loss under CUDA graphs; each timing is written to the JSON as it comes.
  echo "=== step_fraction --precision $precision --graphs" >> "$OUTDIR/step_fraction.log"
  timeout "$(budget "fraction_$precision")" "$PY" -m benchmarks.step_fraction --precision "$precision" --graphs \
    --warmup 2 --repeats 5 --out "$OUTDIR/step_fraction_$precision.json" >> "$OUTDIR/step_fraction.log" 2>&1
  status=$?
  sed -n "/=== step_fraction --precision $precision/,\$p" "$OUTDIR/step_fraction.log" | grep -v "^measured" | tail -n 9
  done_step "fraction_$precision" "$status"
done

if wants tests; then
step "tests"
# shellcheck disable=SC2086
CSKD_CUDA_TESTS_ONLY="${CUDA_TESTS_ONLY:-1}" timeout "$(budget tests)" "$PY" -m pytest tests/ -q -rfEs \
  --junitxml="$OUTDIR/tests.xml" $PARALLEL ${TESTS_ARGS:-} > "$OUTDIR/tests.log" 2>&1
status=$?
grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" | head -n 20
tail -n 1 "$OUTDIR/tests.log"
done_step tests "$status"
fi

if wants profile; then
step "profile"
# Where the loss's device time goes, kernel by kernel, grid and global; and how many ops the host issues.
timeout "${PROFILE_TIMEOUT:-120}" "$PY" -m benchmarks.profile_loss --rows 30 > "$OUTDIR/profile.log" 2>&1
status=$?
timeout "${PROFILE_TIMEOUT:-120}" "$PY" -m benchmarks.profile_loss --rows 15 --grid none >> "$OUTDIR/profile.log" 2>&1 \
  || status=$?
grep -E "Self CUDA time total|Self CPU time total" "$OUTDIR/profile.log"
done_step profile "$status"
fi

if wants fraction; then
step "fraction"
# The CSKD loss's share of a DeepLabV3-R101 teacher + R18 student step, batch 8, 512x1024.
# Twice: PyTorch's default float32 matmul precision, then TF32 ("high") for models and loss alike;
# the first also with the loss under CUDA graphs (--graphs: compiling it takes a minute or two).
fraction_status=0
for precision in highest high; do
  graphs=$([ "$precision" = highest ] && echo --graphs)
  # shellcheck disable=SC2086
  timeout "${FRACTION_TIMEOUT:-240}" "$PY" -m benchmarks.step_fraction --matmul-precision "$precision" $graphs \
    --out "$OUTDIR/step_fraction_$precision.json" > "$OUTDIR/step_fraction_$precision.log" 2>&1
  status=$?
  grep -v "^measured" "$OUTDIR/step_fraction_$precision.log" | tail -n 9
  [ "$status" -eq 0 ] || fraction_status=$status
done
done_step fraction "$fraction_status"
fi

if wants bench; then
step "bench"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-240}" "$PY" -m pytest benchmarks/ -q -rfEs -k "not graphs" --bench-device "${BENCH_DEVICE:-cuda}" \
  --bench-results-dir "$OUTDIR/results" ${BENCH_ARGS:-} > "$OUTDIR/bench.log" 2>&1
bench_status=$?
grep -E "^(FAILED|ERROR)" "$OUTDIR/bench.log" | head -n 20
tail -n 1 "$OUTDIR/bench.log"
# The CUDA-graphed loss (provider triton-graphs) last: compiling it takes minutes, which must not
# starve the other cases. graphs_bench LOG runs it, writing LOG.
graphs_bench() {
  # shellcheck disable=SC2086
  timeout "${GRAPHS_TIMEOUT:-180}" "$PY" -m pytest benchmarks/test_bench_cskd_loss.py -q -rfEs -k graphs \
    --bench-device "${BENCH_DEVICE:-cuda}" --bench-results-dir "$OUTDIR/results" ${BENCH_ARGS:-} > "$1" 2>&1
}
graphs_bench "$OUTDIR/bench_graphs.log"
status=$?
grep -E "^(FAILED|ERROR)" "$OUTDIR/bench_graphs.log" | head -n 20
tail -n 1 "$OUTDIR/bench_graphs.log"
if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then
  # Inductor compiles the Triton kernels themselves (triton_op, untimed on a GPU before): should that
  # fail, time the loss with the kernels behind opaque custom ops instead.
  CSKD_TRITON_OP=0 graphs_bench "$OUTDIR/bench_graphs_opaque.log"
  echo "CSKD_TRITON_OP=0: exit $? ($(tail -n 1 "$OUTDIR/bench_graphs_opaque.log"))"
fi
[ "$status" -eq 0 ] || bench_status=$status
# The table of this run (its terminal summary), then the README table of the CSVs it wrote.
sed -n '/cskd benchmarks (speedup/,$p' "$OUTDIR/bench.log" | head -n 60
done_step bench "$bench_status"
fi

if wants loss_bench || wants bench; then
  "$PY" -m benchmarks.report "$OUTDIR/results" || FAILED+=("report")
fi

if wants tune; then
step "tune"
# Launch configurations of the Triton position attention at CSKDLoss's shapes, fastest first.
timeout "${TUNE_TIMEOUT:-300}" "$PY" -m benchmarks.tune_position_attention --out "$OUTDIR/tune.json" \
  > "$OUTDIR/tune.log" 2>&1
status=$?
sed -n "/^fastest first/,\$p" "$OUTDIR/tune.log" | head -n 45
[ "$status" -eq 124 ] && grep "^measured" "$OUTDIR/tune.log" | tail -n 45  # timed out: what was measured
done_step tune "$status"
fi

echo
echo "gpu_check plan $PLAN, $((SECONDS - CHECK_STARTED)) s in all:"
printf '  %s\n' "${SUMMARY[@]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "gpu_check: all steps passed"
