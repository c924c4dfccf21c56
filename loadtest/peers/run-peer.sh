#!/usr/bin/env bash
# Starts one server for a load-test comparison, pinned to one CPU, in the background.
#
#   loadtest/peers/run-peer.sh NAME PORT [EXTRA_ARGS...]
#
# NAME is one of:
#   roomcast           target/release/roomcast --workers 1 --listen 127.0.0.1:PORT
#   node-ws            node loadtest/peers/node-ws/server.js 127.0.0.1:PORT
#   tungstenite-naive  <target dir>/release/tungstenite-naive 127.0.0.1:PORT
# EXTRA_ARGS are appended to the server's command line.
#
# Prints the server's PID on stdout (one line, nothing else), then waits until 127.0.0.1:PORT
# accepts TCP connections and exits 0, leaving the server running. Stop it with `kill PID`.
# Exits non-zero if the port is already taken, the server exits early, or it is not accepting
# after PEER_START_TIMEOUT seconds (the server is then killed).
#
# Environment:
#   PEER_CPU              CPU list for `taskset -c` (default 0)
#   PEER_LOG_DIR          where the server's stdout/stderr go, as NAME-PORT.log (default /tmp)
#   PEER_START_TIMEOUT    seconds to wait for the port (default 15)
#   ROOMCAST_BIN          roomcast binary (default <repo>/target/release/roomcast)
#   TUNGSTENITE_NAIVE_BIN tungstenite-naive binary (default: /work/target-peers/release/...,
#                         then $CARGO_TARGET_DIR/release/..., then tungstenite-naive/target/release/...)
#   NODE                  node binary (default: node on PATH)
set -euo pipefail

usage() {
    echo "usage: $0 {roomcast|node-ws|tungstenite-naive} PORT [EXTRA_ARGS...]" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
name=$1
port=$2
shift 2
[[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || { echo "bad port: $port" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cpu=${PEER_CPU:-0}
log_dir=${PEER_LOG_DIR:-/tmp}
timeout=${PEER_START_TIMEOUT:-15}
log="$log_dir/$name-$port.log"

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

case $name in
    roomcast)
        bin=${ROOMCAST_BIN:-$repo/target/release/roomcast}
        [[ -x $bin ]] || { echo "roomcast binary not found at $bin (cargo build --release --bin roomcast)" >&2; exit 1; }
        cmd=("$bin" --workers 1 --listen "127.0.0.1:$port")
        ;;
    node-ws)
        [[ -d $here/node-ws/node_modules/ws ]] || { echo "run 'npm ci' in $here/node-ws first" >&2; exit 1; }
        cmd=("${NODE:-node}" "$here/node-ws/server.js" "127.0.0.1:$port")
        ;;
    tungstenite-naive)
        bin=${TUNGSTENITE_NAIVE_BIN:-}
        if [[ -z $bin ]]; then
            for candidate in /work/target-peers/release/tungstenite-naive \
                ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR/release/tungstenite-naive"} \
                "$here/tungstenite-naive/target/release/tungstenite-naive"; do
                if [[ -x $candidate ]]; then bin=$candidate; break; fi
            done
        fi
        [[ -n $bin && -x $bin ]] || {
            echo "tungstenite-naive binary not found; build it: (cd $here/tungstenite-naive && CARGO_TARGET_DIR=/work/target-peers cargo build --release)" >&2
            exit 1
        }
        cmd=("$bin" "127.0.0.1:$port")
        ;;
    *)
        usage
        ;;
esac

if port_open; then
    echo "127.0.0.1:$port is already accepting connections; refusing to start $name there" >&2
    exit 1
fi

mkdir -p "$log_dir"
# taskset execs the server, so $! is the server's own PID.
taskset -c "$cpu" "${cmd[@]}" "$@" >"$log" 2>&1 </dev/null &
pid=$!
echo "$pid"

deadline=$((SECONDS + timeout))
until port_open; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "$name (pid $pid) exited before accepting on port $port; log $log:" >&2
        tail -n 20 "$log" >&2 || true
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "$name (pid $pid) not accepting on port $port after ${timeout}s; killed it (log $log)" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    sleep 0.05
done
echo "$name pid $pid on 127.0.0.1:$port (cpu $cpu, log $log)" >&2
