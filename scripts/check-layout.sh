#!/usr/bin/env bash
# The layout rules docs/architecture.md states, checked so they cannot drift:
#  1. no Rust file under a crate's src/ is over 600 lines (split by concern before that);
#  2. in logic and job, only store modules (store/ folders, store*.rs) talk to Redis;
#  3. no crate's top-level modules import each other in a circle (scripts/module-cycles.py).
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
max=600
while IFS= read -r f; do
  n=$(wc -l < "$f")
  if [ "$n" -gt "$max" ]; then
    echo "layout: $f has $n lines (at most $max: split it by concern)" >&2
    status=1
  fi
done < <(find . -path ./target -prune -o -path ./fuzz -prune -o -path '*/src/*.rs' -print)

pattern='redis::cmd|redis::pipe|Script::new|\.xadd|\.xreadgroup|\.query_async'
if hits=$(grep -rnE "$pattern" logic/src job/src | grep -vE '^(logic|job)/src/(store/|store[^/]*\.rs)'); then
  echo "layout: Redis used outside a store module (move it behind the tier's store traits):" >&2
  echo "$hits" >&2
  status=1
fi
for src in */src; do
  [ -f "$src/lib.rs" ] || continue
  scripts/module-cycles.py "$src" || status=1
done
exit $status
