#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time each, starting from the corpus in
# fuzz/corpus/<target>. New interesting inputs go to fuzz/corpus-new/<target> (ignored by git), so
# a test run leaves the tree clean; to keep them, move them into fuzz/corpus/<target> and commit
# after `cargo fuzz cmin`.
#
#   scripts/fuzz.sh          # 60 s per target
#   scripts/fuzz.sh 10       # 10 s per target (what CI runs)
#
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the script. Uses cargo-fuzz with
# RUSTC_BOOTSTRAP=1 so the stable toolchain can build the sanitizer flags libFuzzer needs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in frame_decoder client_json; do
  echo "== fuzz $target for ${SECS}s"
  mkdir -p "corpus-new/$target"
  # libFuzzer writes new inputs to the first corpus directory and reads them all.
  cargo fuzz run -O "$target" "corpus-new/$target" "corpus/$target" -- -max_total_time="$SECS" -max_len=8192 -print_final_stats=1 2>&1 \
    | grep -E "^(Done|stat::number_of_executed_units|==|SUMMARY|thread)" || true
  if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
    echo "fuzz target $target found a crash: fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
