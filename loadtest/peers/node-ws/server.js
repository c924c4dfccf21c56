'use strict';
// Comparison peer for roomcast's load tests: the seed rooms protocol (shared/PROTOCOL.md,
// subset: welcome, join_room, leave_room, room_message, broadcast, leave-all on close) on
// Node's `ws`, written the way most Node servers are: a Map of rooms to Sets of sockets,
// JSON.stringify once per message, then ws.send() to each recipient.
//
// Usage: node server.js [PORT | HOST:PORT]   (or env PORT; host defaults to 127.0.0.1)

const crypto = require('node:crypto');
const { WebSocketServer, WebSocket } = require('ws');

function parseListen(arg) {
  const raw = arg || process.env.PORT || '8080';
  const colon = raw.lastIndexOf(':');
  if (colon === -1) return { host: '127.0.0.1', port: Number(raw) };
  return { host: raw.slice(0, colon) || '127.0.0.1', port: Number(raw.slice(colon + 1)) };
}

const { host, port } = parseListen(process.argv[2]);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`invalid port: ${process.argv[2] || process.env.PORT}`);
  process.exit(2);
}

/** room name -> Set of sockets */
const rooms = new Map();

const now = () => Math.floor(Date.now() / 1000);

function sendError(ws, message) {
  ws.send(JSON.stringify({ type: 'error', message, timestamp: now() }));
}

// A missing or null `room` is the empty string; any other non-string is refused, as roomcast does.
function roomField(msg) {
  const room = msg.room;
  if (room === undefined || room === null) return '';
  return typeof room === 'string' ? room : undefined;
}

// A missing or null `message` is the empty string; any other JSON value is relayed verbatim.
function bodyField(msg) {
  return msg.message === undefined || msg.message === null ? '' : msg.message;
}

function leaveRoom(ws, room) {
  const members = rooms.get(room);
  if (!members || !members.delete(ws)) return;
  ws.rooms.delete(room);
  if (members.size === 0) {
    rooms.delete(room);
    return;
  }
  const data = JSON.stringify({
    type: 'member_left',
    room,
    client_id: ws.clientId,
    total_members: members.size,
  });
  for (const member of members) {
    if (member.readyState === WebSocket.OPEN) member.send(data);
  }
}

function handle(ws, text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch {
    return sendError(ws, 'Invalid message format');
  }
  if (msg === null || typeof msg !== 'object' || Array.isArray(msg) || typeof msg.type !== 'string') {
    return sendError(ws, 'Invalid message format');
  }

  switch (msg.type) {
    case 'join_room': {
      const room = roomField(msg);
      if (room === undefined) return sendError(ws, 'Room name must be a string');
      if (room === '') return sendError(ws, 'Room name required');
      let members = rooms.get(room);
      if (!members) {
        members = new Set();
        rooms.set(room, members);
      }
      if (members.has(ws)) return; // already a member: nothing happens
      members.add(ws);
      ws.rooms.add(room);
      ws.send(JSON.stringify({ type: 'room_joined', room, members: members.size }));
      const data = JSON.stringify({
        type: 'member_joined',
        room,
        client_id: ws.clientId,
        total_members: members.size,
      });
      for (const member of members) {
        if (member !== ws && member.readyState === WebSocket.OPEN) member.send(data);
      }
      return;
    }

    case 'leave_room': {
      const room = roomField(msg);
      if (room === undefined) return sendError(ws, 'Room name must be a string');
      return leaveRoom(ws, room);
    }

    case 'room_message': {
      const room = roomField(msg);
      if (room === undefined) return sendError(ws, 'Room name must be a string');
      const members = rooms.get(room);
      if (!members) return sendError(ws, 'Room does not exist');
      if (!members.has(ws)) return sendError(ws, 'You are not in this room');
      const data = JSON.stringify({
        type: 'room_message',
        room,
        from: ws.clientId,
        message: bodyField(msg),
        timestamp: now(),
      });
      for (const member of members) {
        if (member !== ws && member.readyState === WebSocket.OPEN) member.send(data);
      }
      return;
    }

    case 'broadcast': {
      const data = JSON.stringify({
        type: 'broadcast',
        from: ws.clientId,
        message: bodyField(msg),
        timestamp: now(),
      });
      for (const client of wss.clients) {
        if (client !== ws && client.readyState === WebSocket.OPEN) client.send(data);
      }
      return;
    }

    default:
      // private_message and set_metadata are outside the measured subset.
      return sendError(ws, `Unknown message type: ${msg.type}`);
  }
}

// 64 KiB, roomcast's default --max-message-size (ws would otherwise allow 100 MiB); larger
// messages close the connection with 1009, as in roomcast.
const wss = new WebSocketServer({ host, port, maxPayload: 64 * 1024 });

wss.on('connection', (ws) => {
  ws.clientId = `client_${crypto.randomBytes(16).toString('hex')}`;
  ws.rooms = new Set();

  // Binary messages go to the same handler as text, as in the seed (Ratchet) and roomcast.
  ws.on('message', (data) => handle(ws, data.toString()));

  ws.on('close', () => {
    for (const room of [...ws.rooms]) leaveRoom(ws, room);
  });

  ws.on('error', () => {}); // a broken peer only closes its own connection

  ws.send(JSON.stringify({ type: 'welcome', client_id: ws.clientId, timestamp: now() }));
});

wss.on('listening', () => {
  const addr = wss.address();
  console.log(`node-ws listening on ${addr.address}:${addr.port}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(0));
}
