#!/usr/bin/env bash
# Fine-tune on one GPU host (one process, all its GPUs in the mesh).
#
#   scripts/launch_gpu.sh CONFIG [--config.KEY=VALUE ...]
#
# Environment (all optional):
#   CUDA_VISIBLE_DEVICES   which GPUs to use (default: all)
#   XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX preallocates (default here 0.9)
#   MESH_DATA / MESH_FSDP  mesh shape; default: all GPUs data-parallel (fsdp=1)
#
# Example:
#   scripts/launch_gpu.sh configs/finetune.py:profound_conv,segmentation \
#       --config.data.root=/data/cohort/manifest.csv --config.model.pretrained=models/profound_conv
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,15p' "$0"; exit 2
fi
config="$1"; shift
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec vfm-align finetune --config "$config" \
  --config.mesh.data="${MESH_DATA:--1}" --config.mesh.fsdp="${MESH_FSDP:-1}" "$@"
