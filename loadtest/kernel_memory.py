#!/usr/bin/env python3
"""Kernel memory per idle connection: what /proc/slabinfo grows by while N idle WebSocket
connections are open (the part of a connection's cost that the server's RSS does not show).

  sudo loadtest/kernel_memory.py [N]            (N default 19000; needs root for slabinfo)

Starts roomcast with loadtest/peers/run-peer.sh (ROOMCAST_BIN to choose the binary), snapshots
every slab cache, opens N idle connections with roomcast-loadtest (`connections`, held 10 s),
snapshots again once the server holds N sockets, and prints the growth of each cache that grew
by at least N/2 objects, per connection. Client and server run on this machine over loopback,
so each connection is two TCP sockets: one accepted by the server (with its epoll item) and
one the generator opened. Both halves are in the totals; the server's half is about one TCP
socket, its inode, dentry and file, and one epoll item. Loopback, idle: no socket buffers are
held, which on a real network an unread send queue would add.
"""
import os
import subprocess
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(here)
target = os.environ.get("CARGO_TARGET_DIR", os.path.join(repo, "target"))
loadtest = os.environ.get("LOADTEST_BIN", os.path.join(target, "release", "roomcast-loadtest"))
port = os.environ.get("PORT", "19580")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 19000


def slabs():
    """Active bytes per slab cache: active objects x object size."""
    caches = {}
    with open("/proc/slabinfo") as f:
        for line in f.readlines()[2:]:
            fields = line.split()
            caches[fields[0]] = (int(fields[1]), int(fields[3]))
    return caches


def open_sockets(pid):
    return sum(1 for fd in os.listdir(f"/proc/{pid}/fd")
               if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))


pid = subprocess.check_output([os.path.join(here, "peers", "run-peer.sh"), "roomcast", port],
                              text=True).strip()
try:
    time.sleep(0.5)
    before = slabs()
    generator = subprocess.Popen(
        ["taskset", "-c", "1", loadtest, "--url", f"ws://127.0.0.1:{port}/", "--threads", "1",
         "--source-ips", "127.0.0.1-127.0.0.20", "connections", "--connections", str(n),
         "--ramp", "5000", "--hold", "10s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while open_sockets(pid) < n and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    held = open_sockets(pid)
    after = slabs()
    generator.wait(timeout=60)
finally:
    subprocess.call([os.path.join(here, "peers", "stop-peer.sh"), pid, port])

print(f"{held} connections held by the server (wanted {n}); slab growth per connection:")
print("| cache | objects per connection | object size | bytes per connection |")
print("|---|---|---|---|")
total = 0
for name, (count, size) in sorted(after.items(), key=lambda kv: -(kv[1][0] - before.get(kv[0], (0, 0))[0]) * kv[1][1]):
    grown = count - before.get(name, (0, size))[0]
    if grown < held / 2:
        continue
    per = grown * size / held
    total += per
    print(f"| {name} | {grown / held:.2f} | {size} | {per:,.0f} |")
print(f"| all of them (client and server side) | | | {total:,.0f} |")
