// The demo page: wires RoomcastClient to the forms, the room list and the event log.
import { RoomcastClient } from "/roomcast.js";

const $ = (selector) => document.querySelector(selector);
const params = new URLSearchParams(location.search);
const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`;
const client = new RoomcastClient(url, { token: params.get("token") ?? undefined });
window.roomcast = client; // for the console (and the browser test)

let selectedRoom = null;
let retryAt = 0;

// --- the event log ------------------------------------------------------------------------

// Parts are strings, or {id} / {room} for clickable client ids and room names.
function log(kind, ...parts) {
  const item = document.createElement("li");
  item.className = `kind-${kind}`;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString([], { hour12: false });
  const label = document.createElement("span");
  label.className = "kind";
  label.textContent = kind.replace("_", " ");
  const text = document.createElement("span");
  text.className = "text";
  for (const part of parts) {
    if (typeof part === "string") {
      text.append(part);
    } else if (part.id !== undefined) {
      const id = document.createElement("span");
      id.className = "id";
      id.title = `${part.id} (click to send a private message)`;
      id.dataset.id = part.id;
      id.textContent = shortId(part.id);
      text.append(id);
    } else if (part.room !== undefined) {
      const room = document.createElement("span");
      room.className = "room";
      room.textContent = part.room;
      text.append(room);
    }
  }
  item.append(time, label, text);
  const list = $("#log");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.append(item);
  while (list.children.length > 500) list.firstElementChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

const shortId = (id) => (id === client.clientId ? "you" : id.length > 16 ? `${id.slice(0, 15)}…` : id);
const show = (message) => (typeof message === "string" ? message : JSON.stringify(message));

$("#log").addEventListener("click", (event) => {
  const id = event.target.closest(".id")?.dataset.id;
  if (id) {
    $("#pm-to").value = id;
    $("#pm-message").focus();
  }
});

// --- connection state ---------------------------------------------------------------------

function renderState() {
  const state = $("#state");
  state.dataset.state = client.state;
  const wait = Math.ceil((retryAt - Date.now()) / 1000);
  state.textContent = {
    idle: "idle",
    connecting: "connecting…",
    open: "connected",
    reconnecting: wait > 0 ? `reconnecting in ${wait} s` : "reconnecting…",
    closed: "closed",
  }[client.state];
}
setInterval(renderState, 250);
client.addEventListener("statechange", () => {
  renderState();
  renderRooms();
});

client.addEventListener("welcome", ({ detail }) => {
  $("#client-id").textContent = detail.client_id;
  $("#user").hidden = !detail.user_id;
  $("#user-id").textContent = detail.user_id ?? "";
  log("welcome", "connected as ", detail.client_id, detail.user_id ? ` (user ${detail.user_id})` : "");
  if (client.rooms.size > 0) log("welcome", `rejoining ${[...client.rooms.keys()].join(", ")}`);
  renderRooms();
});
let lastCloseOpened = false;
client.addEventListener("close", ({ detail }) => {
  $("#client-id").textContent = "…";
  lastCloseOpened = detail.opened;
  if (detail.opened) log("close", `disconnected (code ${detail.code}${detail.reason ? `: ${detail.reason}` : ""})`);
  renderRooms();
});
client.addEventListener("reconnecting", ({ detail }) => {
  retryAt = Date.now() + detail.delay;
  const why = lastCloseOpened ? "" : "could not connect; ";
  log("reconnecting", `${why}retry ${detail.attempt} in ${(detail.delay / 1000).toFixed(1)} s`);
  renderState();
});
client.addEventListener("dropped", ({ detail }) => log("error", `offline queue full, dropped a ${detail.type}`));

// --- rooms --------------------------------------------------------------------------------

function renderRooms() {
  const list = $("#rooms");
  const select = $("#room-select");
  list.replaceChildren();
  select.replaceChildren();
  if (!client.rooms.has(selectedRoom)) selectedRoom = client.rooms.keys().next().value ?? null;
  for (const [room, members] of client.rooms) {
    const item = document.createElement("li");
    item.dataset.room = room;
    item.classList.toggle("selected", room === selectedRoom);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = room;
    const count = document.createElement("span");
    count.className = "count";
    count.textContent =
      members !== null ? `${members} member${members === 1 ? "" : "s"}` : client.state === "open" ? "joining…" : "offline";
    const leave = document.createElement("button");
    leave.className = "link leave";
    leave.title = `leave ${room}`;
    leave.textContent = "✕";
    leave.addEventListener("click", (event) => {
      event.stopPropagation();
      client.leaveRoom(room);
      log("sent", "left ", { room });
      renderRooms();
    });
    item.addEventListener("click", () => {
      selectedRoom = room;
      renderRooms();
      $("#room-message").focus();
    });
    item.append(name, count, leave);
    list.append(item);
    select.append(new Option(room, room, false, room === selectedRoom));
  }
  $("#no-rooms").hidden = client.rooms.size > 0;
}

$("#room-select").addEventListener("change", (event) => {
  selectedRoom = event.target.value;
  renderRooms();
});

$("#join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const room = $("#room-input").value.trim();
  if (!room) return;
  selectedRoom = room;
  client.joinRoom(room);
  $("#room-input").value = "";
  renderRooms();
});

client.addEventListener("room_joined", ({ detail }) => {
  log("room_joined", "joined ", { room: detail.room }, ` (${detail.members} member${detail.members === 1 ? "" : "s"})`);
  renderRooms();
});
client.addEventListener("member_joined", ({ detail }) => {
  log("member_joined", { id: detail.client_id }, " joined ", { room: detail.room }, ` (${detail.total_members} now)`);
  renderRooms();
});
client.addEventListener("member_left", ({ detail }) => {
  log("member_left", { id: detail.client_id }, " left ", { room: detail.room }, ` (${detail.total_members} now)`);
  renderRooms();
});

// --- messages -----------------------------------------------------------------------------

function onSubmit(form, send) {
  $(form).addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
}

onSubmit("#room-form", () => {
  const room = $("#room-select").value;
  const message = $("#room-message").value;
  if (!room) return log("error", "join a room first");
  client.roomMessage(room, message);
  log("sent", "to ", { room }, `: ${message}`);
  $("#room-message").value = "";
});
onSubmit("#pm-form", () => {
  const to = $("#pm-to").value.trim();
  const message = $("#pm-message").value;
  client.privateMessage(to, message);
  log("sent", "to ", { id: to }, `: ${message}`);
  $("#pm-message").value = "";
});
onSubmit("#bc-form", () => {
  const message = $("#bc-message").value;
  client.broadcast(message);
  log("sent", `to everyone: ${message}`);
  $("#bc-message").value = "";
});
onSubmit("#meta-form", () => {
  client.setMetadata({ name: $("#meta-name").value });
});

client.addEventListener("room_message", ({ detail }) =>
  log("room_message", "[", { room: detail.room }, "] ", { id: detail.from }, `: ${show(detail.message)}`));
client.addEventListener("private_message", ({ detail }) =>
  log("private_message", "from ", { id: detail.from }, `: ${show(detail.message)}`));
client.addEventListener("broadcast", ({ detail }) =>
  log("broadcast", "from ", { id: detail.from }, `: ${show(detail.message)}`));
client.addEventListener("metadata_updated", ({ detail }) =>
  log("metadata", `metadata is now ${JSON.stringify(detail.metadata)}`));
client.addEventListener("error", ({ detail }) => log("error", detail.message));

renderRooms();
renderState();
