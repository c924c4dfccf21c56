#!/usr/bin/env bash
# permessage-deflate against plain frames, in one sitting, on ONE roomcast started with
# --compression: compare.sh's fanout-1k (1 room x 1,000 subscribers x 100 msg/s, 10 s) and
# fanout-5k-saturated (1 room x 5,000 subscribers, --rate 0, 10 s, --timeout 60s), both with
# --payload realistic (a ~1 KB JSON order event after the stamp), ROUNDS rounds (default 3),
# alternating
#   plain    the generator without --compression: the server sends every frame as it is;
#   deflate  the generator with --compression: every client offers permessage-deflate, the
#            server compresses each fan-out frame once and sends the same bytes to all, and
#            the clients inflate each message (a run whose server declines fails instead).
# One release roomcast (run-peer.sh: --workers 1, CPU 0) with --compression and --rate-limit 0
# serves every run; the generator runs on CPU 1 with one thread. Around each deflate run the
# server's roomcast_frames_compressed_total is read from /metrics, to show one compression per
# message, not per recipient. Reports:
# loadtest/results/compression/{plain,deflate}-rN/NAME.json, then a table of the medians with
# wire bytes per delivery, and deflate/plain for server CPU and wire bytes.
#
#   loadtest/ab/compression.sh
#   ROUNDS=3 BIN=target/release/roomcast LOADTEST_BIN=target/release/roomcast-loadtest \
#       loadtest/ab/compression.sh
# Binaries default to $CARGO_TARGET_DIR/release (else <repo>/target/release).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=loadtest/ab/common.sh
source "$here/ab/common.sh"
out=${RESULTS_DIR:-$here/results/compression}
port=${PORT:-19880}
# SCENARIOS: a space-separated subset or other order (fanout-1k-30: 1 x 1,000 at 30 msg/s, a
# load the one-thread generator sustains in both modes, for a like-for-like server CPU figure).
read -r -a scenarios <<<"${SCENARIOS:-fanout-1k fanout-5k-saturated}"
mkdir -p "$out"

pid=$(ROOMCAST_BIN=$bin "$here/peers/run-peer.sh" roomcast "$port" --rate-limit 0 --compression)
stop() { "$here/peers/stop-peer.sh" "$pid" "$port"; }
trap stop EXIT


compressed_total() { # the server's roomcast_frames_compressed_total
    python3 - "$port" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
print(next((line.split()[-1] for line in body.splitlines()
            if line.startswith("roomcast_frames_compressed_total")), "absent"))
PY
}

for round in $(seq "$rounds"); do
    for side in plain deflate; do
        dir=$out/$side-r$round
        mkdir -p "$dir"
        compression=()
        [[ $side == deflate ]] && compression=(--compression)
        for name in "${scenarios[@]}"; do
            echo "== $side round $round: $name" >&2
            before=$(compressed_total)
            # shellcheck disable=SC2046 # params are words
            taskset -c 1 "$loadtest" --url "ws://127.0.0.1:$port/" --server-pid "$pid" \
                --threads 1 --json "${compression[@]}" fanout $(params "$name") \
                --payload realistic > "$dir/$name.json"
            after=$(compressed_total)
            "$here/ab/report.py" run "$dir/$name.json" >&2
            python3 - "$dir/$name.json" "$side" "$before" "$after" <<'PY' >&2
import json, sys
path, side, before, after = sys.argv[1:]
res = json.load(open(path))["results"]
c = res["compression"]
if side == "deflate" and not c["negotiated"]:
    sys.exit(f"{path}: permessage-deflate was not negotiated on every connection: {c}")
if side == "plain" and c["connections_negotiated"]:
    sys.exit(f"{path}: a plain run negotiated compression: {c}")
line = (f"    frames_compressed_total {before} -> {after}"
        f" (+{int(after) - int(before)})" if before.isdigit() and after.isdigit()
        else f"    frames_compressed_total {before} -> {after}")
print(f"{line}; published {res['published']:,}, delivered {res['received']:,}, "
      f"inflated {c['inflated_messages']:,}")
PY
        done
    done
done

"$here/ab/report.py" medians "$out" "$rounds" \
    "one roomcast --compression, --workers 1 on CPU 0; generator on CPU 1; --payload realistic" \
    plain deflate "${scenarios[@]}"
