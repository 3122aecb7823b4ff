#!/usr/bin/env bash
# Queues the captions array and, after every task has ended (whatever its exit
# code: finalize is the check), the finalize job.
#
#   deploy/slurm/submit.sh pipelines/s3-archive.toml [SHARDS]
#
# The tasks run the image file AUDIOCAP_IMAGE (default audiocap-0.1.0-cuda.sif in the
# submit directory; see captions.sbatch for how to make it).
set -euo pipefail
pipeline=$(realpath "$1") shards=${2:-16}
here=$(dirname "$0")
array=$(sbatch --parsable --array="0-$((shards - 1))" --export="ALL,PIPELINE=$pipeline" \
  "$here/captions.sbatch")
echo "captions array: $array ($shards shards)"
sbatch --parsable --dependency="afterany:$array" --export="ALL,PIPELINE=$pipeline" \
  "$here/finalize.sbatch"
