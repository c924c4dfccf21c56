#!/usr/bin/env bash
# The backplane before and after a change, and on a Redis Cluster: 1 room x 1,000 subscribers x
# 100 msg/s (compare.sh's fanout-1k) over three nodes, the subscribers spread round-robin (two
# thirds of the deliveries cross Redis), in setups
#   old-redis3   OLD_BIN's three nodes on one Redis (--redis);
#   new-redis3   NEW_BIN's three nodes on one Redis;
#   new-cluster3 NEW_BIN's three nodes on a Redis Cluster of three masters (--redis-cluster,
#                sharded pub/sub), started here;
#   new-redis3-history, new-cluster3-history  the same with every room keeping a history in
#                Redis (--history-size 100 --history-ttl 60s: each message appended by a script
#                that gives its offset, and delivered from Redis on every node, the sender's too).
# SETUPS picks which (default: old-redis3 new-redis3 new-cluster3).
# Alternating, ROUNDS rounds (default 3). Nodes and Redis run on CPU 0, the generator on CPU 1;
# server CPU is summed over the nodes (`--server-pid` repeated), and Redis's CPU (summed over
# the masters) is sampled beside it from /proc. Reports: loadtest/results/backplane/<setup>-rN.json
# and <setup>-rN.redis-cpu, then a summary of medians.
#
#   OLD_BIN=/tmp/old/roomcast NEW_BIN=target/release/roomcast \
#       LOADTEST_BIN=target/release/roomcast-loadtest loadtest/ab/backplane.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
repo=$(cd "$here/.." && pwd)
old=${OLD_BIN:?OLD_BIN: the roomcast binary before the change}
new=${NEW_BIN:-$repo/target/release/roomcast}
loadtest=${LOADTEST_BIN:-$repo/target/release/roomcast-loadtest}
out=${RESULTS_DIR:-$here/results/backplane}
rounds=${ROUNDS:-3}
base=${PORT:-19800}
redis_port=$((base + 10))
cluster_ports=($((base + 11)) $((base + 12)) $((base + 13)))
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.1; done; }
cpu_seconds() { # PID... -> their utime+stime in seconds, summed
    local total=0 pid
    for pid in "$@"; do
        total=$(awk -v hz="$(getconf CLK_TCK)" -v t="$total" \
            '{ sub(/^.*\) /, ""); print t + ($12 + $13) / hz }' "/proc/$pid/stat")
    done
    echo "$total"
}

taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    > "$work/redis.log" 2>&1 &
single_redis=$!
pids+=("$single_redis")
wait_port "$redis_port"

cluster_pids=()
for port in "${cluster_ports[@]}"; do
    (cd "$work" && exec taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save "" \
        --appendonly no --cluster-enabled yes --cluster-config-file "nodes-$port.conf" \
        > "$work/redis-$port.log" 2>&1) &
    cluster_pids+=($!)
    pids+=($!)
    wait_port "$port"
done
redis-cli --cluster create "${cluster_ports[@]/#/127.0.0.1:}" --cluster-replicas 0 \
    --cluster-yes > "$work/create.log" 2>&1
for port in "${cluster_ports[@]}"; do
    until redis-cli -p "$port" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
done
cluster_urls=$(printf 'redis://127.0.0.1:%s,' "${cluster_ports[@]}")
cluster_urls=${cluster_urls%,}

run_setup() { # SETUP ROUND
    local setup=$1 round=$2 bin extra redis_pids
    case $setup in
        old-redis3) bin=$old; extra=(--redis "redis://127.0.0.1:$redis_port/"); redis_pids=("$single_redis") ;;
        new-redis3) bin=$new; extra=(--redis "redis://127.0.0.1:$redis_port/"); redis_pids=("$single_redis") ;;
        new-cluster3) bin=$new; extra=(--redis-cluster "$cluster_urls"); redis_pids=("${cluster_pids[@]}") ;;
        new-redis3-history) bin=$new; redis_pids=("$single_redis")
            extra=(--redis "redis://127.0.0.1:$redis_port/" --history-size 100 --history-ttl 60s) ;;
        new-cluster3-history) bin=$new; redis_pids=("${cluster_pids[@]}")
            extra=(--redis-cluster "$cluster_urls" --history-size 100 --history-ttl 60s) ;;
    esac
    local node_pids=() urls=() server_args=()
    for n in 0 1 2; do
        local port=$((base + n))
        taskset -c 0 "$bin" --listen "127.0.0.1:$port" --workers 1 --rate-limit 0 "${extra[@]}" \
            > "$work/node-$n.log" 2>&1 &
        node_pids+=($!)
        pids+=($!)
        urls+=(--url "ws://127.0.0.1:$port/")
        server_args+=(--server-pid "${node_pids[-1]}")
        wait_port "$port"
    done
    sleep 1 # the nodes subscribe to Redis
    local redis_before
    redis_before=$(cpu_seconds "${redis_pids[@]}")
    echo "== $setup round $round" >&2
    taskset -c 1 "$loadtest" "${urls[@]}" "${server_args[@]}" --threads 1 --json fanout \
        --subscribers 1000 --rooms 1 --publishers 1 --rate 100 --duration 10s \
        > "$out/$setup-r$round.json"
    echo "$(cpu_seconds "${redis_pids[@]}") - $redis_before" | bc -l > "$out/$setup-r$round.redis-cpu"
    kill "${node_pids[@]}"
    for n in 0 1 2; do
        while (exec 3<>"/dev/tcp/127.0.0.1/$((base + n))") 2>/dev/null; do sleep 0.1; done
    done
}

read -r -a setups <<< "${SETUPS:-old-redis3 new-redis3 new-cluster3}"
for round in $(seq "$rounds"); do
    for setup in "${setups[@]}"; do
        run_setup "$setup" "$round"
    done
done
python3 - "$out" "$rounds" "${setups[@]}" <<'PY'
import json, statistics, sys
out, rounds, setups = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for setup in setups:
    cpu, p99, lost, redis = [], [], [], []
    for r in range(1, rounds + 1):
        res = json.load(open(f"{out}/{setup}-r{r}.json"))["results"]
        cpu.append(res["server_cpu_us_per_delivery"])
        p99.append(res["latency"]["p99_us"] / 1000)
        lost.append(res["lost"])
        seconds = float(open(f"{out}/{setup}-r{r}.redis-cpu").read() or 0)
        redis.append(round(seconds * 1e6 / max(res["received"], 1), 3))
    print(f"{setup:20} nodes CPU/delivery {statistics.median(cpu):.2f} us {cpu}, "
          f"redis CPU/delivery {statistics.median(redis):.2f} us {redis}, "
          f"p99 {statistics.median(p99):.1f} ms {p99}, lost {lost}")
PY
