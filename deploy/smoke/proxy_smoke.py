#!/usr/bin/env python3
"""Live test of deploy/haproxy.cfg and deploy/nginx.conf: two roomcast nodes behind the proxy,
all on loopback, then one node is stopped with SIGTERM.

    python3 deploy/smoke/proxy_smoke.py --proxy haproxy --roomcast target/debug/roomcast
    python3 deploy/smoke/proxy_smoke.py --proxy nginx   --roomcast target/debug/roomcast

The proxy runs the real file from deploy/ with only what cannot apply on one machine replaced:
the listen address, the two node addresses, Docker's DNS resolver and maxconn (HAProxy: 200000
needs a file limit of ~400k, more than a test machine may grant) and the pid/log paths (nginx). Each replacement must match exactly once, so a reshaped file fails the test
instead of being tested half-replaced. The nodes run `roomcast serve --config
deploy/roomcast.toml` with a loopback --listen and a short --shutdown-delay.

Checks: the WebSocket upgrade passes through the proxy; messages flow both ways; the proxy
spreads two clients over the two nodes; rooms are per node (two clients of one room on different
nodes each see members=1); on SIGTERM a node's /readyz turns 503 at once, HAProxy marks it down
within its check interval, the node's client gets close 1001 after the shutdown delay, the node
exits 0, and a new client is served by the other node.

Needs only Python's standard library, the roomcast binary, and haproxy or nginx. Sends traffic
to 127.0.0.1 only; every wait is bounded; everything started is stopped at the end.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

DEPLOY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHUTDOWN_DELAY = 3.0  # seconds, passed to the nodes
DRAIN_TIMEOUT = 5.0

RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append((name, bool(ok)))
    print(f"{'PASS' if ok else 'FAIL'}  {name}{('  (' + detail + ')') if detail else ''}", flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=2.0):
    """(status, body) of GET http://127.0.0.1:port/path, or (None, error text)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return None, str(e)


def wait_until(predicate, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def open_connections(port):
    status, body = http_get(port, "/metrics")
    if status != 200:
        return None
    match = re.search(r"^roomcast_connections_open(?:\{[^}]*\})? (\S+)$", body, re.M)
    return int(float(match.group(1))) if match else None


class WebSocket:
    """A minimal RFC 6455 client: enough to talk to roomcast through a proxy."""

    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed during the handshake: {data!r}")
            data += chunk
        head, self.buf = data.split(b"\r\n\r\n", 1)
        lines = head.decode(errors="replace").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ConnectionError(f"upgrade refused: {lines[0]}")
        want = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        accept = [l.split(":", 1)[1].strip() for l in lines[1:] if l.lower().startswith("sec-websocket-accept:")]
        if accept != [want]:
            raise ConnectionError(f"bad Sec-WebSocket-Accept: {accept}")
        self.close_code = None

    def _read(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode, payload):
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, message):
        self._send(0x1, json.dumps(message).encode())

    def recv(self, timeout=5.0):
        """The next JSON message; None on timeout. Answers pings; on a close frame records its
        code, answers it, and returns None."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                b0, b1 = self._read(2, deadline)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", self._read(2, deadline))[0]
                elif n == 127:
                    n = struct.unpack("!Q", self._read(8, deadline))[0]
                payload = self._read(n, deadline)
                if opcode == 0x9:
                    self._send(0xA, payload)
                elif opcode == 0x8:
                    self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    try:
                        self._send(0x8, payload[:2])
                    except OSError:
                        pass
                    return None
                elif opcode in (0x1, 0x2):
                    return json.loads(payload)
        except (TimeoutError, socket.timeout):
            return None

    def recv_type(self, kind, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.close_code is None:
            message = self.recv(deadline - time.monotonic())
            if message is not None and message.get("type") == kind:
                return message
        return None

    def wait_close(self, timeout):
        deadline = time.monotonic() + timeout
        while self.close_code is None and time.monotonic() < deadline:
            try:
                self.recv(deadline - time.monotonic())
            except ConnectionError:
                break
        return self.close_code

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def replace_once(text, old, new, what):
    count = text.count(old)
    if count != 1:
        raise SystemExit(f"{what}: expected exactly one {old!r}, found {count}: the file changed shape")
    return text.replace(old, new)


def haproxy_config(tmp, proxy_port, ports):
    text = open(os.path.join(DEPLOY, "haproxy.cfg")).read()
    # HAProxy refuses to start when it cannot raise its file limit to ~2 x maxconn; a test
    # machine's hard limit may be lower than the 400k that maxconn 200000 needs.
    if text.count("maxconn 200000") != 2:
        raise SystemExit("haproxy.cfg: expected `maxconn 200000` twice: the file changed shape")
    text = text.replace("maxconn 200000", "maxconn 4000")
    text = replace_once(text, "    bind :8080\n", f"    bind 127.0.0.1:{proxy_port}\n", "haproxy.cfg")
    text = replace_once(text, " resolvers docker init-addr last,libc,none", "", "haproxy.cfg")
    text = replace_once(text, "server node1 roomcast1:8080", f"server node1 127.0.0.1:{ports[0]}", "haproxy.cfg")
    text = replace_once(text, "server node2 roomcast2:8080", f"server node2 127.0.0.1:{ports[1]}", "haproxy.cfg")
    start = text.index("\nresolvers docker\n")
    text = text[:start] + "\n"  # the resolvers section is the file's last one
    path = os.path.join(tmp, "haproxy.cfg")
    open(path, "w").write(text)
    subprocess.run(["haproxy", "-c", "-q", "-f", path], check=True)
    return ["haproxy", "-db", "-f", path]


def nginx_config(tmp, proxy_port, ports):
    text = open(os.path.join(DEPLOY, "nginx.conf")).read()
    text = replace_once(text, "listen 8080;", f"listen 127.0.0.1:{proxy_port};", "nginx.conf")
    text = replace_once(text, "server 10.0.0.11:8080", f"server 127.0.0.1:{ports[0]}", "nginx.conf")
    text = replace_once(text, "server 10.0.0.12:8080", f"server 127.0.0.1:{ports[1]}", "nginx.conf")
    text = replace_once(text, "pid /run/nginx.pid;", f"pid {tmp}/nginx.pid;", "nginx.conf")
    text = replace_once(text, "error_log /var/log/nginx/error.log warn;", f"error_log {tmp}/nginx-error.log warn;", "nginx.conf")
    text = replace_once(text, "access_log /var/log/nginx/access.log;", f"access_log {tmp}/nginx-access.log;", "nginx.conf")
    path = os.path.join(tmp, "nginx.conf")
    open(path, "w").write(text)
    subprocess.run(["nginx", "-q", "-t", "-c", path], check=True)
    return ["nginx", "-c", path, "-g", "daemon off;"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", choices=["haproxy", "nginx"], required=True)
    parser.add_argument("--roomcast", required=True, help="path of the roomcast binary")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix=f"roomcast-{args.proxy}-smoke-")
    ports = [free_port(), free_port()]
    proxy_port = free_port()
    procs = {}
    logs = {}

    def start(name, argv, env=None):
        logs[name] = open(os.path.join(tmp, f"{name}.log"), "w+")
        procs[name] = subprocess.Popen(argv, stdout=logs[name], stderr=subprocess.STDOUT, env=env)

    try:
        for i, port in enumerate(ports):
            start(
                f"node{i + 1}",
                [
                    args.roomcast, "serve", "--config", os.path.join(DEPLOY, "roomcast.toml"),
                    "--listen", f"127.0.0.1:{port}", "--workers", "1",
                    "--shutdown-delay", f"{SHUTDOWN_DELAY}s", "--drain-timeout", f"{DRAIN_TIMEOUT}s",
                    "--trusted-proxies", "127.0.0.1",
                ],
                env=dict(os.environ, RUST_LOG="info"),
            )
        for i, port in enumerate(ports):
            if not check(f"node{i + 1} answers /healthz", wait_until(lambda: http_get(port, "/healthz")[0] == 200, 10)):
                return
        argv = (haproxy_config if args.proxy == "haproxy" else nginx_config)(tmp, proxy_port, ports)
        start(args.proxy, argv)
        if not check(f"{args.proxy} forwards GET /readyz", wait_until(lambda: http_get(proxy_port, "/readyz")[0] == 200, 10)):
            return
        if args.proxy == "haproxy":
            # Both servers must have passed their checks (rise 2, inter 1s) before balancing.
            time.sleep(2.5)

        # Two clients through the proxy: upgrade, welcome, one on each node.
        a = WebSocket(proxy_port)
        welcome_a = a.recv_type("welcome")
        check("upgrade through the proxy, client A gets welcome", welcome_a)
        counts = wait_until(lambda: [open_connections(p) for p in ports] if sum(filter(None, [open_connections(p) for p in ports])) == 1 else None, 5)
        node_a = counts.index(1) if counts else 0
        node_b = 1 - node_a
        b = WebSocket(proxy_port)
        welcome_b = b.recv_type("welcome")
        check("client B gets welcome", welcome_b)
        counts = wait_until(lambda: [open_connections(p) for p in ports] if [open_connections(p) for p in ports] == [1, 1] else None, 5)
        check("the proxy put the two clients on different nodes (least connections)", counts == [1, 1], f"open per node: {[open_connections(p) for p in ports]}")

        # Frames both ways through the tunnel: a private message to oneself comes back.
        a.send({"type": "private_message", "to": welcome_a["client_id"], "message": "ping"})
        echoed = a.recv_type("private_message")
        check("messages flow both ways through the proxy", echoed and echoed.get("message") == "ping")

        # Rooms are per node: same room, different nodes, each alone in it.
        a.send({"type": "join_room", "room": "lobby"})
        joined_a = a.recv_type("room_joined")
        b.send({"type": "join_room", "room": "lobby"})
        joined_b = b.recv_type("room_joined")
        a.send({"type": "room_message", "room": "lobby", "message": "hello"})
        seen = b.recv_type("room_message", timeout=1.0)
        check(
            "rooms are per node (documented): A and B in 'lobby' on different nodes do not meet",
            joined_a and joined_b and joined_a["members"] == 1 and joined_b["members"] == 1 and seen is None,
            f"members seen: {joined_a and joined_a['members']}, {joined_b and joined_b['members']}",
        )

        # Drain node_a.
        name_a = f"node{node_a + 1}"
        t0 = time.monotonic()
        procs[name_a].send_signal(signal.SIGTERM)
        status = wait_until(lambda: http_get(ports[node_a], "/readyz")[0] == 503, 1.0, 0.05)
        check(f"{name_a}: /readyz answers 503 right after SIGTERM", status, f"{time.monotonic() - t0:.2f}s")
        if args.proxy == "haproxy":
            down = wait_until(lambda: f"node{node_a + 1} is DOWN" in open(logs["haproxy"].name).read(), SHUTDOWN_DELAY)
            check(f"HAProxy marks {name_a} down before the shutdown delay ends", down, f"{time.monotonic() - t0:.2f}s after SIGTERM")
            c = WebSocket(proxy_port)
            check("a client arriving during the delay is sent to the other node", c.recv_type("welcome") and wait_until(lambda: open_connections(ports[node_b]) == 2, 2))
            c.close()
        code = a.wait_close(SHUTDOWN_DELAY + DRAIN_TIMEOUT + 5)
        elapsed = time.monotonic() - t0
        check(f"client A (on {name_a}) is closed with 1001 after the shutdown delay", code == 1001 and elapsed >= SHUTDOWN_DELAY - 0.5, f"code {code} after {elapsed:.2f}s")
        try:
            rc = procs[name_a].wait(timeout=DRAIN_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            rc = None
        check(f"{name_a} exits 0", rc == 0, f"exit {rc} after {time.monotonic() - t0:.2f}s")

        # B is unaffected; a reconnecting client lands on the remaining node.
        b.send({"type": "private_message", "to": welcome_b["client_id"], "message": "still here"})
        check("client B on the other node keeps working", (b.recv_type("private_message") or {}).get("message") == "still here")
        c = WebSocket(proxy_port)
        check("a reconnecting client is served by the remaining node", c.recv_type("welcome") and wait_until(lambda: open_connections(ports[node_b]) >= 2, 3))
        for ws in (a, b, c):
            ws.close()
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # HAProxy and nginx: immediate stop
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        failed = sum(1 for _, ok in RESULTS if not ok)
        if failed:
            print(f"logs kept in {tmp}")
            for name, log in logs.items():
                log.seek(0)
                print(f"--- {name}.log (last lines)")
                print("".join(log.readlines()[-15:]), end="")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{args.proxy}: {len(RESULTS) - failed} passed, {failed} failed")
        sys.exit(1 if failed or not RESULTS else 0)


if __name__ == "__main__":
    main()
