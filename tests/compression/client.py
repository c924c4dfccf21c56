"""The Python `websockets` client, unmodified, against a roomcast started with --compression:
it offers permessage-deflate as it always does, joins a room with two connections, sends a
large message from one and reads it on the other. Prints a JSON report for tests/compression.rs.

    python client.py ws://127.0.0.1:PORT/
"""
import asyncio
import json
import sys

from websockets.asyncio.client import connect


async def until(ws, kind):
    while True:
        message = json.loads(await ws.recv())
        if message["type"] == kind:
            return message


async def main(url):
    text = "compressible words, compressible words. " * 100
    async with connect(url) as sender, connect(url) as receiver:
        await until(sender, "welcome")
        await until(receiver, "welcome")
        for ws in (sender, receiver):
            await ws.send(json.dumps({"type": "join_room", "room": "py"}))
            await until(ws, "room_joined")
        await sender.send(json.dumps({"type": "room_message", "room": "py", "message": text}))
        got = await asyncio.wait_for(until(receiver, "room_message"), 5)
        print(json.dumps({
            "extensions": receiver.response.headers.get("Sec-WebSocket-Extensions"),
            "sent": len(text),
            "received": len(got["message"]),
        }))


asyncio.run(main(sys.argv[1]))
