#!/usr/bin/env bash
# Runs deploy/airflow/audiocap_dag.py in a real Airflow (issue #9): installs
# apache-airflow into a virtualenv (target/airflow-venv, once: ~2 min), then the
# opt-in test that runs `airflow dags test` (SQLite) with the bundled model over the
# bundled samples: two mapped shard tasks and finalize (~30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${AIRFLOW_VENV:-target/airflow-venv}
version=${AIRFLOW_VERSION:-3.1.8}
if [ ! -x "$venv/bin/airflow" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "apache-airflow==$version"
fi
AUDIOCAP_AIRFLOW="$(realpath "$venv/bin/airflow")" \
  cargo test --test tests deploy_recipes::airflow_runs_the_dag_end_to_end_when_installed -- --nocapture
