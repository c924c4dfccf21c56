// roomcast.js: a small browser client for a roomcast server (or any server that speaks the
// Ratchet WebSocketServer protocol, see PROTOCOL.md). One file, no dependencies: copy it.
//
//   import { RoomcastClient } from "./roomcast.js";
//   const client = new RoomcastClient("wss://chat.example.com/", { token: jwt });
//   client.addEventListener("welcome", (e) => console.log("I am", e.detail.client_id));
//   client.addEventListener("room_message", (e) => console.log(e.detail.from, e.detail.message));
//   client.joinRoom("lobby");
//   client.roomMessage("lobby", "hello");
//
// What it does for you:
// - Reconnects when the connection drops (server restart, network change, close 1001/1013),
//   after an exponential backoff with jitter: the n-th retry waits a random time between half
//   and all of min(maxDelay, minDelay * 2^n). The backoff resets once a `welcome` arrives.
// - Remembers the rooms you joined and the metadata you set, and restores both on every new
//   connection, before anything else is sent. Your client id changes on reconnect (the server
//   hands out a new one): read `client.clientId` or listen for `welcome`.
// - Recovers what it missed while away, where the server keeps history (--history-size): each
//   join asks for offsets (`since`), the client remembers each room's last offset and epoch,
//   and a rejoin sends them; the server replays the missed `room_message`s after the
//   `room_joined`, whose `recovered` says whether it could (false: reload your state). A server
//   without history ignores `since`.
// - Queues roomMessage / privateMessage / broadcast calls made while disconnected and sends
//   them, in order, after the rooms are restored. The queue is bounded (`maxQueue`); when it is
//   full the oldest message is dropped and a `dropped` event tells you which.
//
// Events (all CustomEvent; the server's JSON object is `event.detail`):
// - one per server message type: `welcome`, `room_joined`, `member_joined`, `member_left`,
//   `room_message`, `private_message`, `broadcast`, `metadata_updated`, `error`
//   (an `error` event is a message from the server, e.g. "Recipient not found", not a failure
//   of the socket); every server message is also dispatched as `message`;
// - `open` (socket open; detail {url});
// - `close` (socket closed, or a connect attempt failed; detail {code, reason, wasClean,
//   opened}, where `opened` is false for an attempt that never connected);
// - `reconnecting` (detail {attempt, delay}: the wait in ms before the next try);
// - `statechange` (detail {state}), `dropped` (detail: the queued message that was dropped).

const JOIN_ERRORS = new Set([
  "Room name required",
  "Room name too long",
  "Room name must be a string",
  "Too many rooms",
  "Not allowed to join this room",
]);

export class RoomcastClient extends EventTarget {
  /**
   * @param {string} url ws:// or wss:// URL of the server (http(s):// and relative URLs are
   *   resolved against the page and turned into ws(s)://).
   * @param {object} [options]
   * @param {string | (() => string)} [options.token] JWT sent as `?token=` on every connect;
   *   a function is called on each connect, so it can hand out a fresh token.
   * @param {number} [options.minDelay=500] first reconnect delay, ms.
   * @param {number} [options.maxDelay=30000] longest reconnect delay, ms.
   * @param {number} [options.maxQueue=100] messages kept while disconnected.
   * @param {boolean} [options.autoConnect=true] connect in the constructor.
   */
  constructor(url, { token, minDelay = 500, maxDelay = 30000, maxQueue = 100, autoConnect = true } = {}) {
    super();
    this.url = url;
    this.token = token;
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.maxQueue = maxQueue;
    /** "idle" | "connecting" | "open" | "reconnecting" | "closed" */
    this.state = "idle";
    /** This connection's id (null until `welcome`); a new one after every reconnect. */
    this.clientId = null;
    /** The token's `sub`, when the server checks tokens. */
    this.userId = null;
    /** Joined (or joining) rooms: name -> count of members (null until `room_joined`). */
    this.rooms = new Map();
    /** Each room's history position as received: name -> {offset, epoch}. */
    this.positions = new Map();
    /** Metadata set so far, merged as the server merges it. */
    this.metadata = {};
    this._queue = [];
    this._pendingJoins = [];
    this._attempt = 0;
    this._timer = null;
    this._ws = null;
    this._opened = false;
    if (autoConnect) this.connect();
  }

  /** Opens the connection (again, after close()). */
  connect() {
    clearTimeout(this._timer);
    this._timer = null;
    if (this._ws) return;
    this._setState(this._attempt === 0 ? "connecting" : "reconnecting");
    const ws = new WebSocket(this._connectUrl());
    this._ws = ws;
    this._opened = false;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onMessage(ws, event);
    ws.onclose = (event) => this._onClose(ws, event);
  }

  /** Closes for good: no reconnect until connect() is called. Rooms and metadata are kept. */
  close(code = 1000, reason = "") {
    clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    this._ws = null;
    this._attempt = 0;
    this._forget();
    this._setState("closed");
    if (ws) {
      ws.onclose = null;
      ws.close(code, reason);
      this._emit("close", { code, reason, wasClean: true, opened: this._opened });
    }
  }

  /** Joins `room` now, and again after every reconnect. Joining twice does nothing. */
  joinRoom(room) {
    if (this.rooms.has(room)) return;
    this.rooms.set(room, null);
    if (this._isOpen()) this._join(room);
  }

  /** Leaves `room` (the server sends no reply) and forgets it. */
  leaveRoom(room) {
    if (!this.rooms.delete(room)) return;
    this.positions.delete(room);
    if (this._isOpen()) this._send({ type: "leave_room", room });
  }

  /** Sends `message` (any JSON value) to the other members of `room`. */
  roomMessage(room, message) {
    this._sendOrQueue({ type: "room_message", room, message });
  }

  /** Sends `message` to one client id (or, with token auth, every connection of a user id). */
  privateMessage(to, message) {
    this._sendOrQueue({ type: "private_message", to, message });
  }

  /** Sends `message` to every other connected client. */
  broadcast(message) {
    this._sendOrQueue({ type: "broadcast", message });
  }

  /** Merges `metadata` (an object) over this client's metadata, now and after reconnects. */
  setMetadata(metadata) {
    Object.assign(this.metadata, metadata);
    if (this._isOpen()) this._send({ type: "set_metadata", metadata });
  }

  // --- internals -------------------------------------------------------------------------

  _connectUrl() {
    const base = typeof location === "undefined" ? undefined : location.href;
    const url = new URL(this.url, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    const token = typeof this.token === "function" ? this.token() : this.token;
    if (token) url.searchParams.set("token", token);
    return url.href;
  }

  _isOpen() {
    return this._ws !== null && this._ws.readyState === WebSocket.OPEN;
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    this._opened = true;
    this._emit("open", { url: this.url });
    // Restore first, so queued messages to a room go out after we are back in it.
    this._pendingJoins = [];
    for (const room of this.rooms.keys()) {
      this.rooms.set(room, null);
      this._join(room);
    }
    if (Object.keys(this.metadata).length > 0) {
      this._send({ type: "set_metadata", metadata: this.metadata });
    }
    const queued = this._queue;
    this._queue = [];
    for (const message of queued) this._send(message);
  }

  _onMessage(ws, event) {
    if (ws !== this._ws) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      console.warn("roomcast: ignoring a frame that is not JSON", event.data);
      return;
    }
    if (message === null || typeof message !== "object" || typeof message.type !== "string") return;
    switch (message.type) {
      case "welcome":
        this.clientId = message.client_id;
        this.userId = message.user_id ?? null;
        this._attempt = 0;
        this._setState("open");
        break;
      case "room_joined": {
        const pending = this._pendingJoins.indexOf(message.room);
        if (pending >= 0) this._pendingJoins.splice(pending, 1);
        if (this.rooms.has(message.room)) this.rooms.set(message.room, message.members);
        if (typeof message.offset === "number" && typeof message.epoch === "string") {
          this.positions.set(message.room, { offset: message.offset, epoch: message.epoch });
        }
        break;
      }
      case "room_message": {
        const position = this.positions.get(message.room);
        if (position && typeof message.offset === "number") position.offset = message.offset;
        break;
      }
      case "member_joined":
      case "member_left":
        if (this.rooms.has(message.room)) this.rooms.set(message.room, message.total_members);
        break;
      case "metadata_updated":
        this.metadata = { ...message.metadata };
        break;
      case "error":
        // Replies come in order, so a join error belongs to the oldest join still unanswered.
        if (JOIN_ERRORS.has(message.message) && this._pendingJoins.length > 0) {
          this.rooms.delete(this._pendingJoins.shift());
        }
        break;
    }
    this._emit(message.type, message);
    this._emit("message", message);
  }

  _onClose(ws, event) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._forget();
    const { code, reason, wasClean } = event;
    this._emit("close", { code, reason, wasClean, opened: this._opened });
    if (this.state === "closed" || this._ws) return; // a listener called close() or connect()
    const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** this._attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    this._attempt += 1;
    this._timer = setTimeout(() => this.connect(), delay);
    this._setState("reconnecting");
    this._emit("reconnecting", { attempt: this._attempt, delay });
  }

  /** What belonged to the connection: its ids and the member counts (rooms stay, unknown). */
  _forget() {
    this.clientId = null;
    this.userId = null;
    for (const room of this.rooms.keys()) this.rooms.set(room, null);
  }

  _join(room) {
    this._pendingJoins.push(room);
    this._send({ type: "join_room", room, since: this.positions.get(room) ?? {} });
  }

  _sendOrQueue(message) {
    if (this._isOpen()) return this._send(message);
    this._queue.push(message);
    while (this._queue.length > this.maxQueue) this._emit("dropped", this._queue.shift());
  }

  _send(message) {
    this._ws.send(JSON.stringify(message));
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("statechange", { state });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
