#!/usr/bin/env bash
# One machine, N processes under torchrun (gloo on CPU, NCCL when CUDA is there).
#   launch/torchrun_single.sh CONFIG [NPROC] [extra dist-soup train args...]
# Example: launch/torchrun_single.sh configs/quickstart.yaml 2 --run-dir runs/qs
set -euo pipefail
config=${1:?usage: $0 CONFIG [NPROC] [train args...]}
nproc=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
exec torchrun --standalone --nproc-per-node "$nproc" -m dist_soup train --config "$config" "$@"
