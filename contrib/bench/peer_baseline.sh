#!/bin/sh
# PySyncObj baseline for the "Node: durable writes" figures in docs/benchmarks.md.
#
#   sh contrib/bench/peer_baseline.sh [RUNS] [SCRIPT]
#
# Runs the shared PySyncObj baseline script RUNS times (default 3) with the venv's Python and
# prints each JSON result, then the medians. It needs `pip install pysyncobj==0.3.17` in that
# venv. PySyncObj keeps its log in memory: it is not durable (see the script's docstring).
set -eu
runs=${1:-3}
script=${2:-/work/shared/peers/pysyncobj_baseline.py}
here=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
i=0
while [ "$i" -lt "$runs" ]; do
    "$python" "$script" | tail -n 1 | tee -a "$out"
    i=$((i + 1))
done
"$python" - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(json.dumps({"median": {
    "runs": len(runs),
    "ops_s": statistics.median(r["throughput"]["ops_s"] for r in runs),
    "p50_ms": statistics.median(r["latency_low_load"]["p50_ms"] for r in runs),
    "p99_ms": statistics.median(r["latency_low_load"]["p99_ms"] for r in runs),
}}))
PY
