#!/usr/bin/env bash
# Fine-tune on a (multi-host) Cloud TPU VM slice: the same command runs on every worker.
#
#   scripts/launch_tpu_vm.sh TPU_NAME ZONE CONFIG [--config.KEY=VALUE ...]
#
# Each worker calls jax.distributed.initialize() (the TPU runtime supplies coordinator address,
# process count and id), loads only its share of every batch (the loader shards by
# jax.process_index()), and the train step sees global arrays built with
# jax.make_array_from_process_local_data. Checkpoints must go to storage every worker can
# reach (e.g. a gs:// bucket or a shared filesystem): set --config.run.workdir accordingly.
#
# Environment (optional): MESH_DATA / MESH_FSDP (default: all chips data-parallel),
#   REPO_DIR (checkout path on the workers, default ~/vfm-align).
#
# Example:
#   scripts/launch_tpu_vm.sh my-v5e-16 us-central2-b configs/finetune.py:provicnet,segmentation \
#       --config.data.root=/mnt/cohort/manifest.csv --config.run.workdir=/mnt/runs/seg
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,18p' "$0"; exit 2
fi
tpu="$1"; zone="$2"; config="$3"; shift 3
repo="${REPO_DIR:-~/vfm-align}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd $repo && VFM_ALIGN_DISTRIBUTED=1 vfm-align finetune --no-progress --config $config \
    --config.mesh.data=${MESH_DATA:--1} --config.mesh.fsdp=${MESH_FSDP:-1} $args"
