#!/usr/bin/env bash
# roomcast's Pusher protocol against its native one, in one sitting, on ONE server: compare.sh's
# fanout-1k (1 room x 1,000 subscribers x 100 msg/s, 10 s) and fanout-5k-saturated (1 room x
# 5,000 subscribers, --rate 0, 10 s, --timeout 60s), ROUNDS rounds (default 3), alternating
#   native   the loadtest's native clients (join_room, room_message);
#   pusher   the same scenario with --protocol pusher: private-channel subscriptions signed with
#            the app's secret, the stamped messages sent as client events `client-msg`.
# One release roomcast (run-peer.sh: --workers 1, CPU 0) with --pusher-app and --rate-limit 0
# (as compare.sh: client events are under the same rate limit as native messages) serves every
# run; the generator runs on CPU 1 with one thread. Reports:
# loadtest/results/pusher-vs-native/{native,pusher}-rN/NAME.json, then a table of the medians.
#
#   loadtest/ab/pusher.sh
#   ROUNDS=3 BIN=target/release/roomcast LOADTEST_BIN=target/release/roomcast-loadtest \
#       loadtest/ab/pusher.sh
# Binaries default to $CARGO_TARGET_DIR/release (else <repo>/target/release).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=loadtest/ab/common.sh
source "$here/ab/common.sh"
out=${RESULTS_DIR:-$here/results/pusher-vs-native}
port=${PORT:-19870}
app=${PUSHER_APP:-1001:loadtest-key:loadtest-secret}
scenarios=(fanout-1k fanout-5k-saturated)
mkdir -p "$out"

pid=$(ROOMCAST_BIN=$bin "$here/peers/run-peer.sh" roomcast "$port" --rate-limit 0 \
    --pusher-app "$app")
stop() { "$here/peers/stop-peer.sh" "$pid" "$port"; }
trap stop EXIT


for round in $(seq "$rounds"); do
    for side in native pusher; do
        dir=$out/$side-r$round
        mkdir -p "$dir"
        protocol=()
        [[ $side == pusher ]] && protocol=(--protocol pusher --pusher-app "$app")
        for name in "${scenarios[@]}"; do
            echo "== $side round $round: $name" >&2
            # shellcheck disable=SC2046 # params are words
            taskset -c 1 "$loadtest" --url "ws://127.0.0.1:$port/" --server-pid "$pid" \
                --threads 1 --json "${protocol[@]}" fanout $(params "$name") \
                > "$dir/$name.json"
            "$here/ab/report.py" run "$dir/$name.json" >&2
        done
    done
done

"$here/ab/report.py" medians "$out" "$rounds" \
    "one roomcast, --workers 1 on CPU 0; generator on CPU 1" \
    native pusher "${scenarios[@]}"
