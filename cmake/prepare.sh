#!/usr/bin/env bash
# Installs what the build needs and is missing, then configures and builds smp
# into <repo>/build. Used by tests/run_all.sh and examples/run_demo.sh.
#
#   bash cmake/prepare.sh          # install missing packages, configure, build
#   source cmake/prepare.sh        # only defines the functions below; call smp_prepare
#
# Debian packages are installed with apt-get only when a command or header they
# provide is missing; Python packages with python3 -m pip only when the import
# fails (torch is pinned to 2.13.0 and never replaced when some torch imports).
#
# Environment:
#   SMP_BUILD_DIR   build folder (default <repo>/build)
#   SMP_BUILD_TYPE  CMAKE_BUILD_TYPE for a fresh configure (default RelWithDebInfo)
#   SMP_CMAKE_ARGS  extra arguments for a fresh configure (e.g. "-DSMP_USE_NCCL=OFF")
#   SMP_NO_INSTALL  when 1, never install packages (report what is missing instead)

SMP_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMP_BUILD_DIR="${SMP_BUILD_DIR:-$SMP_REPO/build}"

smp_step() { printf '\n==> %s\n' "$*"; }

# Flags for mpirun: OpenMPI refuses to run as root without --allow-run-as-root,
# and CI machines have fewer cores than the largest runs (8 ranks).
smp_mpirun_flags() {
  local flags="--oversubscribe"
  if [ "$(id -u)" = 0 ]; then
    flags="$flags --allow-run-as-root"
  fi
  echo "$flags"
}

# Usable cores (GNU nproc would honour OMP_NUM_THREADS, which the scripts lower).
smp_nproc() {
  env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2
}

# Runs as a subshell so that `set -e` and `exit` never leak into a caller that
# sourced this file.
smp_prepare() (
  set -euo pipefail

  # ---- Debian packages -----------------------------------------------------
  local missing=()
  local sysinc
  command -v cmake >/dev/null || missing+=(cmake)
  command -v ninja >/dev/null || missing+=(ninja-build)
  command -v g++ >/dev/null || missing+=(g++)
  command -v ccache >/dev/null || missing+=(ccache)
  command -v mpirun >/dev/null || missing+=(openmpi-bin)
  command -v mpicc >/dev/null || missing+=(libopenmpi-dev)
  [ -e /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev)
  [ -e /usr/include/gmock/gmock.h ] || missing+=(libgmock-dev)
  [ -e /usr/include/fmt/core.h ] || missing+=(libfmt-dev)
  [ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
  [ -e /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
  if ! command -v python3 >/dev/null; then
    missing+=(python3 python3-dev python3-pip)
  else
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    sysinc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
    [ -n "$sysinc" ] && [ -e "$sysinc/Python.h" ] || missing+=(python3-dev)
  fi

  if [ ${#missing[@]} -gt 0 ]; then
    smp_step "apt-get install ${missing[*]}"
    if [ "${SMP_NO_INSTALL:-0}" = 1 ]; then
      echo "missing Debian packages: ${missing[*]} (SMP_NO_INSTALL=1, not installing)" >&2
      exit 1
    fi
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
      if command -v sudo >/dev/null; then
        sudo=(sudo)
      else
        echo "missing Debian packages: ${missing[*]}; not root and no sudo: install them and rerun" >&2
        exit 1
      fi
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${missing[@]}"
  else
    smp_step "Debian packages: all present"
  fi

  # ---- Python packages -----------------------------------------------------
  local pip=(env PIP_ROOT_USER_ACTION=ignore python3 -m pip install --disable-pip-version-check -q)
  # A distribution Python (PEP 668) refuses pip installs outside a venv; CI
  # machines are disposable, so install into it anyway.
  if python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
    pip+=(--break-system-packages)
  fi
  local pymissing=()
  python3 -c 'import torch' >/dev/null 2>&1 || pymissing+=(torch==2.13.0)
  python3 -c 'import pybind11' >/dev/null 2>&1 || pymissing+=(pybind11)
  python3 -c 'import numpy' >/dev/null 2>&1 || pymissing+=(numpy)
  python3 -c 'import pytest' >/dev/null 2>&1 || pymissing+=(pytest)
  python3 -c 'import pytest_timeout' >/dev/null 2>&1 || pymissing+=(pytest-timeout)
  # Optional test extra: the module-level pipeline tests on Hugging Face models
  # (tests/python/test_pipeline_modules.py skip them without it).
  python3 -c 'import transformers' >/dev/null 2>&1 || pymissing+=(transformers)
  # Optional: smp-checkpoint's progress bars, and its safetensors export tests
  # (tests/python/test_checkpoint_cli.py skips those without it).
  python3 -c 'import tqdm' >/dev/null 2>&1 || pymissing+=(tqdm)
  python3 -c 'import safetensors' >/dev/null 2>&1 || pymissing+=(safetensors)
  python3 -c 'import scikit_build_core' >/dev/null 2>&1 || pymissing+=(scikit-build-core)
  if [ ${#pymissing[@]} -gt 0 ]; then
    smp_step "pip install ${pymissing[*]}"
    if [ "${SMP_NO_INSTALL:-0}" = 1 ]; then
      echo "missing Python packages: ${pymissing[*]} (SMP_NO_INSTALL=1, not installing)" >&2
      exit 1
    fi
    "${pip[@]}" "${pymissing[@]}"
  else
    smp_step "Python packages: all present"
  fi
  smp_step "python3 $(python3 -c 'import sys; print(sys.version.split()[0])'), torch $(python3 -c 'import torch; print(torch.__version__)')"

  # ---- configure -----------------------------------------------------------
  local cache="$SMP_BUILD_DIR/CMakeCache.txt"
  if [ -f "$cache" ]; then
    # A cache written for another checkout location cannot be reused.
    local home
    home="$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$cache")"
    if [ -n "$home" ] && [ "$(cd "$home" 2>/dev/null && pwd)" != "$SMP_REPO" ]; then
      smp_step "build cache belongs to $home: starting a fresh configure"
      rm -rf "$SMP_BUILD_DIR/CMakeCache.txt" "$SMP_BUILD_DIR/CMakeFiles"
    fi
  fi
  if [ ! -f "$cache" ] || { [ ! -f "$SMP_BUILD_DIR/build.ninja" ] && [ ! -f "$SMP_BUILD_DIR/Makefile" ]; }; then
    local gen=(-G Ninja)
    # Keep the generator of an existing cache (CMake refuses to switch).
    [ -f "$cache" ] && gen=()
    smp_step "cmake -S . -B ${SMP_BUILD_DIR#"$SMP_REPO"/} ${gen[*]} -DCMAKE_BUILD_TYPE=${SMP_BUILD_TYPE:-RelWithDebInfo} ${SMP_CMAKE_ARGS:-}"
    # shellcheck disable=SC2086
    cmake -S "$SMP_REPO" -B "$SMP_BUILD_DIR" "${gen[@]}" \
      -DCMAKE_BUILD_TYPE="${SMP_BUILD_TYPE:-RelWithDebInfo}" ${SMP_CMAKE_ARGS:-}
  else
    smp_step "build folder configured (${SMP_BUILD_DIR#"$SMP_REPO"/}); the build re-runs cmake when needed"
  fi

  # ---- build ---------------------------------------------------------------
  local jobs
  jobs="$(smp_nproc)"
  smp_step "cmake --build ${SMP_BUILD_DIR#"$SMP_REPO"/} -j$jobs"
  cmake --build "$SMP_BUILD_DIR" -j"$jobs"
  if command -v ccache >/dev/null; then
    ccache -s 2>/dev/null | grep -iE '^ *(cache hit|hits|misses)' | head -3 || true
  fi
)

# The main demo (examples/python/train.py) on NP ranks: a training job that saves
# a sharded checkpoint, then a second job that resumes from it and must match
# the uninterrupted run exactly. Returns non-zero when either job fails.
smp_run_demo() {
  local np="${1:-8}" dir rc=0
  local flags
  read -r -a flags <<<"$(smp_mpirun_flags)"
  dir="$(mktemp -d "${TMPDIR:-/tmp}/smp-demo.XXXXXX")"
  for phase in train resume; do
    smp_step "mpirun -np $np ${flags[*]} python3 examples/python/train.py --phase $phase --dir $dir"
    PYTHONPATH="$SMP_REPO/python${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
      timeout 600 mpirun -np "$np" "${flags[@]}" -x PYTHONPATH -x OMP_NUM_THREADS \
      python3 "$SMP_REPO/examples/python/train.py" --phase "$phase" --dir "$dir" || { rc=$?; break; }
  done
  rm -rf "$dir"
  return "$rc"
}

# Executed (not sourced): prepare now.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  smp_prepare "$@"
fi
