#!/bin/bash
# A randomised fuzz campaign over tests/test_fuzz.py, one test process at a time (OMP_NUM_THREADS=1), as recorded in
# bench/RESULTS.md ("Fuzz campaign at scale").
#   usage: bench/fuzz_campaign.sh TAG TEST:N:SEED [TEST:N:SEED ...]
#   e.g.   bench/fuzz_campaign.sh run1 test_fuzz_jtj:12000:2608663838 test_fuzz_ensemble_metric:8000:3153697512
# N is PYGEO_FUZZ_EXAMPLES (an op test runs N cases, the contract tests 25/40 or 15/40 of N), SEED PYGEO_FUZZ_SEED.
# Each test logs to $OUT/fuzz_TAG_TEST.log (OUT defaults to /tmp); $OUT/fuzz_TAG_summary.txt gets one line per test:
# wall time, exit status and the cases hypothesis ran (passing / failing, from --hypothesis-show-statistics; the
# file's explicit @examples run too and are not counted). A test stops at its first failure (-x).
set -u
TAG=$1; shift
OUT=${OUT:-/tmp}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
cd "$ROOT/tests"
for spec in "$@"; do
  IFS=: read -r name N seed <<< "$spec"
  log=$OUT/fuzz_${TAG}_${name}.log
  start=$(date +%s)
  echo "$(date -u +%H:%M:%S) start $name N=$N seed=$seed" >> "$OUT/fuzz_${TAG}_summary.txt"
  OMP_NUM_THREADS=1 PYGEO_FUZZ_EXAMPLES=$N PYGEO_FUZZ_SEED=$seed timeout 3000 "$PYTHON" -m pytest -q -x \
    "test_fuzz.py::$name" -p no:cacheprovider --hypothesis-show-statistics > "$log" 2>&1
  rc=$?
  end=$(date +%s)
  cases=$(grep -oE "[0-9]+ passing, [0-9]+ failing" "$log" | awk '{p += $1; f += $3} END {print p " passing " f " failing"}')
  echo "$(date -u +%H:%M:%S) done $name N=$N seed=$seed rc=$rc wall=$((end - start))s cases: $cases | $(tail -1 "$log")" \
    >> "$OUT/fuzz_${TAG}_summary.txt"
done
echo "ALL DONE" >> "$OUT/fuzz_${TAG}_summary.txt"
