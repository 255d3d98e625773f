#!/usr/bin/env bash
# Train on every worker of a multi-host Cloud TPU VM slice.
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#
# WORKDIR and config.data.data_dir must be paths every worker sees (a shared mount). Each worker
# needs this repository at ~/clipsep-jax; the first run installs it with the TPU build of jax.
# jax.distributed.initialize() finds the other workers by itself on TPU VMs.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  cd ~/clipsep-jax
  python3 -c 'import clipsep_jax' 2>/dev/null || python3 -m pip install -q -e '.[tpu]'
  python3 -m clipsep_jax.main --config=$config --workdir=$workdir --distributed=on$overrides
"
