#!/usr/bin/env bash
# History's fan-out to opted-in members (clients that join with "since":{} and so receive the
# offset-carrying frame), in one sitting: 1 room x 1,000 x 100 msg/s on one node with
# --history-size 100 --history-ttl 60s, ROUNDS rounds (default 3) alternating
#   seed    the loadtest's clients as seed clients (the seed's frame);
#   opted   the same with --since (every client opted in: the offset variant, encoded once).
# Server on CPU 0, generator on CPU 1. Reports: loadtest/results/history-opted/<side>-rN.json.
#
#   BIN=target/release/roomcast LOADTEST_BIN=target/release/roomcast-loadtest \
#       loadtest/ab/history-opted.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
repo=$(cd "$here/.." && pwd)
bin=${BIN:-$repo/target/release/roomcast}
loadtest=${LOADTEST_BIN:-$repo/target/release/roomcast-loadtest}
out=$here/results/history-opted
rounds=${ROUNDS:-3}
port=${PORT:-19850}
mkdir -p "$out"
for round in $(seq "$rounds"); do
    for side in seed opted; do
        taskset -c 0 "$bin" --listen "127.0.0.1:$port" --workers 1 --rate-limit 0 \
            --history-size 100 --history-ttl 60s > /dev/null 2>&1 &
        server=$!
        until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.1; done
        extra=()
        [ "$side" = opted ] && extra=(--since)
        echo "== $side round $round" >&2
        taskset -c 1 "$loadtest" --url "ws://127.0.0.1:$port/" --server-pid "$server" \
            --threads 1 --json fanout --subscribers 1000 --rooms 1 --publishers 1 --rate 100 \
            --duration 10s "${extra[@]}" > "$out/$side-r$round.json"
        kill "$server"; wait "$server" 2>/dev/null || true
    done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for side in ("seed", "opted"):
    cpu, p99, lost = [], [], []
    for r in range(1, rounds + 1):
        res = json.load(open(f"{out}/{side}-r{r}.json"))["results"]
        cpu.append(res["server_cpu_us_per_delivery"])
        p99.append(round(res["latency"]["p99_us"] / 1000, 1))
        lost.append(res["lost"])
    print(f"{side:6} CPU/delivery {statistics.median(cpu):.2f} us {cpu}, "
          f"p99 {statistics.median(p99):.1f} ms {p99}, lost {lost}")
PY
