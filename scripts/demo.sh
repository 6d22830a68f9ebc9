#!/usr/bin/env bash
# `make demo`: the whole system on the demo config. First the offline view (every member on
# the held-out split), then the live one: serve, replay, label, and read the metrics back.
set -euo pipefail
cd "$(dirname "$0")/.."
ECOSERVE=.venv/bin/ecoserve
REPO=${REPO:-model_repository}
mkdir -p .demo
rm -f .demo/outcomes.db .demo/outcomes.db-wal .demo/outcomes.db-shm

echo "== offline: held-out predictions of every member, analysed as an ecosystem =="
$ECOSERVE predictions digits --repository "$REPO" --out .demo/digits.csv
$ECOSERVE analyze .demo/digits.csv --compressed mlp_a_int8
$ECOSERVE predictions credit --repository "$REPO" --out .demo/credit.csv
$ECOSERVE analyze .demo/credit.csv --group-column sex --group-column age_group
# a regression ecosystem: correct = within 40 of the true value, agreement by 40-wide bins
$ECOSERVE predictions diabetes --repository "$REPO" --out .demo/diabetes.csv
$ECOSERVE analyze .demo/diabetes.csv --tolerance 40 --range 0,400 --group-column sex --group-column age_group --compressed mlp_int8
echo
echo "== live: ecoserve on Ray Serve, traffic and delayed labels =="
export ECOSERVE_FEEDBACK_TOKEN=${ECOSERVE_FEEDBACK_TOKEN:-$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(16))')}
echo "feedback token: $ECOSERVE_FEEDBACK_TOKEN"
exec $ECOSERVE demo ${DEMO_ARGS:-}
