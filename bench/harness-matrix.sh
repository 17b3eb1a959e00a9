#!/usr/bin/env bash
# The figures of docs/benchmarks.md "Side by side": rim (bench/peers/rim.js), Nchan and Socket.IO
# in the shared harness, scenario by scenario with the peers interleaved, PASSES times; JSON lines
# to OUT, then the median tables. Needs `cargo build --release --bins` and the harness's
# ./setup.sh once. Bounded: each run stops by itself (bench.js --max-s, bench.sh's watchdog).
#
#   bench/harness-matrix.sh [PASSES=2] [OUT=target/bench/harness-<stamp>.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
PASSES=${1:-2}
OUT=${2:-target/bench/harness-$(date +%Y%m%d-%H%M%S).jsonl}
HARNESS=${HARNESS:-../shared/bench}
mkdir -p "$(dirname "$OUT")"
run() { echo "== $*" >&2; "$HARNESS/bench.sh" "$@" --out "$OUT" >/dev/null || echo "FAILED: $*" >&2; }
for _ in $(seq 1 "$PASSES"); do
  for args in "--scenario s1 --n 20000" "--scenario s2" "--scenario s2 --rate 50 --k 500" \
              "--scenario s3" "--scenario s3 --rate 2000 --k 10000"; do
    for peer in bench/peers/rim.js nchan sio; do
      # shellcheck disable=SC2086
      run --peer "$peer" $args
    done
  done
done
node "$HARNESS/summarize.js" "$OUT"
