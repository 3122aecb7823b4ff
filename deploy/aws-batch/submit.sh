#!/usr/bin/env bash
# Submits one dataset as an AWS Batch array job (one child per shard; each reads
# AWS_BATCH_JOB_ARRAY_INDEX, the shard count is passed), then the finalize job,
# which depends on the whole array. Push the image (scripts/build-image.sh --gpu) to
# ECR, name it in both definitions, then register them:
#
#   aws ecr get-login-password | buildah login --username AWS --password-stdin 123456789012.dkr.ecr.us-east-1.amazonaws.com
#   buildah push localhost/audiocap:0.1.0-cuda docker://123456789012.dkr.ecr.us-east-1.amazonaws.com/audiocap:0.1.0-cuda
#   aws batch register-job-definition --cli-input-json file://deploy/aws-batch/job-definition.json
#   aws batch register-job-definition --cli-input-json file://deploy/aws-batch/finalize-job-definition.json
#   deploy/aws-batch/submit.sh QUEUE s3://my-bucket/audio/ s3://my-bucket/captions/ 16
#
# Children that exit 2 (invalid pipeline) or 3 (more than run.max_failed_fraction of
# the inputs failed: they are rows with errors, already committed) are not retried;
# any other failure is retried up to 3 attempts. The finalize job starts once the
# whole array has finished. When a child failed for good, `audiocap status OUTPUT`
# names its shard: run that shard again (`--shard-index I --shard-count N`, it
# resumes), then submit the finalize job again; finalize exits 4 while a shard is
# not committed and 2 when the shards do not make one dataset.
set -euo pipefail
queue=$1 input=$2 output=$3 shards=${4:-16}
array_id=$(aws batch submit-job --job-name audiocap-captions --job-queue "$queue" \
  --job-definition audiocap-captions --array-properties "size=$shards" \
  --parameters "shards=$shards,input=input.sources=[\"$input\"],output=output.uri=$output" \
  --query jobId --output text)
echo "captions array job: $array_id ($shards shards)"
finalize_id=$(aws batch submit-job --job-name audiocap-finalize --job-queue "$queue" \
  --job-definition audiocap-finalize --depends-on "jobId=$array_id" \
  --parameters "output=$output" --query jobId --output text)
echo "finalize job: $finalize_id (after $array_id)"
