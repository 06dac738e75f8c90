#!/usr/bin/env bash
# dist_soup's DeepSpeed plugin on one machine, N processes (gloo on CPU, NCCL when CUDA is there).
#   launch/deepspeed.sh CONFIG DS_JSON [NPROC] [extra dist-soup train args...]
# Example: launch/deepspeed.sh configs/quickstart.yaml configs/deepspeed.json 2 --run-dir runs/qs-ds
# LAUNCHER=torchrun (default) or LAUNCHER=deepspeed (DeepSpeed's own launcher, local resources).
# DeepSpeed JIT-builds a shared-memory op on first use (~25 s, needs g++ and ninja): it is cached
# in TORCH_EXTENSIONS_DIR, by default ~/.cache/dist_soup/torch_extensions.
set -euo pipefail
config=${1:?usage: $0 CONFIG DS_JSON [NPROC] [train args...]}
ds_json=${2:?usage: $0 CONFIG DS_JSON [NPROC] [train args...]}
nproc=${3:-2}
shift $(( $# >= 3 ? 3 : 2 ))
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dist_soup/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case ${LAUNCHER:-torchrun} in
  torchrun)
    exec torchrun --standalone --nproc-per-node "$nproc" -m dist_soup train --config "$config" --deepspeed "$ds_json" "$@" ;;
  deepspeed)
    exec deepspeed --num_gpus "$nproc" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
      --no_local_rank --module dist_soup train --config "$config" --deepspeed "$ds_json" "$@" ;;
  *) echo "LAUNCHER must be torchrun or deepspeed, got ${LAUNCHER}" >&2; exit 2 ;;
esac
