#!/usr/bin/env bash
# Multi-node `medfm pretrain` with torchrun, for clusters without SLURM or Kubernetes.
# Run the same line on every node; only NODE_RANK changes:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 clusters/torchrun/pretrain.sh --config cfg.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 clusters/torchrun/pretrain.sh --config cfg.yaml
#
# torchrun starts one process per GPU (GPUS_PER_NODE, default: all visible GPUs, or 1 on CPU);
# Lightning reads the ranks from torchrun's environment (TorchElasticEnvironment). Resume after
# a failure with the same command plus --resume.
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 on the master node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of the NODE_RANK=0 node)}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l || true)"
  [[ "${GPUS_PER_NODE}" -gt 0 ]] || GPUS_PER_NODE=1
fi

exec torchrun \
  --nnodes="${NNODES}" --node-rank="${NODE_RANK}" --nproc-per-node="${GPUS_PER_NODE}" \
  --master-addr="${MASTER_ADDR}" --master-port="${MASTER_PORT}" \
  --no-python medfm pretrain "$@" \
  "train.num_nodes=${NNODES}" "train.devices=${GPUS_PER_NODE}"
