#!/usr/bin/env bash
# Installs what the test suite needs on a Debian machine, then runs all of it:
# formatting, clippy (warnings are errors), and every unit, property and integration test
# (integration tests start real redis-server processes and real rim processes on loopback).
#
#   scripts/test.sh            # everything (what CI runs)
#   scripts/test.sh -- NAME    # only tests whose name contains NAME
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v cc >/dev/null || need_apt+=(build-essential)
# The chat demo's browser test drives Debian's Chromium with playwright-core (no browser download).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
command -v python3 >/dev/null || need_apt+=(python3)
# The deployment tests run nginx with the shipped conf, and systemd-analyze on the units.
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs), then re-run" >&2
  exit 1
fi
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
command -v cargo-machete >/dev/null || cargo install cargo-machete --locked --quiet

if [ ! -d testkit/browser/node_modules/playwright-core ]; then
  echo "== npm ci (browser test client)"
  (cd testkit/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

filter=()
if [ "${1:-}" = "--" ]; then shift; filter=("$@"); fi

if [ "${CI:-}" = true ]; then
  # CI builds from cold on 2 cores within a time budget: incremental state only costs time
  # there, and line tables keep file:line in panics and backtraces at a fraction of the cost
  # of full debug info (compile and link). Local runs keep the defaults.
  export CARGO_INCREMENTAL=0
  export CARGO_PROFILE_DEV_DEBUG=line-tables-only
  export CARGO_PROFILE_TEST_DEBUG=line-tables-only
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== layout (files under 600 lines; Redis only in store modules)"
scripts/check-layout.sh
echo "== cargo machete (no unused dependencies)"
cargo machete
echo "== cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build --bins (the process tests run the real binaries)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked -- "${filter[@]}"
if [ ${#filter[@]} -eq 0 ]; then
  # The spine, chat and delivery suites once more on a Redis Cluster (three masters with a
  # replica each): the same scenarios, keys spread over slots. Restarting "the" Redis has no
  # meaning there; failovers have their own tests (testkit/tests/redis_failover.rs).
  echo "== spine, chat and delivery on a Redis Cluster (RIM_TEST_REDIS=cluster)"
  RIM_TEST_REDIS=cluster cargo test -p rim-testkit --locked --test spine --test chat --test chaos \
    -- --skip restart_redis_mid_stream
fi

# Coverage-guided fuzzing, briefly: on in CI (CI=true), or with RIM_FUZZ_SECS=N locally.
# Property tests (in the suite above) always run; scripts/fuzz.sh alone runs longer sessions.
fuzz_secs=${RIM_FUZZ_SECS:-}
if [ -z "$fuzz_secs" ] && [ "${CI:-}" = true ]; then fuzz_secs=10; fi
if [ -n "$fuzz_secs" ] && [ ${#filter[@]} -eq 0 ]; then
  scripts/fuzz.sh "$fuzz_secs"
fi
