#!/usr/bin/env bash
# Sets up and starts a local rim cluster: one redis-server, one logic, one job worker and two
# comets, from the example configs in config/ (ports changed for the second comet by environment
# variables). Runs in the foreground; Ctrl-C stops everything.
#
#   scripts/dev-cluster.sh                   # debug build
#   scripts/dev-cluster.sh --release         # optimised build
#   scripts/dev-cluster.sh --redis-cluster   # on a Redis Cluster of 3 masters with a replica each
#                                            # (ports 6391-6396) instead of one redis-server
#
# DEV ONLY: logic runs in trust mode (clients' mids are believed) and push routes have no secret.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROFILE=debug; BUILD_FLAGS=(); REDIS_CLUSTER=
for arg in "$@"; do
  case $arg in
    --release) PROFILE=release; BUILD_FLAGS=(--release) ;;
    --redis-cluster) REDIS_CLUSTER=1 ;;
    *) echo "unknown option $arg (--release, --redis-cluster)" >&2; exit 64 ;;
  esac
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v cc >/dev/null || need_apt+=(build-essential)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

cargo build "${BUILD_FLAGS[@]}" --bins
BIN="$ROOT/target/$PROFILE"
RUN="$ROOT/.dev-cluster"
mkdir -p "$RUN"
REDIS_PORT=${RIM_DEV_REDIS_PORT:-6390}
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping cluster"
  # Reverse start order: comets drain and unregister while logic is still up.
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
}
trap cleanup INT TERM EXIT

start() { # name, command...
  local name=$1; shift
  "$@" >"$RUN/$name.log" 2>&1 &
  pids+=($!)
  echo "started $name (pid $!, log .dev-cluster/$name.log)"
}
wait_http() { # url
  for _ in $(seq 1 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for $1; see .dev-cluster/*.log" >&2; exit 1
}

wait_redis() { # port
  for _ in $(seq 1 50); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "redis on $1 did not start; see .dev-cluster/*.log" >&2; exit 1
}
if [ -z "$REDIS_CLUSTER" ]; then
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$RUN" --save "" --appendonly yes
  wait_redis "$REDIS_PORT"
  export RIM_LOGIC__REDIS__URL=$REDIS_URL RIM_JOB__REDIS__URL=$REDIS_URL
else
  # A fresh cluster each run: node ids and slots live in each node's nodes.conf.
  nodes=(); addrs=()
  for port in 6391 6392 6393 6394 6395 6396; do
    rm -rf "$RUN/redis-$port"; mkdir -p "$RUN/redis-$port"
    start "redis-$port" redis-server --port "$port" --bind 127.0.0.1 --dir "$RUN/redis-$port" \
      --save "" --appendonly yes --cluster-enabled yes --cluster-config-file nodes.conf \
      --repl-diskless-sync-delay 0
    nodes+=("redis://127.0.0.1:$port"); addrs+=("127.0.0.1:$port")
  done
  for port in 6391 6392 6393 6394 6395 6396; do wait_redis "$port"; done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$RUN/redis-cluster-create.log"
  for _ in $(seq 1 100); do
    redis-cli -p 6391 cluster info | grep -q cluster_state:ok && break; sleep 0.1
  done
  REDIS_URL=$(IFS=,; echo "${nodes[*]}")
  export RIM_LOGIC__REDIS__NODES=$REDIS_URL RIM_JOB__REDIS__NODES=$REDIS_URL
fi
# The chat demo shows join/leave notices for chat:// rooms (off by default: big rooms drown in them).
export RIM_LOGIC__CHAT__PRESENCE_ROOM_TYPES=${RIM_LOGIC__CHAT__PRESENCE_ROOM_TYPES:-chat}
start logic "$BIN/rim-logic" --config config/logic.toml
wait_http http://127.0.0.1:3111/readyz
start job "$BIN/rim-job" --config config/job.toml
start comet-1 "$BIN/rim-comet" --config config/comet.toml
start comet-2 env RIM_COMET__SERVER_ID=comet-2 RIM_COMET__LISTEN__HTTP=127.0.0.1:3202 \
  RIM_COMET__LISTEN__TCP=127.0.0.1:3201 RIM_COMET__LISTEN__RPC=127.0.0.1:3209 \
  RIM_COMET__LISTEN__OPS=127.0.0.1:3203 "$BIN/rim-comet" --config config/comet.toml
wait_http http://127.0.0.1:3102/healthz
wait_http http://127.0.0.1:3202/healthz

cat <<MSG

rim dev cluster is up (Ctrl-C stops it):
  chat demo              http://127.0.0.1:3111/   (open it in two browser windows)
  HTTP API               http://127.0.0.1:3111/goim/...
  comet-1                ws://127.0.0.1:3102/sub   tcp 127.0.0.1:3101   metrics http://127.0.0.1:3103/metrics
  comet-2                ws://127.0.0.1:3202/sub   tcp 127.0.0.1:3201   metrics http://127.0.0.1:3203/metrics
  redis                  $REDIS_URL
  live comets            curl -s http://127.0.0.1:3111/goim/nodes/instances
  push to a room         curl -s -d 'hello' 'http://127.0.0.1:3111/goim/push/room?operation=1000&type=live&room=1000'
MSG
wait
