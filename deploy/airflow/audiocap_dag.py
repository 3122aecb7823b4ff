"""audiocap on Airflow: one mapped task per shard, then the dataset-level commit.

Copy this file into the DAGs folder of a deployment whose workers have the
`audiocap` binary (or run the image, scripts/build-image.sh --gpu's
registry.example.com/audiocap:0.1.0-cuda once pushed, in a KubernetesPodOperator
with the same exit code handling). Settings come from the environment of the
scheduler and workers:

  AUDIOCAP_PIPELINE  the pipeline file (required), e.g. pipelines/s3-archive.toml
  AUDIOCAP_SHARDS    shards per run (default 4): one mapped task each
  AUDIOCAP_OUTPUT    optional output URI with `{ds}` for the run's logical date,
                     e.g. s3://bucket/captions/date={ds}/ (one dataset per run)
  AUDIOCAP_BIN       the audiocap executable (default: `audiocap` on PATH)

Exit codes decide what Airflow does:
  audiocap run       0 done; 1 fault worth a retry (the retried shard resumes);
                     2 invalid pipeline: fail, no retry; 3 more than
                     run.max_failed_fraction of the inputs failed: they are committed
                     as rows with errors, so the task is skipped (marked, not retried)
  audiocap finalize  0 finalized; 4 a shard is not committed yet: retry;
                     2 the shards do not make one dataset: fail, no retry
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task
from airflow.exceptions import AirflowException, AirflowFailException, AirflowSkipException

SHARDS = int(os.environ.get("AUDIOCAP_SHARDS", "4"))
PIPELINE = os.environ.get("AUDIOCAP_PIPELINE", "pipelines/s3-archive.toml")
OUTPUT = os.environ.get("AUDIOCAP_OUTPUT", "")
AUDIOCAP = os.environ.get("AUDIOCAP_BIN", "audiocap")


def _output_override(ds: str) -> list[str]:
    return ["--set", f"output.uri={OUTPUT.format(ds=ds)}"] if OUTPUT else []


def _audiocap(args: list[str]) -> int:
    """Runs audiocap with its output in the task log; returns the exit code."""
    print("+", AUDIOCAP, " ".join(args), flush=True)
    return subprocess.run([AUDIOCAP, *args], check=False).returncode


@dag(
    dag_id="audiocap_captions",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=2)},
    tags=["audiocap"],
)
def audiocap_captions():
    @task
    def caption_shard(index: int, ds: str | None = None) -> None:
        args = ["run", PIPELINE, "--shard-index", str(index), "--shard-count", str(SHARDS)]
        code = _audiocap(args + _output_override(ds or ""))
        if code == 0:
            return
        if code == 2:
            raise AirflowFailException("invalid pipeline (exit code 2): not retried")
        if code == 3:
            raise AirflowSkipException(
                "more than run.max_failed_fraction of the shard's inputs failed (exit code 3); "
                "they are committed as rows with errors"
            )
        raise AirflowException(f"audiocap run exited {code}: retried, the shard resumes")

    # Runs when every shard succeeded or was skipped (exit 3): the shards committed.
    @task(trigger_rule="none_failed", retries=6, retry_delay=timedelta(minutes=1))
    def finalize(ds: str | None = None) -> None:
        code = _audiocap(["finalize", PIPELINE] + _output_override(ds or ""))
        if code == 0:
            return
        if code == 2:
            raise AirflowFailException("the shards do not make one dataset (exit code 2)")
        raise AirflowException(f"audiocap finalize exited {code}: shards not committed yet")

    caption_shard.expand(index=list(range(SHARDS))) >> finalize()


audiocap_captions()
