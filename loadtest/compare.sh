#!/usr/bin/env bash
# Runs the PERFORMANCE.md comparison: every scenario against roomcast and the peers, one
# server at a time, the server pinned to CPU 0 and the load generator to CPU 1. Each run's
# JSON report goes to loadtest/results/<scenario>--<server>.json; `python3
# loadtest/charts.py loadtest/results` turns them into tables and charts.
#
#   loadtest/compare.sh [SCENARIO...]     # default: all of them
#
# Scenarios: fanout-1k  fanout-5k-saturated  rooms-1000x10  idle-19k  latency-vs-fanout
#            rss-vs-connections  workers-1-vs-2  churn
# Environment: PEERS (default: all three), RESULTS_DIR, PORT, LATENCY_SIZES,
#              CHURN_DURATION (default 20s), CHURN_WORKERS (default 50).
# Needs: target/release/roomcast and roomcast-loadtest (cargo build --release --workspace),
# the peers built (see loadtest/peers/README.md). Loopback only; every run is bounded.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
out=${RESULTS_DIR:-$here/results}
loadtest=${LOADTEST_BIN:-$repo/target/release/roomcast-loadtest}
peers=${PEERS:-roomcast node-ws tungstenite-naive}
port=${PORT:-19500}
mkdir -p "$out"

# Rate limits are a production safety net, not what these runs measure: off for roomcast, as
# the peers have none.
roomcast_args=(--rate-limit 0)

start() { # NAME [EXTRA...] -> sets $pid
    local name=$1; shift
    local extra=()
    [[ $name == roomcast ]] && extra=("${roomcast_args[@]}")
    pid=$("$here/peers/run-peer.sh" "$name" "$port" "${extra[@]}" "$@")
}

stop() { "$here/peers/stop-peer.sh" "$pid" "$port"; }

run() { # FILE SCENARIO-ARGS... ; the generator on CPU 1, one thread
    local file=$1; shift
    echo "== $file" >&2
    taskset -c 1 "$loadtest" --url "ws://127.0.0.1:$port/" --server-pid "$pid" --threads 1 \
        --json "$@" > "$out/$file.json"
    python3 - "$out/$file.json" <<'PY' >&2
import json, sys
r = json.load(open(sys.argv[1])); res = r["results"]
keys = ["deliveries_per_second", "lost", "server_cpu_us_per_delivery", "server_rss_per_connection_bytes",
        "established", "join_storm_seconds", "handshakes_per_second", "cycles_per_second",
        "cycles_failed", "server_cpu_us_per_cycle"]
lat = res.get("latency", {})
print("   ", {k: res.get(k) for k in keys if k in res},
      {k: lat.get(k) for k in ("p50_us", "p99_us") if k in lat},
      "generator saturated" if any("saturated" in w for w in r.get("warnings", [])) else "")
PY
}

scenario() {
    case $1 in
    fanout-1k)
        for peer in $peers; do
            start "$peer"
            run "fanout-1k--$peer" fanout --subscribers 1000 --rooms 1 --publishers 1 \
                --rate 100 --duration 10s
            stop
        done ;;
    fanout-5k-saturated)
        for peer in $peers; do
            start "$peer"
            run "fanout-5k-saturated--$peer" fanout --subscribers 5000 --rooms 1 \
                --publishers 1 --rate 0 --duration 10s --timeout 60s
            stop
        done ;;
    rooms-1000x10)
        for peer in $peers; do
            start "$peer"
            run "rooms-1000x10--$peer" fanout --subscribers 9900 --rooms 1000 \
                --publishers 100 --rate 10 --duration 10s --source-ips 127.0.0.1-127.0.0.4
            stop
        done ;;
    idle-19k)
        for peer in $peers; do
            start "$peer"
            run "idle-19k--$peer" --source-ips 127.0.0.1-127.0.0.20 connections \
                --connections 19000 --ramp 5000 --hold 5s
            stop
        done ;;
    latency-vs-fanout)
        # The peers' join storm at 10,000 (50M member_joined frames) takes minutes each:
        # LATENCY_SIZES="100 1000 5000" leaves it out.
        for subs in ${LATENCY_SIZES:-100 1000 5000 10000}; do
            for peer in $peers; do
                start "$peer"
                run "latency-vs-fanout-$subs--$peer" --source-ips 127.0.0.1-127.0.0.4 \
                    fanout --subscribers "$subs" --rooms 1 --publishers 1 --rate 10 \
                    --duration 10s --timeout 60s
                stop
            done
        done ;;
    rss-vs-connections)
        for n in 1000 5000 10000 19000; do
            start roomcast
            run "rss-vs-connections-$n--roomcast" --source-ips 127.0.0.1-127.0.0.20 \
                connections --connections "$n" --ramp 5000 --hold 3s
            stop
        done ;;
    workers-1-vs-2)
        # Both cores for the server here, so the generator shares them: compare the two runs
        # with each other only.
        for workers in 1 2; do
            taskset -c 0,1 "${ROOMCAST_BIN:-$repo/target/release/roomcast}" \
                --listen "127.0.0.1:$port" --workers "$workers" "${roomcast_args[@]}" \
                > /tmp/roomcast-workers-$workers.log 2>&1 &
            pid=$!
            until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.1; done
            echo "== workers-$workers" >&2
            "$loadtest" --url "ws://127.0.0.1:$port/" --server-pid "$pid" --json fanout \
                --subscribers 5000 --rooms 1 --publishers 1 --rate 0 --duration 10s \
                --timeout 60s > "$out/workers-$workers--roomcast.json"
            stop
        done ;;
    churn)
        # Whole lifecycles: connect, welcome, join_room, room_message, leave_room, close. Every
        # peer implements that subset (peers/README.md). Source addresses spread the client
        # ports; TIME_WAIT stays on the server's side.
        for peer in $peers; do
            start "$peer"
            run "churn--$peer" --source-ips 127.0.0.1-127.0.0.4 churn \
                --workers "${CHURN_WORKERS:-50}" --duration "${CHURN_DURATION:-20s}"
            stop
        done ;;
    *) echo "unknown scenario: $1" >&2; exit 2 ;;
    esac
}

if [[ $# -eq 0 ]]; then
    set -- fanout-1k fanout-5k-saturated rooms-1000x10 idle-19k latency-vs-fanout \
        rss-vs-connections workers-1-vs-2 churn
fi
for s in "$@"; do scenario "$s"; done
