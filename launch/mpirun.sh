#!/usr/bin/env bash
# N processes under mpirun; collectives go through mpi4py (no torch.distributed).
#   launch/mpirun.sh CONFIG [NPROC] [train args...]
# `pip install 'dist_soup[mpi]'` (mpi4py + mpich) brings an mpirun with no system packages.
# Open MPI as root needs: MPIRUN_ARGS="--allow-run-as-root --oversubscribe".
set -euo pipefail
config=${1:?usage: $0 CONFIG [NPROC] [train args...]}
nproc=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
py=${PYTHON:-python}
exec mpirun ${MPIRUN_ARGS:-} -n "$nproc" "$py" -m dist_soup train --config "$config" "$@"
