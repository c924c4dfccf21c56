#!/usr/bin/env python3
"""Pending handshakes: what N connections that never finish their HTTP request head cost a
roomcast server (its RSS), and whether a well-behaved client still upgrades meanwhile.

    python3 loadtest/pending_handshakes.py target/release/roomcast 19000 --max-pending-handshakes 20000

Starts the given binary on 127.0.0.1:19777 (extra arguments are passed to it), opens N
connections from this process, each sending 1 KiB of an unfinished head, then measures the
server's VmRSS and times one complete upgrade. Loopback only; kills the server at the end."""
import socket, resource, subprocess, time, sys, os
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
binary, n = sys.argv[1], int(sys.argv[2])
port = 19777
srv = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--workers", "1",
                        "--handshake-timeout", "120s"] + sys.argv[3:],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def rss():
    for line in open(f"/proc/{srv.pid}/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1]) * 1024
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port)).close(); break
    except OSError: time.sleep(0.05)
time.sleep(0.5)
before = rss()
partial = b"GET /?token=x HTTP/1.1\r\nHost: example.com\r\nX-Padding: " + b"p" * 1000
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(partial); socks.append(s)
time.sleep(2)
after = rss()
# a well-behaved client meanwhile: a plain upgrade
t0 = time.time()
c = socket.create_connection(("127.0.0.1", port))
c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
resp = c.recv(4096)
dt = time.time() - t0
print(f"{n} pending handshakes: RSS {before/2**20:.1f} -> {after/2**20:.1f} MiB, {(after-before)/n:.0f} B each; "
      f"a good client got {resp[:12]!r} in {dt*1000:.1f} ms")
srv.kill()
