#!/usr/bin/env bash
# roomcast's Pusher endpoint beside Sockudo (a Pusher-protocol server in Rust, not part of this
# repo), in one sitting: compare.sh's fanout-1k (1 room x 1,000 subscribers x 100 msg/s, 10 s)
# and fanout-5k-saturated (1 room x 5,000 subscribers, --rate 0, 10 s, --timeout 60s), ROUNDS
# rounds (default 3), alternating
#   roomcast  release roomcast with --pusher-app and --rate-limit 0 (run-peer.sh: --workers 1);
#   sockudo   Sockudo with the same app, client events on, no rate limits and no connection
#             cap (run-peer.sh sockudo: its defaults otherwise, in-memory local adapter);
# both fed by the same generator, --protocol pusher --pusher-app ID:KEY:SECRET: private-channel
# subscriptions signed with the app's secret, the stamped messages sent as client events
# `client-msg`, relayed by the server to the channel's other subscribers.
# Both servers are pinned to CPU 0 (one tokio worker each), the generator to CPU 1 with one
# thread. Both are started once and serve every round, as pusher.sh does with its one server:
# neither is measured cold after the first round, both carry the same history (allocator pools,
# maps grown to 5,000 sockets), and no run pays a start-up. The idle one waits on CPU 0 while the
# other is measured; before each run the script waits until both have been quiet (< 2% of a core)
# for a second, so the previous run's teardown is not billed to, or competing with, the next.
# Sockudo is installed apart (cargo install sockudo --locked --root /work/sockudo-bin; see
# peers/run-peer.sh for the binary and its settings). Reports:
# loadtest/results/pusher-vs-sockudo/{roomcast,sockudo}-rN/NAME.json, then a table of the medians.
#
#   loadtest/ab/sockudo.sh
#   ROUNDS=3 BIN=target/release/roomcast LOADTEST_BIN=target/release/roomcast-loadtest \
#       SOCKUDO_BIN=/work/sockudo-bin/bin/sockudo loadtest/ab/sockudo.sh
# Binaries default to $CARGO_TARGET_DIR/release (else <repo>/target/release).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=loadtest/ab/common.sh
source "$here/ab/common.sh"
sockudo=${SOCKUDO_BIN:-/work/sockudo-bin/bin/sockudo}
out=${RESULTS_DIR:-$here/results/pusher-vs-sockudo}
roomcast_port=${PORT:-19880}
sockudo_port=${SOCKUDO_PORT:-19881}
app=${PUSHER_APP:-1001:loadtest-key:loadtest-secret}
scenarios=(fanout-1k fanout-5k-saturated)
[[ -x $sockudo ]] || { echo "no Sockudo at $sockudo (cargo install sockudo --locked --root /work/sockudo-bin)" >&2; exit 1; }
mkdir -p "$out"

pids=()
ports=()
stop() {
    local i
    for i in "${!pids[@]}"; do
        "$here/peers/stop-peer.sh" "${pids[$i]}" "${ports[$i]}"
    done
}
trap stop EXIT
roomcast_pid=$(ROOMCAST_BIN=$bin "$here/peers/run-peer.sh" roomcast "$roomcast_port" \
    --rate-limit 0 --pusher-app "$app")
pids+=("$roomcast_pid") ports+=("$roomcast_port")
sockudo_pid=$(SOCKUDO_BIN=$sockudo SOCKUDO_APP=$app SOCKUDO_METRICS_PORT=$((sockudo_port + 1)) \
    "$here/peers/run-peer.sh" sockudo "$sockudo_port")
pids+=("$sockudo_pid") ports+=("$sockudo_port")
"$sockudo" --version >&2 || true

cpu_ticks() { # PID -> utime+stime in clock ticks
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086 # fields are words
    set -- $stat
    echo $((${12} + ${13}))
}
quiet() { # waits (30 s at most) until every server used < 2 ticks (2% of a core) in 1 s
    local a b pid busy
    for _ in $(seq 30); do
        busy=0
        for pid in "${pids[@]}"; do
            a=$(cpu_ticks "$pid")
            sleep 1
            b=$(cpu_ticks "$pid")
            ((b - a < 2)) || busy=1
        done
        ((busy)) || return 0
    done
    echo "    (servers still busy after 30 s; going on)" >&2
}


for round in $(seq "$rounds"); do
    for side in roomcast sockudo; do
        dir=$out/$side-r$round
        mkdir -p "$dir"
        if [[ $side == roomcast ]]; then port=$roomcast_port pid=$roomcast_pid; else port=$sockudo_port pid=$sockudo_pid; fi
        for name in "${scenarios[@]}"; do
            quiet
            echo "== $side round $round: $name" >&2
            # shellcheck disable=SC2046 # params are words
            taskset -c 1 "$loadtest" --url "ws://127.0.0.1:$port/" --server-pid "$pid" \
                --threads 1 --json --protocol pusher --pusher-app "$app" fanout $(params "$name") \
                > "$dir/$name.json"
            "$here/ab/report.py" run "$dir/$name.json" >&2
        done
    done
done

"$here/ab/report.py" medians "$out" "$rounds" \
    "roomcast --workers 1 and Sockudo, one tokio worker, each on CPU 0; generator on CPU 1; --protocol pusher" \
    roomcast sockudo "${scenarios[@]}"
