#!/usr/bin/env bash
# A reconnect storm, before and after: a deploy behind a load balancer, where node A drains and
# its clients land on node B, with two roomcast binaries in one sitting. Each round runs OLD,
# then NEW (ROUNDS rounds, default 3), so the machine's drift hits both alike. One run:
#   - A and B, the same binary, started by run-peer.sh (--workers 1, both on CPU 0 by default);
#   - the generator (CPU 1 by default, one thread, --source-ips 127.0.0.1-127.0.0.20) opens CLIENTS
#     clients (default 19,000) to A, each in one of ROOMS rooms (default 1,000);
#   - then SIGTERM to A (t0): A closes every client with 1001 and stops accepting, and every
#     client reconnects to B at once and re-joins its room, retrying after 5-50 ms on failure,
#     for at most STORM_TIMEOUT (default 60s);
#   - B's CPU is measured over the storm (--server-pid B), A and B are stopped.
# Reports: loadtest/results/reconnect-storm/{old,new}-rN/reconnect-storm.json (RESULTS_DIR to
# change), one line per run, then the medians per binary: time until all are back, until 99%,
# B's CPU per reconnect, failed attempts, clients not back.
#
#   flock /tmp/measure.lock env OLD=/path/to/old/roomcast NEW=target/release/roomcast \
#       ROUNDS=3 bash loadtest/ab/reconnect-storm.sh
# LOADTEST_BIN defaults to $CARGO_TARGET_DIR/release/roomcast-loadtest (else
# <repo>/target/release). PORT_A, PORT_B: the two ports (default 19911, 19912). CPU_A, CPU_B,
# GEN_CPU: where A, B and the generator run (default 0, 0, 1, for a 2-core box: A's drain and
# B's accepts then share one core, so A's closing pace is part of the time measured; on a
# bigger box give B a core of its own).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OLD:?the old roomcast binary}" "${NEW:?the new roomcast binary}"
# common.sh checks that $BIN and the generator are built; NEW is checked below.
BIN=$OLD
# shellcheck source=loadtest/ab/common.sh
source "$here/ab/common.sh"
[[ -x $NEW ]] || { echo "not built: $NEW" >&2; exit 1; }
out=${RESULTS_DIR:-$here/results/reconnect-storm}
port_a=${PORT_A:-19911}
port_b=${PORT_B:-19912}
clients=${CLIENTS:-19000}
rooms=${ROOMS:-1000}
storm_timeout=${STORM_TIMEOUT:-60s}
cpu_a=${CPU_A:-0} cpu_b=${CPU_B:-0} gen_cpu=${GEN_CPU:-1}
mkdir -p "$out"

pid_a='' pid_b=''
stop_both() {
    [[ -n $pid_a ]] && "$here/peers/stop-peer.sh" "$pid_a" "$port_a"
    [[ -n $pid_b ]] && "$here/peers/stop-peer.sh" "$pid_b" "$port_b"
    pid_a='' pid_b=''
}
trap stop_both EXIT

for round in $(seq "$rounds"); do
    for side in old new; do
        server=$OLD
        [[ $side == new ]] && server=$NEW
        dir=$out/$side-r$round
        mkdir -p "$dir"
        echo "== $side round $round: $server" >&2
        pid_a=$(PEER_CPU=$cpu_a ROOMCAST_BIN=$server "$here/peers/run-peer.sh" roomcast "$port_a")
        pid_b=$(PEER_CPU=$cpu_b ROOMCAST_BIN=$server "$here/peers/run-peer.sh" roomcast "$port_b")
        # The run bounds itself (ramp limit, --timeout); `timeout` is the backstop: SIGINT
        # still gets a report (interrupted), SIGKILL 10 s later does not.
        timeout -s INT -k 10 600 taskset -c "$gen_cpu" "$loadtest" \
            --url "ws://127.0.0.1:$port_a/" --source-ips 127.0.0.1-127.0.0.20 \
            --server-pid "$pid_b" --threads 1 --timeout "$storm_timeout" --json \
            reconnect-storm --clients "$clients" --rooms "$rooms" \
            --reconnect-url "ws://127.0.0.1:$port_b/" --drain-pid "$pid_a" \
            > "$dir/reconnect-storm.json"
        stop_both
        "$here/ab/report.py" storm-run "$dir/reconnect-storm.json" >&2
    done
done

"$here/ab/report.py" storm-medians "$out" "$rounds" \
    "$clients clients in $rooms rooms, A drains, all reconnect to B; A on CPU $cpu_a, B on CPU $cpu_b (--workers 1), generator on CPU $gen_cpu" \
    old new
