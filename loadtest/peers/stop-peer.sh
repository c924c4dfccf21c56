#!/usr/bin/env bash
# Stops a server started by run-peer.sh and waits (up to 10 s) until its port no longer
# accepts: the port closing, not `kill -0`, shows the server is gone (see README.md).
#
#   loadtest/peers/stop-peer.sh PID PORT
set -uo pipefail
pid=${1:?usage: stop-peer.sh PID PORT}
port=${2:?usage: stop-peer.sh PID PORT}
kill "$pid" 2>/dev/null || true
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || exit 0
    sleep 0.1
done
exit 0
