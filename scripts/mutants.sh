#!/usr/bin/env bash
# Mutation check of the delivery path: which small changes to the code that routes, delivers,
# acknowledges and de-duplicates pushes the test suite notices. cargo-mutants changes one thing
# at a time (a condition, a return value, an operator) in a scratch copy of the tree, rebuilds,
# and runs the tests of the mutated crate; a mutant the tests pass is "missed" and needs a test
# or an explanation (docs/delivery.md, "Mutation check").
#
# It is hours of work on a 2-core machine (about a minute per mutant), so it is not part of CI.
# Shard it across runs or machines:
#
#   scripts/mutants.sh                  # everything in scope
#   scripts/mutants.sh --shard 0/4      # a quarter (k/n; run 0/4 .. 3/4)
#   scripts/mutants.sh --list           # what would be tried
#   scripts/mutants.sh -f comet/src/session.rs   # narrower than the default scope
#   scripts/mutants.sh --iterate        # only what the last run missed or could not judge
#
# Results go to mutants.out/ (outcomes.json, missed.txt, caught.txt, timeout.txt, unviable.txt).
# The tests of the mutated crate run against a real redis-server, as in the suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null; then
  cargo install cargo-mutants --locked --version '^27'
fi
command -v redis-server >/dev/null || { echo "mutants: redis-server is needed (scripts/test.sh installs it)" >&2; exit 1; }

# The delivery path. Left out on purpose: job's in-memory store twin (a test double), config
# validation, metrics rendering and main (each has its own tests, and a mutant there cannot
# lose or repeat a push); logic's session, history and directory stores are in the chat and
# history suites' scope, not delivery's.
scope=(
  -f 'job/src/partition/*.rs'
  -f job/src/lease.rs
  -f job/src/registry.rs
  -f job/src/route.rs
  -f job/src/store/redis_stream.rs
  -f job/src/store/redis_leases.rs
  -f job/src/store/redis_directory.rs
  -f job/src/store/redis_conn.rs
  -f comet/src/session.rs
  -f comet/src/push.rs
  -f comet/src/deliver.rs
  -f logic/src/store/redis_streams.rs
)
# Tests, not test doubles or their helpers, are what a mutant must fail.
exclude=(
  -e 'job/src/partition/tests*.rs'
)

narrowed=false
for a in "$@"; do
  case "$a" in -f|--file|-f*|--file=*) narrowed=true ;; esac
done
if $narrowed; then scope=(); fi

# `--profile mutants` (Cargo.toml): the dev profile without debug info, so each mutant links
# faster. A test run stuck by a mutant (an endless loop, a lost wake-up) is cut after 90 s: the
# unmutated tests of each crate take well under 30 s.
exec cargo mutants \
  --profile mutants \
  --timeout 90 \
  --build-timeout 900 \
  "${scope[@]}" "${exclude[@]}" "$@"
