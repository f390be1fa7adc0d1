#!/usr/bin/env bash
# The whole CPU test suite, from a bare Debian machine:
#
#   bash tests/run_all.sh
#
# 1. installs missing Debian/PyPI packages and builds (cmake/prepare.sh);
# 2. ctest: gtest unit tests, the multi-process MPI tests at 1, 2, 4 and 8
#    ranks, the C++ examples under mpirun;
# 3. pytest tests/python (GPU tests skip without a GPU);
# 4. the demo as examples/run_demo.sh runs it (train, save, resume; mpirun -np 8)
#    and the Python rank grid;
# 5. packaging: cmake --install, then examples/cpp built standalone against the
#    installed package (find_package(smp)) and run under mpirun -np 4.
#
# Every test step runs even when an earlier one failed (a failed build stops
# everything); the summary at the end lists each step, and the exit status is
# non-zero when any step failed. GPU tests: bash tests/gpu/run.sh.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=../cmake/prepare.sh
source "$REPO/cmake/prepare.sh"
BUILD="$SMP_BUILD_DIR"
read -r -a MPIRUN_FLAGS <<<"$(smp_mpirun_flags)"

STEPS=()
RESULTS=()
record() {  # record <name> <exit status>
  STEPS+=("$1")
  if [ "$2" -eq 0 ]; then RESULTS+=("ok"); else RESULTS+=("FAILED (exit $2)"); fi
}
summary() {
  printf '\n==> summary\n'
  local i failed=0
  for i in "${!STEPS[@]}"; do
    printf '  %-52s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}"
    [ "${RESULTS[$i]}" = ok ] || failed=1
  done
  if [ "$failed" = 0 ]; then
    printf '\nall steps passed\n'
  else
    printf '\nSOME STEPS FAILED\n'
  fi
  return "$failed"
}

# ---- 1. prepare and build ----------------------------------------------------
smp_prepare
rc=$?
record "install missing packages, configure, build" "$rc"
if [ "$rc" -ne 0 ]; then
  echo "build failed: the tests were not run" >&2
  summary
  exit 1
fi

# 8 ranks on 2 cores: one thread per rank keeps them from starving each other.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# ---- 2. ctest ------------------------------------------------------------------
smp_step "ctest --test-dir ${BUILD#"$REPO"/} --output-on-failure"
ctest --test-dir "$BUILD" --output-on-failure
record "ctest (unit, mpi np 1/2/4/8, C++ examples)" $?

# ---- 3. pytest -----------------------------------------------------------------
smp_step "python3 -m pytest tests/python -q   (PYTHONPATH=python)"
PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}" python3 -m pytest "$REPO/tests/python" -q
rc=$?
# Exit status 5 means pytest collected no tests: that is a failure here too.
[ "$rc" -eq 5 ] && echo "pytest collected no tests" >&2
record "pytest tests/python" "$rc"

# ---- 4. the demo (examples/run_demo.sh's job) and the Python rank grid ---------
smp_run_demo 8
record "demo: train, save, resume (mpirun -np 8)" $?
smp_step "mpirun -np 8 ${MPIRUN_FLAGS[*]} python3 examples/python/rank_grid.py"
PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}" \
  timeout 300 mpirun -np 8 "${MPIRUN_FLAGS[@]}" -x PYTHONPATH -x OMP_NUM_THREADS \
  python3 "$REPO/examples/python/rank_grid.py"
record "python rank grid (mpirun -np 8)" $?

# ---- 5. packaging: install, find_package(smp) from a standalone project ------
package_check() (
  set -e
  local install="$BUILD/install" ex="$BUILD/example-standalone" torch_prefix
  smp_step "cmake --install ${BUILD#"$REPO"/} --prefix ${install#"$REPO"/}"
  rm -rf "$install"
  cmake --install "$BUILD" --prefix "$install"
  torch_prefix="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  smp_step "standalone examples/cpp against the installed package"
  rm -rf "$ex"
  cmake -S "$REPO/examples/cpp" -B "$ex" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$install;$torch_prefix"
  cmake --build "$ex" -j"$(smp_nproc)"
  smp_step "mpirun -np 4 ${MPIRUN_FLAGS[*]} rank_grid (standalone build)"
  timeout 120 mpirun -np 4 "${MPIRUN_FLAGS[@]}" "$ex/rank_grid"
)
package_check
record "install + standalone find_package(smp) example (np 4)" $?

summary
