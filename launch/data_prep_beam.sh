#!/usr/bin/env bash
# Run the data-preparation job through Apache Beam on a Flink or Spark cluster.
#
#   launch/data_prep_beam.sh flink HOST:8081 vggsound /mnt/shared/vggsound /mnt/shared/tfds \
#       REGISTRY/clipsep-beam-worker:latest [--clip=openai/clip-vit-base-patch32 ...]
#   launch/data_prep_beam.sh spark spark://HOST:7077 music /mnt/shared/music /mnt/shared/tfds \
#       REGISTRY/clipsep-beam-worker:latest
#
# The input and output folders must be mounted at the same paths on every worker. The worker
# image is apache/beam_python3.11_sdk with this package installed (pip install
# 'clipsep-jax[beam]') and ffmpeg for video inputs.
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: $0 flink|spark MASTER DATASET MANUAL_DIR DATA_DIR WORKER_IMAGE [flags ...]" >&2
  exit 2
fi
runner=$1 master=$2 dataset=$3 manual_dir=$4 data_dir=$5 image=$6
shift 6
case "$runner" in
  flink) options="--runner=FlinkRunner --flink_master=$master" ;;
  spark) options="--runner=SparkRunner --spark_master_url=$master" ;;
  *) echo "runner must be flink or spark, got $runner" >&2; exit 2 ;;
esac
python3 -m data_prep.build --dataset="$dataset" --manual_dir="$manual_dir" \
  --data_dir="$data_dir" "$@" \
  --beam_options="$options --environment_type=DOCKER --environment_config=$image"
