#!/usr/bin/env bash
# The one command a session with a lent GPU runs, from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUTDIR]        (default: $OUT if set, else benchmarks/out)
#
# 1. prints nvidia-smi and the versions; 2. installs the package (building the C++
# extension), tolerating no internet; 3. runs the tests on CUDA; 4. runs the
# benchmarks; 5. prints the results table last. A failing step does not stop the
# others; the exit status is non-zero if any step failed.
#
# Writes at most 16 files, at most 2 folder levels under OUTDIR: env.txt, install.log, tests.log,
# tests.xml, profile.log, bench.log, bench_graphs.log (and bench_graphs_opaque.log should it fail),
# step_fraction_{highest,high}.{log,json},
# tune.{log,json}, results/<device>.csv (1 or 2).
# Environment: STEPS (which of "tests profile bench fraction tune" to run, default all five; install always
# runs unless SKIP_INSTALL=1, so a second call on a fresh machine can run only the rest),
# SKIP_INSTALL=1 (the package is already installed), TESTS_ARGS and
# BENCH_ARGS (extra pytest arguments), CUDA_TESTS_ONLY (default 1: only the tests that run on
# CUDA, 8 xdist workers when pytest-xdist is there; CI runs the CPU ones), BENCH_DEVICE (cuda | cpu |
# all, default cuda), INSTALL_TIMEOUT / TESTS_TIMEOUT / BENCH_TIMEOUT / GRAPHS_TIMEOUT (the
# CUDA-graphed loss) / PROFILE_TIMEOUT (each of two runs) / FRACTION_TIMEOUT (each of two runs) /
# TUNE_TIMEOUT in seconds (default 120 / 300 / 240 / 180 / 120 / 240 / 300: more
# than one call's 10 minutes, so split with STEPS, e.g. STEPS="tests profile", then
# SKIP_INSTALL=1 STEPS="bench", then SKIP_INSTALL=1 STEPS="fraction tune" on the same warm machine;
# the benchmarks write their CSV after every case, so a timeout keeps what was measured).

set -u
cd "$(dirname "$0")/.." || exit 2
OUTDIR="${1:-${OUT:-benchmarks/out}}"
mkdir -p "$OUTDIR/results"
PY="${PYTHON:-python3}"
FAILED=()

step() { printf '\n===== %s =====\n' "$1"; }

step "device"
{
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  "$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton not importable"
  nproc
} 2>&1 | tee "$OUTDIR/env.txt"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || FAILED+=("no CUDA device visible to torch")

step "install"
if [ "${SKIP_INSTALL:-0}" = 1 ]; then echo "skipped (SKIP_INSTALL=1)" > "$OUTDIR/install.log"; else {
  # A fresh GPU machine may lack these; it may also have no internet (then this fails quickly and we go on).
  for module in ninja pytest_benchmark psutil; do
    "$PY" -c "import $module" 2>/dev/null || timeout 60 "$PY" -m pip install --timeout 10 --retries 0 "${module//_/-}" \
      || echo "could not install $module"
  done
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  timeout "${INSTALL_TIMEOUT:-120}" "$PY" -m pip install --no-build-isolation -e ".[test,bench]" \
    || timeout "${INSTALL_TIMEOUT:-120}" "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || timeout "${INSTALL_TIMEOUT:-120}" "$PY" setup.py build_ext --inplace
} > "$OUTDIR/install.log" 2>&1; fi
tail -n 3 "$OUTDIR/install.log"
"$PY" -c 'import cskd_kernels._C' 2>/dev/null && echo "C++ extension: importable" \
  || { echo "C++ extension: NOT importable (see install.log)"; FAILED+=("install (extension not importable)"); }

STEPS="${STEPS:-tests profile bench fraction tune}"
wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if wants tests; then
step "tests (pytest tests/)"
export CSKD_CUDA_TESTS_ONLY="${CUDA_TESTS_ONLY:-1}"
PARALLEL=""
"$PY" -c "import xdist" 2>/dev/null && PARALLEL="-n 8 -p xdist"
# shellcheck disable=SC2086
timeout "${TESTS_TIMEOUT:-300}" "$PY" -m pytest tests/ -q -rfEs --junitxml="$OUTDIR/tests.xml" $PARALLEL ${TESTS_ARGS:-} \
  > "$OUTDIR/tests.log" 2>&1
status=$?
grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" | head -n 20
tail -n 1 "$OUTDIR/tests.log"
[ "$status" -eq 0 ] || FAILED+=("tests (exit $status$([ "$status" -eq 124 ] && echo ', timed out'))")
fi

if wants profile; then
step "profile (python -m benchmarks.profile_loss)"
# Where the loss's device time goes, kernel by kernel, grid and global; and how many ops the host issues.
timeout "${PROFILE_TIMEOUT:-120}" "$PY" -m benchmarks.profile_loss --rows 30 > "$OUTDIR/profile.log" 2>&1
status=$?
timeout "${PROFILE_TIMEOUT:-120}" "$PY" -m benchmarks.profile_loss --rows 15 --grid none >> "$OUTDIR/profile.log" 2>&1 \
  || status=$?
grep -E "Self CUDA time total|Self CPU time total" "$OUTDIR/profile.log"
[ "$status" -eq 0 ] || FAILED+=("profile (exit $status)")
fi

if wants fraction; then
step "training-step fraction (python -m benchmarks.step_fraction)"
# The CSKD loss's share of a DeepLabV3-R101 teacher + R18 student step, batch 8, 512x1024.
# Twice: PyTorch's default float32 matmul precision, then TF32 ("high") for models and loss alike;
# the first also with the loss under CUDA graphs (--graphs: compiling it takes a minute or two).
for precision in highest high; do
  graphs=$([ "$precision" = highest ] && echo --graphs)
  # shellcheck disable=SC2086
  timeout "${FRACTION_TIMEOUT:-240}" "$PY" -m benchmarks.step_fraction --matmul-precision "$precision" $graphs \
    --out "$OUTDIR/step_fraction_$precision.json" > "$OUTDIR/step_fraction_$precision.log" 2>&1
  status=$?
  tail -n 8 "$OUTDIR/step_fraction_$precision.log"
  [ "$status" -eq 0 ] || FAILED+=("step fraction, $precision (exit $status)")
done
fi

if wants bench; then
step "benchmarks (pytest benchmarks/)"
marker="$OUTDIR/.bench-start"
touch "$marker"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-240}" "$PY" -m pytest benchmarks/ -q -rfEs -k "not graphs" --bench-device "${BENCH_DEVICE:-cuda}" \
  ${BENCH_ARGS:-} > "$OUTDIR/bench.log" 2>&1
status=$?
grep -E "^(FAILED|ERROR)" "$OUTDIR/bench.log" | head -n 20
tail -n 1 "$OUTDIR/bench.log"
[ "$status" -eq 0 ] || FAILED+=("benchmarks (exit $status$([ "$status" -eq 124 ] && echo ', timed out'))")
# The CUDA-graphed loss (provider triton-graphs) last: compiling it takes minutes, which must not
# starve the other cases. graphs_bench LOG runs it, writing LOG.
graphs_bench() {
  # shellcheck disable=SC2086
  timeout "${GRAPHS_TIMEOUT:-180}" "$PY" -m pytest benchmarks/test_bench_cskd_loss.py -q -rfEs -k graphs \
    --bench-device "${BENCH_DEVICE:-cuda}" ${BENCH_ARGS:-} > "$1" 2>&1
}
graphs_bench "$OUTDIR/bench_graphs.log"
status=$?
grep -E "^(FAILED|ERROR)" "$OUTDIR/bench_graphs.log" | head -n 20
tail -n 1 "$OUTDIR/bench_graphs.log"
[ "$status" -eq 0 ] || FAILED+=("CUDA-graphed loss benchmark (exit $status$([ "$status" -eq 124 ] && echo ', timed out'))")
if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then
  # Inductor compiles the Triton kernels themselves (triton_op, untimed on a GPU before): should that
  # fail, time the loss with the kernels behind opaque custom ops instead.
  CSKD_TRITON_OP=0 graphs_bench "$OUTDIR/bench_graphs_opaque.log"
  echo "CSKD_TRITON_OP=0: exit $? ($(tail -n 1 "$OUTDIR/bench_graphs_opaque.log"))"
fi
find benchmarks/results -name '*.csv' -newer "$marker" -exec cp {} "$OUTDIR/results/" \;
rm -f "$marker"

step "results"
# The table of this run (its terminal summary), then the README table of the CSVs it wrote.
sed -n '/cskd benchmarks (speedup/,$p' "$OUTDIR/bench.log" | head -n 60
"$PY" -m benchmarks.report "$OUTDIR/results" || FAILED+=("report")
fi

if wants tune; then
step "tuning sweep (python -m benchmarks.tune_position_attention)"
# Launch configurations of the Triton position attention at CSKDLoss's shapes, fastest first.
timeout "${TUNE_TIMEOUT:-300}" "$PY" -m benchmarks.tune_position_attention --out "$OUTDIR/tune.json" \
  > "$OUTDIR/tune.log" 2>&1
status=$?
sed -n "/^fastest first/,\$p" "$OUTDIR/tune.log" | head -n 45
[ "$status" -eq 124 ] && grep "^measured" "$OUTDIR/tune.log" | tail -n 45  # timed out: what was measured
[ "$status" -eq 0 ] || FAILED+=("tuning sweep (exit $status)")
fi

if [ "${#FAILED[@]}" -gt 0 ]; then
  echo
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "gpu_check: all steps passed"
