#!/usr/bin/env bash
# Prints the path of an `airflow` executable for the DAG test (tests/deploy_recipes.rs),
# installing Apache Airflow into a virtualenv under target/ the first time: every
# package pinned by scripts/airflow-constraints.txt (apache-airflow 3.1.8), apart from
# the Python packages the other tests use. Installs again when the pins change.
# ~30 s with pip's cache warm, longer on a fresh machine (~280 MB installed).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${AIRFLOW_VENV:-target/airflow-venv}
pins=scripts/airflow-constraints.txt
mkdir -p "$(dirname "$venv")"
(
    # One install at a time (tests run in parallel, and so may two test runs).
    flock 9
    want=$(sha256sum <"$pins")
    if [ ! -x "$venv/bin/airflow" ] || [ "$(cat "$venv/.pins" 2>/dev/null)" != "$want" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$pins" apache-airflow >&2
        echo "$want" >"$venv/.pins"
    fi
) 9>"$venv.lock"
realpath "$venv/bin/airflow"
