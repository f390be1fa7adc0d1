#!/usr/bin/env bash
# The whole GPU suite in one call, from the repo root of a GPU machine with no
# network: configure and build with NCCL, run ctest (the CPU MPI tests), then
# pytest tests/python/gpu (the GPU tests run one rank per
# GPU under mpirun).
#
#   bash tests/gpu/run.sh
#
# Needs: python3 with torch (CUDA build; a venv works), nvidia-nccl headers and
# library (site-packages/nvidia/nccl, found through python3), OpenMPI, GoogleTest,
# pybind11, CMake >= 3.18, a C++17 compiler, nvcc, and the header-only nlohmann-json
# (Debian nlohmann-json3-dev: /usr/include/nlohmann/json.hpp, or SMP_NLOHMANN_PREFIX:
# a prefix holding include/nlohmann/json.hpp, e.g. the usr/ of `dpkg -x <deb> dir`);
# nothing is fetched from a registry. Never enables NVLink multicast.
#
# Environment:
#   OUT                    when set, logs go there (flat): gpu_build.log,
#                          gpu_ctest.log, gpu_pytest.log, gpu_summary.txt
#   SMP_GPU_BUILD_DIR      build folder (default build-gpu)
#   SMP_GPU_DEADLINE_S     wall-clock budget of the whole script in seconds
#                          (default 560): each step runs under `timeout` with
#                          what is left, so the summary prints in time
#   SMP_GPU_STEPS          steps to run (default "build ctest pytest"); the
#                          build folder persists, so a later call can run
#                          "build pytest" (an incremental build) in its own time
#   SMP_GPU_CTEST_JOBS     ctest -j (default 2)
#   SMP_GPU_PYTEST_PATHS   what pytest runs (default tests/python/gpu: the GPU tests;
#                          the CPU suite runs in CI and does not fit one device call)
#   SMP_GPU_PYTEST_ARGS    extra pytest arguments (e.g. "-x -k nccl")
#   SMP_GPU_STEPS=bench    (also) the checkpoint benchmark on every GPU: smp
#                          vs torch.save in one run (SMP_BENCH_GB per rank,
#                          default 2), then SMP_GPU_PEER_SCRIPT when set (the
#                          peer baseline, run with torchrun on the same disk);
#                          SMP_GPU_BENCH_DIR picks the disk (default: TMPDIR)
#
# Every step after the build runs even when an earlier one failed; the exit
# status is non-zero when any step failed.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 1

BUILD_DIR="${SMP_GPU_BUILD_DIR:-build-gpu}"
DEADLINE_S="${SMP_GPU_DEADLINE_S:-560}"
CTEST_JOBS="${SMP_GPU_CTEST_JOBS:-2}"
STEPS_WANTED=" ${SMP_GPU_STEPS:-build ctest pytest} "
wanted() { [[ "$STEPS_WANTED" == *" $1 "* ]]; }
START_S="$(date +%s)"

if [ -n "${OUT:-}" ]; then
  LOG_DIR="$OUT"
else
  LOG_DIR="$BUILD_DIR/logs"
fi
mkdir -p "$LOG_DIR"
BUILD_LOG="$LOG_DIR/gpu_build.log"
CTEST_LOG="$LOG_DIR/gpu_ctest.log"
PYTEST_LOG="$LOG_DIR/gpu_pytest.log"
SUMMARY="$LOG_DIR/gpu_summary.txt"
: >"$BUILD_LOG"
: >"$CTEST_LOG"
: >"$PYTEST_LOG"

# Never NVLink multicast (NVLS) on these machines.
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1
export SMP_COMM_TIMEOUT="${SMP_COMM_TIMEOUT:-120}"
export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
# Many ranks on one node: one OpenMP thread each unless told otherwise.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$(id -u)" = 0 ]; then
  # mpirun started by ctest and by the tests themselves.
  export OMPI_ALLOW_RUN_AS_ROOT=1
  export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

STEPS=()
RESULTS=()
FAILED=0
record() {  # record <step> <exit status | "skipped: why">
  STEPS+=("$1")
  case "$2" in
    0) RESULTS+=("ok") ;;
    124 | 137) RESULTS+=("FAILED (out of time, exit $2)"); FAILED=1 ;;
    [0-9]*) RESULTS+=("FAILED (exit $2)"); FAILED=1 ;;
    *) RESULTS+=("$2"); FAILED=1 ;;
  esac
}
step() { printf '\n==> %s\n' "$*"; }
# Seconds left of the budget (at least 0).
left() {
  local rest=$((DEADLINE_S - ($(date +%s) - START_S)))
  [ "$rest" -gt 0 ] && echo "$rest" || echo 0
}
# bounded <log> <command...>: runs the command under the remaining budget,
# appending its output to <log> and to stdout; returns its exit status.
bounded() {
  local log="$1"
  shift
  local rest
  rest="$(left)"
  if [ "$rest" -le 5 ]; then
    echo "no time left for: $*" | tee -a "$log"
    return 124
  fi
  timeout --kill-after=10 "$rest" "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

# ---- 0. machine ---------------------------------------------------------------
{
  step "machine"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
  else
    echo "nvidia-smi: not found"
  fi
  python3 - <<'EOF'
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda,
          "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
    try:
        print("nccl (torch)", ".".join(str(v) for v in torch.cuda.nccl.version()))
    except Exception as e:  # noqa: BLE001
        print("nccl (torch): unavailable:", e)
except Exception as e:  # noqa: BLE001
    print("torch: import failed:", e)
try:
    import nvidia.nccl
    print("nvidia.nccl", list(nvidia.nccl.__path__)[0])
except Exception as e:  # noqa: BLE001
    print("nvidia.nccl: not importable:", e)
EOF
  cmake --version 2>&1 | head -n 1
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 1; else echo "nvcc: not on PATH"; fi
  if command -v mpirun >/dev/null; then mpirun --version 2>&1 | head -n 1; else echo "mpirun: not found"; fi
  echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE SMP_COMM_TIMEOUT=$SMP_COMM_TIMEOUT budget ${DEADLINE_S}s"
} 2>&1 | tee -a "$BUILD_LOG"

# CUDA devices torch sees (0 without CUDA), and mpirun_for <n>: MPIRUN=(the
# mpirun prefix for n ranks on this node).
GPUS="$(python3 -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
mpirun_for() {
  MPIRUN=(mpirun -np "$1" --oversubscribe)
  if [ "$(id -u)" = 0 ]; then MPIRUN+=(--allow-run-as-root); fi
}

# ---- 1. configure and build ----------------------------------------------------
rc=0
if wanted build; then
  GENERATOR="Ninja"
  if ! command -v ninja >/dev/null; then
    GENERATOR="Unix Makefiles"
  fi
  # A build folder configured with another generator cannot be reused.
  if [ -f "$BUILD_DIR/CMakeCache.txt" ] &&
    ! grep -qx "CMAKE_GENERATOR:INTERNAL=$GENERATOR" "$BUILD_DIR/CMakeCache.txt"; then
    echo "removing $BUILD_DIR: configured with another generator" | tee -a "$BUILD_LOG"
    rm -rf "$BUILD_DIR"
    mkdir -p "$LOG_DIR"
  fi
  PYTHON3="$(command -v python3)"
  # Build with the system compilers (the libstdc++ torch runs against). A
  # compiler that links parts of libstdc++ statically into libsmp (seen: a
  # wrapper in CXX on the GPU image) gives libsmp its own, uninitialised iostream
  # state inside a Python process: the first ostringstream << int crashes.
  # SMP_GPU_CXX / SMP_GPU_CC override.
  SMP_CXX="${SMP_GPU_CXX:-$(command -v /usr/bin/g++ || command -v g++)}"
  SMP_CC="${SMP_GPU_CC:-$(command -v /usr/bin/gcc || command -v gcc)}"
  if [ -f "$BUILD_DIR/CMakeCache.txt" ] &&
    ! grep -qx "CMAKE_CXX_COMPILER:[A-Z]*=$SMP_CXX" "$BUILD_DIR/CMakeCache.txt"; then
    echo "removing $BUILD_DIR: configured with another compiler" | tee -a "$BUILD_LOG"
    rm -rf "$BUILD_DIR"
    mkdir -p "$LOG_DIR"
  fi
  # nlohmann-json is header-only and never downloaded here: fail early, by name.
  NLOHMANN_ARGS=()
  if [ -n "${SMP_NLOHMANN_PREFIX:-}" ]; then
    NLOHMANN_ARGS=(-DCMAKE_PREFIX_PATH="$SMP_NLOHMANN_PREFIX")
  fi
  if [ -e "${SMP_NLOHMANN_PREFIX:-/usr}/include/nlohmann/json.hpp" ] ||
    [ -e /usr/include/nlohmann/json.hpp ] || [ -e /usr/local/include/nlohmann/json.hpp ]; then
    step "configure ($GENERATOR, $BUILD_DIR)" | tee -a "$BUILD_LOG"
    bounded "$BUILD_LOG" env CXX="$SMP_CXX" CC="$SMP_CC" cmake -S . -B "$BUILD_DIR" -G "$GENERATOR" \
      -DSMP_USE_NCCL=ON -DPython_EXECUTABLE="$PYTHON3" "${NLOHMANN_ARGS[@]}" \
      -DCMAKE_CXX_COMPILER="$SMP_CXX" -DCMAKE_C_COMPILER="$SMP_CC"
    rc=$?
  else
    echo "missing nlohmann/json.hpp: install the Debian package nlohmann-json3-dev" \
      "(dpkg -i nlohmann-json3-dev_*.deb), or unpack it (dpkg -x <deb> DIR) and set" \
      "SMP_NLOHMANN_PREFIX=DIR/usr" | tee -a "$BUILD_LOG"
    rc=1
  fi
  if [ "$rc" -eq 0 ]; then
    step "build (-j$(getconf _NPROCESSORS_ONLN))" | tee -a "$BUILD_LOG"
    bounded "$BUILD_LOG" cmake --build "$BUILD_DIR" -j"$(getconf _NPROCESSORS_ONLN)"
    rc=$?
  fi
  record "configure + build (SMP_USE_NCCL=ON)" "$rc"
elif [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  echo "SMP_GPU_STEPS has no build and $BUILD_DIR is not configured" | tee -a "$BUILD_LOG"
  rc=1
  record "configure + build" "skipped: not asked for, and no earlier build"
fi

# ---- 2. ctest --------------------------------------------------------------------
if ! wanted ctest; then
  :
elif [ "$rc" -eq 0 ]; then
  step "ctest --output-on-failure -j$CTEST_JOBS" | tee -a "$CTEST_LOG"
  bounded "$CTEST_LOG" ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$CTEST_JOBS"
  record "ctest (C++ unit and MPI tests)" "$?"
else
  echo "build failed: ctest not run" | tee -a "$CTEST_LOG"
  record "ctest (C++ unit and MPI tests)" "skipped: build failed"
fi

# ---- 3. pytest -------------------------------------------------------------------
read -r -a PYTEST_PATHS <<<"${SMP_GPU_PYTEST_PATHS:-tests/python/gpu}"
if ! wanted pytest; then
  :
elif [ "$rc" -ne 0 ]; then
  echo "build failed: Python tests not run" | tee -a "$PYTEST_LOG"
  record "pytest ${PYTEST_PATHS[*]}" "skipped: build failed"
elif python3 -c 'import pytest' >/dev/null 2>&1; then
  read -r -a EXTRA <<<"${SMP_GPU_PYTEST_ARGS:-}"
  step "python3 -m pytest ${PYTEST_PATHS[*]} -q -rs ${EXTRA[*]:-}" | tee -a "$PYTEST_LOG"
  bounded "$PYTEST_LOG" python3 -m pytest "${PYTEST_PATHS[@]}" -q -rs ${EXTRA[@]+"${EXTRA[@]}"}
  record "pytest ${PYTEST_PATHS[*]}" "$?"
else
  # No pytest: at least the GPU scripts, as tests/python/gpu/test_nccl.py runs them.
  echo "pytest is not installed: running tests/python/gpu/mp/*.py directly" | tee -a "$PYTEST_LOG"
  np=$((GPUS < 4 ? GPUS : 4))
  mpirun_for "$np"
  if [ "$np" -lt 2 ]; then
    echo "fewer than 2 GPUs ($GPUS): GPU scripts not run" | tee -a "$PYTEST_LOG"
    record "GPU scripts (no pytest)" "skipped: fewer than 2 GPUs"
  else
    for script in tests/python/gpu/mp/*.py; do
      step "${MPIRUN[*]} python3 $script" | tee -a "$PYTEST_LOG"
      rest="$(left)"
      [ "$rest" -gt 300 ] && rest=300
      bounded "$PYTEST_LOG" timeout --kill-after=10 "$rest" "${MPIRUN[@]}" \
        -x PYTHONPATH -x NCCL_NVLS_ENABLE -x SMP_COMM_TIMEOUT python3 "$script"
      record "mpirun -np $np $script" "$?"
    done
  fi
fi

# ---- 4. benchmark (only when SMP_GPU_STEPS names "bench") ---------------------------
# smp.save/smp.load against per-rank torch.save/torch.load of the same CUDA state
# (tests/bench/checkpoint_bench.py), then, when SMP_GPU_PEER_SCRIPT names the
# peer baseline (a torchrun script: torch.save and DCP), that script on the same
# disk and GB per rank, in the same call.
BENCH_LOG="$LOG_DIR/gpu_bench.log"
if wanted bench; then
  : >"$BENCH_LOG"
  bench_dir="${SMP_GPU_BENCH_DIR:-${TMPDIR:-/tmp}/smp_gpu_bench}"
  export SMP_BENCH_GB="${SMP_BENCH_GB:-2}" SMP_BENCH_DEVICE=cuda SMP_BENCH_DIR="$bench_dir/smp"
  if [ "$rc" -ne 0 ] || [ "$GPUS" -lt 1 ]; then
    record "bench" "skipped: build failed or no GPU"
  else
    mpirun_for "$GPUS"
    step "${MPIRUN[*]} python3 tests/bench/checkpoint_bench.py (SMP_BENCH_GB=$SMP_BENCH_GB)" | tee -a "$BENCH_LOG"
    df -h "${TMPDIR:-/tmp}" 2>&1 | tee -a "$BENCH_LOG"
    bounded "$BENCH_LOG" "${MPIRUN[@]}" -x PYTHONPATH -x SMP_BENCH_GB -x SMP_BENCH_DEVICE \
      -x SMP_BENCH_DIR -x NCCL_NVLS_ENABLE -x OMP_NUM_THREADS python3 tests/bench/checkpoint_bench.py
    record "bench: smp vs torch.save ($GPUS ranks)" "$?"
    rm -rf "$bench_dir"
    if [ -n "${SMP_GPU_PEER_SCRIPT:-}" ]; then
      step "torchrun --nproc_per_node $GPUS $SMP_GPU_PEER_SCRIPT (PB_GB_PER_RANK=$SMP_BENCH_GB)" | tee -a "$BENCH_LOG"
      bounded "$BENCH_LOG" env PB_GB_PER_RANK="$SMP_BENCH_GB" PB_DIR="$bench_dir/peer" \
        python3 -m torch.distributed.run --standalone --nproc_per_node "$GPUS" "$SMP_GPU_PEER_SCRIPT"
      record "bench: peer baseline (torch.save, DCP)" "$?"
      rm -rf "$bench_dir"
    fi
  fi
fi

# ---- summary ------------------------------------------------------------------------
{
  printf '\n==> summary (%ss)\n' "$(($(date +%s) - START_S))"
  for i in "${!STEPS[@]}"; do
    printf '  %-48s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}"
  done
  if [ "$FAILED" = 0 ]; then
    printf '\nGPU suite: all steps passed\n'
  else
    printf '\nGPU suite: SOME STEPS FAILED (logs in %s)\n' "$LOG_DIR"
  fi
} | tee "$SUMMARY"
exit "$FAILED"
