#!/usr/bin/env bash
# Memory per kept history message: a release server with --history-size 1000, 100 rooms each
# sent 1,000 room messages of 100 bytes through the server API's batch endpoint (no clients),
# and the server's VmRSS before and after; prints both and the bytes per kept message.
#
#   ROOMCAST_BIN=target/release/roomcast loadtest/ab/history-memory.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${ROOMCAST_BIN:-$here/target/release/roomcast}
port=${PORT:-19950}
"$bin" --listen "127.0.0.1:$port" --workers 1 --api-key k --history-size 1000 \
    --history-ttl 10m > /tmp/roomcast-history-memory.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.1; done
rss() { awk '/VmRSS/ { print $2 * 1024 }' "/proc/$server/status"; }
before=$(rss)
python3 - "$port" <<'PY'
import json, sys, urllib.request
port = sys.argv[1]
message = "x" * 100
for room in range(100):
    for _ in range(4):
        commands = [{"method": "publish", "params": {"room": f"room-{room}", "message": message}}] * 250
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/batch",
            data=json.dumps({"commands": commands}).encode(),
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        )
        urllib.request.urlopen(request).read()
PY
after=$(rss)
echo "RSS before $before B, after $after B: $(( (after - before) / 100000 )) B per kept message (100,000 kept)"
