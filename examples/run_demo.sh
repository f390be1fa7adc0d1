#!/usr/bin/env bash
# The main smp demo, from a bare Debian machine:
#
#   bash examples/run_demo.sh
#
# Installs missing Debian/PyPI packages and builds (cmake/prepare.sh), then runs
# examples/python/train.py on 8 ranks under mpirun, twice: a training job
# (tensor parallel degree 2 x 4 data-parallel replicas) that saves a sharded
# checkpoint mid-way with smp.save, and a second job that resumes from it with
# smp.load and checks that every loss and parameter equals the uninterrupted run.
#
#   SMP_DEMO_NP=4 bash examples/run_demo.sh    # another world size
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=../cmake/prepare.sh
source "$REPO/cmake/prepare.sh"
smp_prepare

NP="${SMP_DEMO_NP:-8}"
read -r -a MPIRUN_FLAGS <<<"$(smp_mpirun_flags)"
export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
# Many ranks on few cores: one thread per rank keeps them from starving each other.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

smp_run_demo "$NP"
