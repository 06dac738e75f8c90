#!/usr/bin/env bash
# Several machines under torchrun with c10d rendezvous; run the same line on every node.
#   NNODES=2 RDZV=host0:29400 [NPROC=2] [RUN_ID=soup] [MAX_RESTARTS=1] \
#     [LOCAL_ADDR=<this node's address>] [IS_HOST=1|0] launch/torchrun_multinode.sh CONFIG [train args...]
# The run dir must be on storage every node sees (checkpoints hold each rank's residues).
# --resume is always passed: after a failure torchrun restarts the workers (up to
# MAX_RESTARTS times) and they continue from the latest checkpoint; a first start has none.
# Where hostnames don't resolve between nodes (e.g. network namespaces), set LOCAL_ADDR, and
# IS_HOST=1 on the node that owns the RDZV address, 0 elsewhere.
set -euo pipefail
config=${1:?usage: $0 CONFIG [train args...]}
shift
args=(--nnodes "${NNODES:?set NNODES}" --nproc-per-node "${NPROC:-2}"
      --rdzv-backend c10d --rdzv-endpoint "${RDZV:?set RDZV=host:port}" --rdzv-id "${RUN_ID:-soup}"
      --max-restarts "${MAX_RESTARTS:-1}")
[ -n "${LOCAL_ADDR:-}" ] && args+=(--local-addr "$LOCAL_ADDR")
[ -n "${IS_HOST:-}" ] && args+=(--rdzv-conf "is_host=$IS_HOST")
exec torchrun "${args[@]}" -m dist_soup train --config "$config" --resume "$@"
