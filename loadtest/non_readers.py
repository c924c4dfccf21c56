#!/usr/bin/env python3
"""Clients that join a room and never read, and one sender at 20 x 32 KB/s (inside the default
rate limit): the kernel's TCP memory (/proc/net/sockstat) and the server's own sockets
(/proc/net/tcp) each second, while they are closed as slow consumers and after.

    non_readers.py HOST PORT [CLIENTS] [SEND_SECONDS] [HOLD_SECONDS]
"""
import json, os, socket, struct, sys, threading, time

host, port = sys.argv[1], int(sys.argv[2])
clients = int(sys.argv[3]) if len(sys.argv) > 3 else 300
send_for = float(sys.argv[4]) if len(sys.argv) > 4 else 20
hold = float(sys.argv[5]) if len(sys.argv) > 5 else 75
PAGE = os.sysconf("SC_PAGE_SIZE")


def frame(text):
    payload = text.encode()
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = b"\x81" + (bytes([0x80 | n]) if n < 126 else
                      struct.pack("!BH", 0x80 | 126, n) if n < 65536 else
                      struct.pack("!BQ", 0x80 | 127, n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def connect():
    s = socket.create_connection((host, port))
    s.sendall((f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    s.sendall(frame(json.dumps({"type": "join_room", "room": "flood"})))
    return s


def sockstat():
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            f = line.split()
            return dict(zip(f[1::2], map(int, f[2::2])))


def server_sockets():
    """(count, in FIN-WAIT-1, bytes unsent) of the server's sockets (local port = port)."""
    count = fin_wait_1 = unsent = 0
    for line in list(open("/proc/net/tcp"))[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) != port or f[3] == "0A":
            continue
        count += 1
        fin_wait_1 += f[3] == "04"
        unsent += int(f[4].split(":")[0], 16)
    return count, fin_wait_1, unsent


def report(t, phase):
    st = sockstat()
    count, fw1, unsent = server_sockets()
    print(f"{t:6.1f}s {phase:8} TCP mem {st['mem'] * PAGE / 2**20:8.1f} MiB  orphan {st['orphan']:4}  "
          f"server sockets {count:4} (FIN-WAIT-1 {fw1:4}) unsent {unsent / 2**20:8.1f} MiB", flush=True)


start = time.time()
report(0, "before")
sender = connect()
threading.Thread(target=lambda: [None for _ in iter(lambda: sender.recv(65536), b"")], daemon=True).start()
sleepers = [connect() for _ in range(clients)]
body = json.dumps({"type": "room_message", "room": "flood", "message": "z" * 32000})
message = frame(body)
next_report = time.time()
while time.time() - start < hold:
    now = time.time()
    sending = now - start < send_for
    if sending:
        sender.sendall(message)
    if now >= next_report:
        report(now - start, "sending" if sending else "holding")
        next_report += 1
    time.sleep(0.05)
for s in sleepers:
    s.close()
sender.close()
time.sleep(2)
report(time.time() - start, "closed")
