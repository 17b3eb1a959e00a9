#!/usr/bin/env bash
# S1 on one freshly started comet at several sizes (docs/benchmarks.md, "one comet"): for each
# transport and size, start a comet joined to the running dev cluster
# (scripts/dev-cluster.sh --release), open N idle sessions with rim-bench, stop the comet. A fresh
# comet per run, because memory a previous run freed stays with the allocator.
#
#   bench/s1-one-comet.sh [SIZES="1000 5000 10000 19000"] [TRANSPORTS="ws tcp"]
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000
for t in ${TRANSPORTS:-ws tcp}; do
  for n in ${1:-1000 5000 10000 19000}; do
    RIM_COMET__SERVER_ID=comet-s1 RIM_COMET__LISTEN__HTTP=127.0.0.1:3302 \
      RIM_COMET__LISTEN__TCP=127.0.0.1:3301 RIM_COMET__LISTEN__RPC=127.0.0.1:3309 \
      RIM_COMET__LISTEN__OPS=127.0.0.1:3303 \
      RIM_COMET__LOG_LEVEL=warn target/release/rim-comet --config config/comet.toml &
    comet=$!
    for _ in $(seq 1 50); do curl -sf http://127.0.0.1:3302/healthz >/dev/null && break; sleep 0.2; done
    RUST_LOG=warn target/release/rim-bench --scenario s1 --n "$n" --transport "$t" \
      --ws 127.0.0.1:3302 --tcp 127.0.0.1:3301 --ops 127.0.0.1:3303 --hold-ms 2000 || true
    kill -TERM "$comet"; wait "$comet" || true
  done
done
