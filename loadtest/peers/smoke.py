#!/usr/bin/env python3
"""Protocol smoke test for roomcast and its load-test peers (standard library only).

    python3 loadtest/peers/smoke.py PORT [HOST]

Drives the subset of shared/PROTOCOL.md the peers implement and checks every server frame
byte for byte (field names, field order, values), and that nobody gets what they should not:

  welcome on connect; join_room (room_joined 1 then 2, member_joined to the other member,
  joining twice sends nothing); room_message (the other member gets it exactly, the sender
  gets nothing; a non-string message is relayed verbatim); "Room does not exist";
  "You are not in this room"; broadcast (every other client, not the sender); leave_room
  (member_left to the rest, nothing to the leaver); close leaves every room.

Exits 0 when every check passes, 1 otherwise.
"""

import base64
import hashlib
import json
import os
import socket
import struct
import sys
import time

QUIET = 0.3  # seconds to wait when checking that nothing arrives
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Client:
    """A minimal RFC 6455 client: text frames only, masked writes, no extensions."""

    def __init__(self, host, port, name):
        self.name = name
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"{name}: connection closed during handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise AssertionError(f"{name}: handshake refused: {lines[0]}")
        want = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:]}
        if headers.get("sec-websocket-accept") != want:
            raise AssertionError(f"{name}: bad Sec-WebSocket-Accept")

    def send(self, obj):
        payload = json.dumps(obj, separators=(",", ":")).encode()
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n, deadline):
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            if not chunk:
                raise ConnectionError(f"{self.name}: connection closed by server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_text(self, timeout=3.0):
        """The next text message as a str; raises TimeoutError when none arrives in time."""
        deadline = time.monotonic() + timeout
        message = b""
        while True:
            b0, b1 = self._read(2, deadline)
            opcode, fin, n = b0 & 0x0F, b0 & 0x80, b1 & 0x7F
            if b1 & 0x80:
                raise AssertionError(f"{self.name}: server frame is masked")
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2, deadline))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8, deadline))
            payload = self._read(n, deadline)
            if opcode == 0x8:
                raise ConnectionError(f"{self.name}: server sent close {payload!r}")
            if opcode in (0x9, 0xA):  # ping / pong: not expected, skip
                continue
            if opcode == 0x2:
                raise AssertionError(f"{self.name}: unexpected binary frame")
            message += payload
            if fin:
                return message.decode("utf-8")

    def close(self):
        try:
            mask = os.urandom(4)
            code = struct.pack("!H", 1000)
            self.sock.sendall(bytes([0x88, 0x82]) + mask + bytes(b ^ mask[i] for i, b in enumerate(code)))
            time.sleep(0.05)
        finally:
            self.sock.close()


class Smoke:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.passed = 0
        self.failures = []
        self.clients = []

    def connect(self, name):
        client = Client(self.host, self.port, name)
        self.clients.append(client)
        return client

    def check(self, label, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"  ok    {label}")
        else:
            self.failures.append(label)
            print(f"  FAIL  {label}" + (f": {detail}" if detail else ""))

    def expect_exact(self, client, label, expected_fields, timestamp=False):
        """The next frame must be exactly this object, in this field order. With timestamp=True
        a trailing integer `timestamp` within 5 s of now is also required."""
        try:
            text = client.recv_text()
        except (TimeoutError, ConnectionError) as e:
            self.check(label, False, f"{client.name} got nothing ({e.__class__.__name__}: {e})")
            return None
        try:
            got = json.loads(text)
        except ValueError:
            self.check(label, False, f"not JSON: {text!r}")
            return None
        fields = dict(expected_fields)
        if timestamp:
            ts = got.get("timestamp") if isinstance(got, dict) else None
            if not isinstance(ts, int) or isinstance(ts, bool) or abs(ts - time.time()) > 5:
                self.check(label, False, f"bad timestamp in {text}")
                return got
            fields["timestamp"] = ts
        want = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
        self.check(label, text == want, f"{client.name} got {text}\n          expected {want}")
        return got

    def expect_nothing(self, clients, label):
        extra = []
        for client in clients:
            try:
                extra.append(f"{client.name} got {client.recv_text(QUIET)}")
            except TimeoutError:
                pass
        self.check(label, not extra, "; ".join(extra))

    def welcome(self, client):
        try:
            text = client.recv_text()
        except (TimeoutError, ConnectionError) as e:
            self.check(f"{client.name}: welcome", False, str(e))
            return None
        got = json.loads(text)
        cid = got.get("client_id") if isinstance(got, dict) else None
        ok = (
            isinstance(cid, str)
            and cid.startswith("client_")
            and len(cid) > len("client_")
            and list(got) == ["type", "client_id", "timestamp"]
            and got["type"] == "welcome"
            and isinstance(got["timestamp"], int)
            and abs(got["timestamp"] - time.time()) <= 5
        )
        self.check(f"{client.name}: welcome {{type, client_id: client_…, timestamp}}", ok, text)
        return cid

    def run(self):
        a = self.connect("A")
        b = self.connect("B")
        id_a, id_b = self.welcome(a), self.welcome(b)
        if not (id_a and id_b):
            return
        self.check("client ids are unique", id_a != id_b, f"{id_a} == {id_b}")

        room = "lobby"
        a.send({"type": "join_room", "room": room})
        self.expect_exact(a, "A joins: room_joined members 1",
                          {"type": "room_joined", "room": room, "members": 1})
        b.send({"type": "join_room", "room": room})
        self.expect_exact(b, "B joins: room_joined members 2",
                          {"type": "room_joined", "room": room, "members": 2})
        self.expect_exact(a, "A: member_joined B, total_members 2",
                          {"type": "member_joined", "room": room, "client_id": id_b, "total_members": 2})
        b.send({"type": "join_room", "room": room})
        self.expect_nothing([a, b], "B joins again: nothing is sent to anyone")

        a.send({"type": "room_message", "room": room, "message": "hello"})
        self.expect_exact(b, "B receives A's room_message exactly",
                          {"type": "room_message", "room": room, "from": id_a, "message": "hello"},
                          timestamp=True)
        self.expect_nothing([a], "sender A receives nothing")

        body = {"text": "héllo \"quoted\"", "n": 42, "list": [1, True, None], "nested": {"z": 1, "a": 2}}
        b.send({"type": "room_message", "room": room, "message": body})
        self.expect_exact(a, "non-string message relayed verbatim",
                          {"type": "room_message", "room": room, "from": id_b, "message": body},
                          timestamp=True)
        self.expect_nothing([b], "sender B receives nothing")

        a.send({"type": "room_message", "room": "no-such-room", "message": "x"})
        self.expect_exact(a, 'error "Room does not exist"',
                          {"type": "error", "message": "Room does not exist"}, timestamp=True)

        c = self.connect("C")
        id_c = self.welcome(c)
        c.send({"type": "room_message", "room": room, "message": "x"})
        self.expect_exact(c, 'error "You are not in this room"',
                          {"type": "error", "message": "You are not in this room"}, timestamp=True)
        self.expect_nothing([a, b], "members get nothing from a non-member")

        c.send({"type": "broadcast", "message": "to all"})
        for client in (a, b):
            self.expect_exact(client, f"{client.name} receives C's broadcast",
                              {"type": "broadcast", "from": id_c, "message": "to all"}, timestamp=True)
        self.expect_nothing([c], "broadcast sender C receives nothing")

        b.send({"type": "leave_room", "room": room})
        self.expect_exact(a, "B leaves: A gets member_left total_members 1",
                          {"type": "member_left", "room": room, "client_id": id_b, "total_members": 1})
        self.expect_nothing([b], "leaver B gets no reply")
        b.send({"type": "leave_room", "room": room})
        self.expect_nothing([a, b], "leaving a room one is not in: nothing")

        b.send({"type": "join_room", "room": room})
        self.expect_exact(b, "B rejoins: room_joined members 2",
                          {"type": "room_joined", "room": room, "members": 2})
        self.expect_exact(a, "A: member_joined B again",
                          {"type": "member_joined", "room": room, "client_id": id_b, "total_members": 2})
        a.close()
        self.clients.remove(a)
        self.expect_exact(b, "A closes: B gets member_left total_members 1",
                          {"type": "member_left", "room": room, "client_id": id_a, "total_members": 1})
        b.send({"type": "leave_room", "room": room})
        self.expect_nothing([b, c], "last member leaves: nothing sent")
        c.send({"type": "room_message", "room": room, "message": "x"})
        self.expect_exact(c, "emptied room is deleted: Room does not exist",
                          {"type": "error", "message": "Room does not exist"}, timestamp=True)

    def close(self):
        for client in self.clients:
            try:
                client.close()
            except OSError:
                pass


def main():
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    smoke = Smoke(host, port)
    print(f"smoke test against {host}:{port}")
    try:
        smoke.run()
    except (OSError, ConnectionError, AssertionError) as e:
        smoke.check("run to completion", False, f"{e.__class__.__name__}: {e}")
    finally:
        smoke.close()
    print(f"{smoke.passed} passed, {len(smoke.failures)} failed")
    return 1 if smoke.failures else 0


if __name__ == "__main__":
    sys.exit(main())
