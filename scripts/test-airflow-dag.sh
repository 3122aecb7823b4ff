#!/usr/bin/env bash
# Runs deploy/airflow/audiocap_dag.py in a real Airflow (issue #9): the test that runs
# `airflow dags test` (SQLite) with the bundled model over the bundled samples, two
# mapped shard tasks and finalize (~10 s), with Airflow from scripts/airflow-venv.sh
# (installed into target/airflow-venv the first time). `cargo test` runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
AUDIOCAP_AIRFLOW="$(scripts/airflow-venv.sh)" \
  cargo test --test tests deploy_recipes::airflow_runs_the_dag_end_to_end -- --nocapture
