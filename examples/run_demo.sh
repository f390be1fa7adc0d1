#!/usr/bin/env bash
# The first smp demo, from a bare Debian machine:
#
#   bash examples/run_demo.sh
#
# Installs missing Debian/PyPI packages and builds (cmake/prepare.sh), then runs
# examples/python/demo.py on 8 ranks under mpirun: the rank grid of
# pipeline_parallel_degree=2 x tensor_parallel_degree=2 x 2 data-parallel
# replicas, the groups, and a few checked collectives.
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

smp_step "mpirun -np $NP ${MPIRUN_FLAGS[*]} python3 examples/python/demo.py"
exec timeout 300 mpirun -np "$NP" "${MPIRUN_FLAGS[@]}" -x PYTHONPATH -x OMP_NUM_THREADS \
  python3 "$REPO/examples/python/demo.py"
