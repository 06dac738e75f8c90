#!/usr/bin/env bash
# Several machines under torchrun with c10d rendezvous; run the same line on every node.
#   NNODES=2 RDZV=host0:29400 [NPROC=2] [RUN_ID=soup] [MAX_RESTARTS=1] [JOIN_TIMEOUT=300] \
#     [LAST_CALL_TIMEOUT=30] [READ_TIMEOUT=60] [LOCAL_ADDR=<this node's address>] [IS_HOST=1|0] \
#     launch/torchrun_multinode.sh CONFIG [train args...]
# The run dir must be on storage every node sees (checkpoints hold each rank's residues).
# --resume is always passed: after a failure torchrun restarts the workers (up to
# MAX_RESTARTS times) and they continue from the latest checkpoint; a first start has none.
# Where hostnames don't resolve between nodes (e.g. network namespaces), set LOCAL_ADDR, and
# IS_HOST=1 on the node that owns the RDZV address, 0 elsewhere.
# NNODES=MIN:MAX makes the job elastic: when a node is lost the others restart at the smaller
# world size (after LAST_CALL_TIMEOUT seconds) and resume the checkpoint resized. With a fixed
# NNODES the survivors give up after JOIN_TIMEOUT seconds of waiting for the lost node.
# READ_TIMEOUT bounds each request of an agent to the rendezvous store. A torchrun agent cut off
# from node 0 can still block for good in a store request (seen with torch 2.13 after a link
# went down); so when this node has had no worker for JOIN_TIMEOUT + READ_TIMEOUT + AGENT_GRACE
# (default 30) seconds, this script ends torchrun itself.
# Exit codes: 0 done; 75 preempted (this script got SIGTERM: the workers wrote a checkpoint at
# the next step boundary and exited with 75; rerun the same line to continue exactly); other:
# failed (the run dir keeps the last checkpoint; rerun the same line to continue).
set -euo pipefail
config=${1:?usage: $0 CONFIG [train args...]}
shift
conf="join_timeout=${JOIN_TIMEOUT:-300},last_call_timeout=${LAST_CALL_TIMEOUT:-30},read_timeout=${READ_TIMEOUT:-60}"
[ -n "${IS_HOST:-}" ] && conf+=",is_host=$IS_HOST"
args=(--nnodes "${NNODES:?set NNODES}" --nproc-per-node "${NPROC:-2}"
      --rdzv-backend c10d --rdzv-endpoint "${RDZV:?set RDZV=host:port}" --rdzv-id "${RUN_ID:-soup}"
      --max-restarts "${MAX_RESTARTS:-1}" --rdzv-conf "$conf")
[ -n "${LOCAL_ADDR:-}" ] && args+=(--local-addr "$LOCAL_ADDR")
# torchrun runs as a child so that its exit can be explained; SIGTERM / SIGINT are passed on
# (torchrun hands SIGTERM to the workers, which checkpoint at the next step boundary).
torchrun "${args[@]}" -m dist_soup train --config "$config" --resume "$@" &
child=$!
preempted=0
trap 'preempted=1; kill -TERM "$child" 2>/dev/null || true' TERM
trap 'kill -INT "$child" 2>/dev/null || true' INT
has_workers() {  # a child of $1 that is not a zombie (a hung agent does not reap its workers)
    local c st
    for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        st=$(sed 's/.*) //' /proc/"$c"/stat 2>/dev/null | cut -d' ' -f1)
        [ -n "$st" ] && [ "$st" != Z ] && return 0
    done
    return 1
}
idle_limit=$(( ${JOIN_TIMEOUT:-300} + ${READ_TIMEOUT:-60} + ${AGENT_GRACE:-30} ))
idle=0
hung=0
while kill -0 "$child" 2>/dev/null; do
    sleep 1 & wait $! 2>/dev/null || true   # a trapped signal interrupts the wait, not the loop
    if has_workers "$child"; then idle=0; else idle=$(( idle + 1 )); fi
    if (( idle > idle_limit )); then
        hung=1
        echo "torchrun_multinode.sh: no worker for ${idle_limit} s and torchrun still running: ending it" >&2
        kill -TERM "$child" 2>/dev/null || true
        sleep 5
        kill -KILL "$child" 2>/dev/null || true
        break
    fi
done
rc=0
wait "$child" 2>/dev/null && rc=0 || rc=$?
(( hung && rc == 0 )) && rc=1
(( rc != 0 && preempted )) && rc=75
case "$rc" in
    0)  ;;
    75) echo "torchrun_multinode.sh: preempted: a checkpoint was written; run the same line again to continue" >&2 ;;
    *)  echo "torchrun_multinode.sh: torchrun exited with $rc on this node (a worker, a node or the network failed," \
             "or the rendezvous timed out after ${JOIN_TIMEOUT:-300} s); the run dir keeps the last checkpoint:" \
             "run the same line again to continue" >&2 ;;
esac
exit "$rc"
