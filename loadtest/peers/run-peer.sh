#!/usr/bin/env bash
# Starts one server for a load-test comparison, pinned to one CPU, in the background.
#
#   loadtest/peers/run-peer.sh NAME PORT [EXTRA_ARGS...]
#
# NAME is one of:
#   roomcast           target/release/roomcast --workers 1 --listen 127.0.0.1:PORT
#   node-ws            node loadtest/peers/node-ws/server.js 127.0.0.1:PORT
#   tungstenite-naive  <target dir>/release/tungstenite-naive 127.0.0.1:PORT
#   sockudo            $SOCKUDO_BIN on 127.0.0.1:PORT, one Pusher app, configured through its
#                      environment (see below); it speaks Pusher, not the seed protocol
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
#   SOCKUDO_BIN           Sockudo binary (default /work/sockudo-bin/bin/sockudo; it is not part of
#                         this repo: cargo install sockudo --locked --root /work/sockudo-bin)
#   SOCKUDO_APP           its one app as ID:KEY:SECRET (default 1001:loadtest-key:loadtest-secret)
#   SOCKUDO_METRICS_PORT  its Prometheus port, on 127.0.0.1 (default 9601, Sockudo's own)
# Any other Sockudo variable (WEBSOCKET_MAX_MESSAGES, WEBSOCKET_MAX_PAYLOAD_KB, ...) set by the
# caller is passed through.
set -euo pipefail

usage() {
    echo "usage: $0 {roomcast|node-ws|tungstenite-naive|sockudo} PORT [EXTRA_ARGS...]" >&2
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
    sockudo)
        bin=${SOCKUDO_BIN:-/work/sockudo-bin/bin/sockudo}
        [[ -x $bin ]] || {
            echo "sockudo binary not found at $bin (cargo install sockudo --locked --root /work/sockudo-bin)" >&2
            exit 1
        }
        IFS=: read -r app_id app_key app_secret <<<"${SOCKUDO_APP:-1001:loadtest-key:loadtest-secret}"
        # Its app from SOCKUDO_DEFAULT_APP_*, limits off for a load test: the per-IP connect
        # limiter (default 20 per 60 s) off, client events on and unlimited (0), no cap on
        # connections (0; the env app's default is 100). The in-memory (local) adapter, app
        # manager and cache are its defaults; its queue (for webhooks, none here) defaults to
        # Redis and is turned off. No config file is read (it runs in /, away from any
        # config/config.toml). `env` execs Sockudo, so $! below is still its PID.
        # Tokio sizes its runtime from the CPU affinity (one CPU under taskset: one worker);
        # TOKIO_WORKER_THREADS=1 says so explicitly.
        cmd=(env HOST=127.0.0.1 PORT="$port"
            METRICS_HOST=127.0.0.1 METRICS_PORT="${SOCKUDO_METRICS_PORT:-9601}"
            RATE_LIMITER_ENABLED=false QUEUE_DRIVER=none LOG_COLORS_ENABLED=false
            SOCKUDO_DEFAULT_APP_ID="$app_id" SOCKUDO_DEFAULT_APP_KEY="$app_key"
            SOCKUDO_DEFAULT_APP_SECRET="$app_secret"
            SOCKUDO_DEFAULT_APP_ENABLE_CLIENT_MESSAGES=true
            SOCKUDO_DEFAULT_APP_MAX_CLIENT_EVENTS_PER_SECOND=0
            SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=0
            TOKIO_WORKER_THREADS=1
            "$bin")
        cd /
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
