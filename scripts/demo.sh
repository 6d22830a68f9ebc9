#!/usr/bin/env bash
# `make demo`: replay each demo ecosystem's held-out split through its members
# and print the ecosystem metrics. (Grows into the served demo as serving lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
ECOSERVE=.venv/bin/ecoserve
REPO=${REPO:-model_repository}
OUT=.demo
mkdir -p "$OUT"

echo "== digits: held-out replay through every member (ONNX Runtime) =="
$ECOSERVE predictions digits --repository "$REPO" --out "$OUT/digits.csv"
$ECOSERVE analyze "$OUT/digits.csv" --compressed mlp_a_int8
echo
echo "== credit: held-out replay, by declared subgroup =="
$ECOSERVE predictions credit --repository "$REPO" --out "$OUT/credit.csv"
$ECOSERVE analyze "$OUT/credit.csv" --group-column sex --group-column age_group
echo
echo "Predictions tables: $OUT/digits.csv, $OUT/credit.csv  (ecoserve analyze FILE --json for JSON)"
