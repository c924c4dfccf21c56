// The demo page in a real browser: Debian's headless Chromium driven by playwright-core.
//
// Starts the roomcast binary (ROOMCAST_BIN, default ../../target/debug/roomcast) on a free port,
// opens the page twice, and checks through the UI only: joining a room, member counts, a room
// message, a private message, a broadcast, an error from the server, and that after the server is
// killed and started again on the same port both pages reconnect by themselves, rejoin their
// room, restore their metadata and exchange messages again. Leaves a screenshot in
// docs/demo.png (ROOMCAST_SCREENSHOT=path to put it elsewhere, ROOMCAST_SCREENSHOT= to skip).
// A second test runs a server with --jwt-secret: the page passes ?token= on to the WebSocket
// URL and shows the user id; without a token it keeps retrying; the offline queue is bounded.
// A third runs a server with --api-key: examples/php/publish.php (php-cli with ext-curl, which
// .ci/run installs) publishes into a room and the page shows the message.
//
//   node --test demo.test.mjs        (or: bash run.sh, which installs and builds first)

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdirSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const BIN = process.env.ROOMCAST_BIN ?? resolve(here, "../../target/debug/roomcast");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SCREENSHOT = process.env.ROOMCAST_SCREENSHOT ?? resolve(here, "../../docs/demo.png");
// As on this machine's notes: no sandbox as root, and no background traffic to Google's hosts.
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const VIEWPORT = { width: 1000, height: 700 };

// --- the server ---------------------------------------------------------------------------

const servers = new Set();
process.on("exit", () => {
  for (const server of servers) server.proc.kill("SIGKILL");
});

const stripAnsi = (text) => text.replace(/\x1b\[[0-9;]*m/g, "");

/** Starts roomcast on `listen` and resolves once it logs the address it listens on. */
function startServer(listen, args = []) {
  return new Promise((resolvePromise, reject) => {
    const proc = spawn(BIN, ["--listen", listen, "--workers", "1", ...args], {
      env: { ...process.env, NO_COLOR: "1", RUST_LOG: "info" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const server = { proc, log: "", port: null };
    servers.add(server);
    const timer = setTimeout(() => fail(new Error("no 'roomcast listening' line within 15 s")), 15000);
    const fail = (error) => {
      clearTimeout(timer);
      proc.kill("SIGKILL");
      reject(new Error(`${error.message}\n--- server output ---\n${server.log}`));
    };
    const onData = (chunk) => {
      server.log += stripAnsi(chunk.toString());
      const match = server.port === null && /roomcast listening.*?\baddr=\S*:(\d+)/.exec(server.log);
      if (match) {
        server.port = Number(match[1]);
        clearTimeout(timer);
        resolvePromise(server);
      }
    };
    proc.stdout.on("data", onData);
    proc.stderr.on("data", onData);
    proc.on("error", fail);
    proc.on("exit", (code, signal) => {
      servers.delete(server);
      server.exited = true;
      if (server.port === null) fail(new Error(`${BIN} exited (${signal ?? code}) before listening`));
    });
  });
}

/** Kills the server and waits until it is gone (so its port is free for the next one). */
async function stopServer(server, signal = "SIGKILL") {
  if (!server || server.exited) return;
  const exited = new Promise((done) => server.proc.once("exit", done));
  server.proc.kill(signal);
  await exited;
}

// --- the browser --------------------------------------------------------------------------

let browser;
let server;
let authServer;
let apiServer;
const pageErrors = [];

after(async () => {
  await browser?.close().catch(() => {});
  await stopServer(server);
  await stopServer(authServer);
  await stopServer(apiServer);
});

async function openPage(port, name, path = "/") {
  const context = await browser.newContext({ viewport: VIEWPORT });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  page.on("pageerror", (error) => pageErrors.push(`${name}: ${error.message}`));
  await page.goto(`http://127.0.0.1:${port}${path}`);
  return page;
}

/** Waits for the page to be connected and returns its client id. */
async function connected(page) {
  await page.locator('#state[data-state="open"]').waitFor();
  const id = await page.locator("#client-id").textContent();
  assert.match(id, /^client_/);
  return id;
}

const roomCount = (page, room, text) =>
  page.locator(`#rooms li[data-room="${room}"] .count`, { hasText: text }).waitFor();

const logEntry = (page, kind, text, fromId) => {
  let entry = page.locator(`#log li.kind-${kind}`, { hasText: text });
  if (fromId) entry = entry.filter({ has: page.locator(`.id[data-id="${fromId}"]`) });
  return entry.first().waitFor();
};

async function joinRoom(page, room) {
  await page.fill("#room-input", room);
  await page.click("#join-btn");
}

async function sendRoomMessage(page, room, message) {
  await page.selectOption("#room-select", room);
  await page.fill("#room-message", message);
  await page.click("#send-room");
}

async function sendPrivate(page, to, message) {
  await page.fill("#pm-to", to);
  await page.fill("#pm-message", message);
  await page.click("#send-pm");
}

// --- the test -----------------------------------------------------------------------------

test("demo page: rooms, messages, errors and reconnect in headless Chromium", { timeout: 120000 }, async (t) => {
  server = await startServer("127.0.0.1:0");
  const port = server.port;
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
  t.diagnostic(`roomcast on port ${port}, chromium ${browser.version()}`);

  try {
    const a = await openPage(port, "A");
    const b = await openPage(port, "B");
    const idA = await connected(a);
    const idB = await connected(b);
    assert.notEqual(idA, idB);

    // Both join "lobby" through the form; counts follow room_joined / member_joined.
    await joinRoom(a, "lobby");
    await roomCount(a, "lobby", "1 member");
    await joinRoom(b, "lobby");
    await roomCount(b, "lobby", "2 members");
    await roomCount(a, "lobby", "2 members");
    await logEntry(a, "member_joined", "joined lobby", idB);

    // A room message from A reaches B.
    await sendRoomMessage(a, "lobby", "hello from A");
    await logEntry(b, "room_message", "hello from A", idA);

    // A private message from B to A's client id reaches A.
    await sendPrivate(b, idA, "psst from B");
    await logEntry(a, "private_message", "psst from B", idB);

    // A broadcast from B reaches A; an error from the server is shown; metadata is set.
    await b.fill("#bc-message", "hi everyone");
    await b.click("#send-bc");
    await logEntry(a, "broadcast", "hi everyone", idB);
    await sendPrivate(a, "client_nobody", "anyone?");
    await logEntry(a, "error", "Recipient not found");
    await a.fill("#meta-name", "alice");
    await a.click("#meta-btn");
    await logEntry(a, "metadata", '{"name":"alice"}');

    // Kill the server (a crash: no close frame) and start it again on the same port.
    await stopServer(server);
    for (const page of [a, b]) {
      await page.locator('#state[data-state="reconnecting"]').waitFor();
      await logEntry(page, "close", "disconnected");
    }
    assert.match(await a.locator("#state").textContent(), /^reconnecting( in \d+ s|…)$/);
    server = await startServer(`127.0.0.1:${port}`);
    assert.equal(server.port, port);

    // Both reconnect by themselves (new client ids), rejoin lobby and restore metadata.
    const newA = await connected(a);
    const newB = await connected(b);
    assert.notEqual(newA, idA);
    assert.notEqual(newB, idB);
    await roomCount(a, "lobby", "2 members");
    await roomCount(b, "lobby", "2 members");
    await a.locator("#log li.kind-metadata").nth(1).waitFor();
    assert.match(await a.locator("#log li.kind-metadata").nth(1).textContent(), /"name":"alice"/);

    // And messages flow again, both ways.
    await sendRoomMessage(b, "lobby", "back again from B");
    await logEntry(a, "room_message", "back again from B", newB);
    await sendRoomMessage(a, "lobby", "welcome back");
    await logEntry(b, "room_message", "welcome back", newA);

    // Leaving through the UI: B's ✕ removes the room and A sees the count drop.
    await b.click('#rooms li[data-room="lobby"] .leave');
    await roomCount(a, "lobby", "1 member");
    await logEntry(a, "member_left", "left lobby", newB);
    assert.equal(await b.locator("#rooms li").count(), 0);

    if (SCREENSHOT) {
      mkdirSync(dirname(SCREENSHOT), { recursive: true });
      await a.screenshot({ path: SCREENSHOT });
      t.diagnostic(`screenshot: ${SCREENSHOT}`);
    }
    assert.deepEqual(pageErrors, [], "uncaught errors in the pages");
  } catch (error) {
    console.error(`--- server output ---\n${server?.log ?? ""}`);
    throw error;
  }
});

/** An HS256 JWT, as the main application would issue it. */
function jwt(claims, secret) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

test("demo page: ?token= reaches the server, user_id is shown; the offline queue is bounded", { timeout: 60000 }, async () => {
  const secret = "browser-test-secret";
  authServer = await startServer("127.0.0.1:0", ["--jwt-secret", secret]);
  const port = authServer.port;
  browser ??= await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });

  const token = jwt({ sub: "alice", exp: Math.floor(Date.now() / 1000) + 600 }, secret);
  const page = await openPage(port, "token", `/?token=${token}`);
  await connected(page);
  assert.equal(await page.locator("#user-id").textContent(), "alice");
  assert.equal(await page.locator("#user").isVisible(), true);

  // Without a token the upgrade is refused (401): the page keeps retrying, never connects.
  const refused = await openPage(port, "no token");
  await logEntry(refused, "reconnecting", "retry 2");
  assert.equal(await refused.locator("#state").getAttribute("data-state"), "reconnecting");

  // The module on its own: messages sent while disconnected are queued, at most maxQueue.
  const dropped = await page.evaluate(async () => {
    const { RoomcastClient } = await import("/roomcast.js");
    const client = new RoomcastClient("ws://127.0.0.1:1/", { maxQueue: 2, minDelay: 60000 });
    const dropped = [];
    client.addEventListener("dropped", (e) => dropped.push(e.detail.message));
    for (const message of ["one", "two", "three"]) client.broadcast(message);
    client.close();
    return dropped;
  });
  assert.deepEqual(dropped, ["one"]);
  assert.deepEqual(pageErrors, [], "uncaught errors in the pages");
});

test("demo page: a PHP script with curl publishes into a room and the page receives it", { timeout: 60000 }, async () => {
  const key = "browser-test-api-key";
  apiServer = await startServer("127.0.0.1:0", ["--api-key", key]);
  const port = apiServer.port;
  browser ??= await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
  const page = await openPage(port, "orders page");
  await connected(page);
  await joinRoom(page, "orders");
  await roomCount(page, "orders", "1");

  const script = resolve(here, "../../examples/php/publish.php");
  const message = JSON.stringify({ order: 42, status: "shipped" });
  const stdout = await new Promise((done, fail) =>
    execFile("php", [script, `http://127.0.0.1:${port}`, key, "orders", message], (error, out, err) =>
      error ? fail(new Error(`php failed: ${error.message} ${err}`)) : done(out),
    ),
  );
  assert.equal(stdout.trim(), '{"delivered":1}');
  await logEntry(page, "room_message", '"status":"shipped"');
  assert.deepEqual(pageErrors, [], "uncaught errors in the pages");
});

test("roomcast.js recovers the messages it missed while its connection was down", { timeout: 60000 }, async () => {
  const key = "browser-history-key";
  const server = await startServer("127.0.0.1:0", [
    "--api-key", key, "--history-size", "100", "--history-ttl", "60s",
  ]);
  const port = server.port;
  browser ??= await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
  const page = await openPage(port, "recovering page");
  const firstId = await connected(page);
  await page.evaluate(() => {
    window.joins = [];
    window.seen = [];
    window.roomcast.addEventListener("room_joined", (e) => window.joins.push(e.detail));
    window.roomcast.addEventListener("room_message", (e) => window.seen.push(e.detail));
  });
  await joinRoom(page, "feed");
  await roomCount(page, "feed", "1");
  const api = (path, body) =>
    fetch(`http://127.0.0.1:${port}${path}`, {
      method: "POST",
      headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
      body: JSON.stringify(body),
    }).then((response) => response.json());
  // The connection is cut; three messages go out before the page is back (250-500 ms later).
  assert.deepEqual(await api("/api/disconnect", { client_id: firstId }), { disconnected: 1 });
  // The answer comes once the close is asked for; the connection leaves its rooms when its own
  // task takes the request up, a moment later (later still on a loaded machine): wait for that,
  // so the messages below are surely missed by it.
  const members = () =>
    fetch(`http://127.0.0.1:${port}/api/rooms/feed`, { headers: { authorization: `Bearer ${key}` } })
      .then((response) => (response.status === 200 ? response.json() : { members: [] }))
      .then((room) => room.members.map((member) => member.client_id));
  while ((await members()).includes(firstId)) {
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  for (const n of [1, 2, 3]) {
    assert.deepEqual(await api("/api/publish", { room: "feed", message: `missed ${n}` }), { delivered: 0 });
  }
  await page.waitForFunction(() => window.seen.length >= 3, null, { timeout: 15000 });
  const { joins, seen } = await page.evaluate(() => ({ joins: window.joins, seen: window.seen }));
  assert.equal(joins.length, 2, "joined, then rejoined after the reconnect");
  assert.equal(joins[0].recovered, false, "the first join asks for offsets from now on");
  assert.equal(joins[1].recovered, true, "the rejoin recovered the gap");
  assert.deepEqual(seen.map((m) => [m.message, m.offset]), [["missed 1", 1], ["missed 2", 2], ["missed 3", 3]]);
  assert.deepEqual(pageErrors, [], "uncaught errors in the pages");
  await stopServer(server);
});
