#!/usr/bin/env bash
# The cost of history (issue 13), in one sitting: compare.sh's fanout-1k (1 room x 1,000 x
# 100 msg/s) and fanout-5k-saturated, ROUNDS rounds (default 3), alternating three sides:
#   old       OLD, the last build before history;
#   new       NEW with history off (the seed's hot path, plus what history added to it);
#   history   NEW with --history-size 100 --history-ttl 60s (every room message appended and
#             encoded once more; the loadtest's clients are seed clients, so they get the
#             seed's frame).
# Reports: loadtest/results/history-ab/{old,new,history}-rN/*.json, then the medians.
#
#   OLD=/tmp/old/roomcast NEW=target/release/roomcast loadtest/ab/history.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OLD:?the old roomcast binary}" "${NEW:=$here/../target/release/roomcast}"
out=$here/results/history-ab
rounds=${ROUNDS:-3}
wrapper=$(mktemp)
trap 'rm -f "$wrapper"' EXIT
printf '#!/bin/sh\nexec %s "$@" --history-size 100 --history-ttl 60s\n' "$NEW" > "$wrapper"
chmod +x "$wrapper"
for round in $(seq "$rounds"); do
    for side in old new history; do
        case $side in old) bin=$OLD ;; new) bin=$NEW ;; history) bin=$wrapper ;; esac
        ROOMCAST_BIN=$bin PEERS=roomcast RESULTS_DIR=$out/$side-r$round \
            bash "$here/compare.sh" fanout-1k fanout-5k-saturated
    done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for scenario in ("fanout-1k", "fanout-5k-saturated"):
    for side in ("old", "new", "history"):
        cpu, rate, lost, p99 = [], [], [], []
        for r in range(1, rounds + 1):
            res = json.load(open(f"{out}/{side}-r{r}/{scenario}--roomcast.json"))["results"]
            cpu.append(res["server_cpu_us_per_delivery"])
            rate.append(res.get("deliveries_per_second", 0))
            lost.append(res["lost"])
            p99.append(res["latency"]["p99_us"] / 1000)
        print(f"{scenario:20} {side:8} CPU/delivery {statistics.median(cpu):.3f} us {cpu}, "
              f"deliveries/s {statistics.median(rate):,.0f}, p99 {statistics.median(p99):.1f} ms, lost {lost}")
PY
