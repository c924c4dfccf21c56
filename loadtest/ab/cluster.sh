#!/usr/bin/env bash
# The backplane's cost: 1 room x 1,000 subscribers x 100 msg/s (compare.sh's fanout-1k) on
#   one    one node, no Redis (the memory broker);
#   redis1 one node with --redis (every publication also goes to Redis; nobody else receives it);
#   redis3 three nodes on one Redis, the subscribers spread round-robin over them (so two thirds
#          of the deliveries cross Redis).
# Then the cost of a connection's life with Redis: compare.sh's churn (connect, join, message,
# leave, close; 50 workers, 10 s) on one node without and with --redis (a subscription per
# client and per room on top of the local work), reports <setup>-churn-rN.json.
# Alternating, ROUNDS rounds (default 3). The nodes and Redis run on CPU 0, the generator on
# CPU 1; server CPU is summed over the nodes (`--server-pid` repeated), and Redis's own CPU is
# sampled beside it from /proc. Reports: loadtest/results/cluster/<setup>-rN.json, plus
# <setup>-rN.redis-cpu (Redis's CPU seconds during the run).
#
#   ROOMCAST_BIN=target/release/roomcast LOADTEST_BIN=target/release/roomcast-loadtest \
#       loadtest/ab/cluster.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
repo=$(cd "$here/.." && pwd)
bin=${ROOMCAST_BIN:-$repo/target/release/roomcast}
loadtest=${LOADTEST_BIN:-$repo/target/release/roomcast-loadtest}
out=${RESULTS_DIR:-$here/results/cluster}
rounds=${ROUNDS:-3}
base=${PORT:-19700}
redis_port=$((base + 10))
mkdir -p "$out"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT

wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.1; done; }
cpu_seconds() { # PID -> utime+stime in seconds
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}

taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    > /tmp/roomcast-cluster-redis.log 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
wait_port "$redis_port"

run_setup() { # SETUP ROUND
    local setup=$1 round=$2 nodes=1 extra=()
    case $setup in
        one) ;;
        redis1) extra=(--redis "redis://127.0.0.1:$redis_port/") ;;
        redis3) nodes=3; extra=(--redis "redis://127.0.0.1:$redis_port/") ;;
    esac
    local node_pids=() urls=() server_args=()
    for n in $(seq 0 $((nodes - 1))); do
        local port=$((base + n))
        taskset -c 0 "$bin" --listen "127.0.0.1:$port" --workers 1 --rate-limit 0 "${extra[@]}" \
            > "/tmp/roomcast-cluster-$n.log" 2>&1 &
        node_pids+=($!)
        pids+=($!)
        urls+=(--url "ws://127.0.0.1:$port/")
        server_args+=(--server-pid "${node_pids[-1]}")
        wait_port "$port"
    done
    sleep 0.5 # the nodes subscribe to Redis
    local redis_before
    redis_before=$(cpu_seconds "$redis_pid")
    echo "== $setup round $round" >&2
    taskset -c 1 "$loadtest" "${urls[@]}" "${server_args[@]}" --threads 1 --json fanout \
        --subscribers 1000 --rooms 1 --publishers 1 --rate 100 --duration 10s \
        > "$out/$setup-r$round.json"
    echo "$(cpu_seconds "$redis_pid") - $redis_before" | bc -l > "$out/$setup-r$round.redis-cpu"
    kill "${node_pids[@]}"
    for n in $(seq 0 $((nodes - 1))); do
        while (exec 3<>"/dev/tcp/127.0.0.1/$((base + n))") 2>/dev/null; do sleep 0.1; done
    done
}

for round in $(seq "$rounds"); do
    for setup in one redis1 redis3; do
        run_setup "$setup" "$round"
    done
done
wrapper=$(mktemp)
printf '#!/bin/sh\nexec %s "$@" --redis redis://127.0.0.1:%s/\n' "$bin" "$redis_port" > "$wrapper"
chmod +x "$wrapper"
for round in $(seq "$rounds"); do
    for setup in one redis1; do
        node_bin=$bin
        [[ $setup == redis1 ]] && node_bin=$wrapper
        ROOMCAST_BIN=$node_bin PEERS=roomcast LOADTEST_BIN=$loadtest CHURN_DURATION=10s \
            PORT=$base RESULTS_DIR=$out/churn-$setup-r$round bash "$here/compare.sh" churn
        mv "$out/churn-$setup-r$round/churn--roomcast.json" "$out/$setup-churn-r$round.json"
        rmdir "$out/churn-$setup-r$round"
    done
done
rm -f "$wrapper"
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for setup in ("one", "redis1", "redis3"):
    cpu, p99, lost, redis = [], [], [], []
    for r in range(1, rounds + 1):
        res = json.load(open(f"{out}/{setup}-r{r}.json"))["results"]
        cpu.append(res["server_cpu_us_per_delivery"])
        p99.append(res["latency"]["p99_us"] / 1000)
        lost.append(res["lost"])
        seconds = float(open(f"{out}/{setup}-r{r}.redis-cpu").read() or 0)
        redis.append(seconds * 1e6 / max(res["received"], 1))
    print(f"{setup:7} nodes CPU/delivery {statistics.median(cpu):.2f} us {cpu}, "
          f"redis CPU/delivery {statistics.median(redis):.2f} us, "
          f"p99 {statistics.median(p99):.1f} ms {p99}, lost {lost}")
for setup in ("one", "redis1"):
    cycle, rate, failed = [], [], []
    for r in range(1, rounds + 1):
        res = json.load(open(f"{out}/{setup}-churn-r{r}.json"))["results"]
        cycle.append(res["server_cpu_us_per_cycle"])
        rate.append(res["cycles_per_second"])
        failed.append(res["cycles_failed"])
    print(f"{setup:7} churn: server CPU per cycle {statistics.median(cycle):.1f} us {cycle}, "
          f"cycles/s {statistics.median(rate):.0f}, failed {failed}")
PY
