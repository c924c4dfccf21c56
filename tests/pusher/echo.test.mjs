// Laravel Echo 2 on pusher-js, as a Laravel frontend uses it with the `pusher` (or `reverb`)
// broadcaster, against roomcast's Pusher endpoint: the REST SDK plays Laravel's broadcaster
// (event names as Laravel sends them: the event class, `App\Events\...`) and its
// /broadcasting/auth. tests/pusher.rs starts the server and runs this; one test per behaviour.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import Echo from 'laravel-echo';
import Pusher from 'pusher-js';
import { connection, key, rest } from './helpers.mjs';

const echoes = [];
after(() => echoes.forEach((echo) => echo.disconnect()));

/** An Echo client; `user` is who /broadcasting/auth says it is for presence channels. */
function echo(user = null) {
  const instance = new Echo({
    broadcaster: 'pusher',
    Pusher,
    key,
    ...connection,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, channelName.startsWith('presence-')
          ? rest.authorizeChannel(socketId, channelName, { user_id: user.id, user_info: user })
          : rest.authorizeChannel(socketId, channelName)),
    },
  });
  echoes.push(instance);
  return instance;
}

/** Resolves once Echo's channel is subscribed (Echo's `subscribed` callback). */
function subscribed(channel) {
  return new Promise((resolve, reject) => {
    channel.subscribed(() => resolve(channel));
    channel.error((error) => reject(Object.assign(new Error('subscription error'), { error })));
  });
}

function heard(channel, event, listen = 'listen') {
  return new Promise((resolve) => channel[listen](event, resolve));
}

/** What `event` brings on an Echo channel within `ms`, or `undefined`. */
function heardWithin(channel, event, ms) {
  return Promise.race([heard(channel, event), new Promise((resolve) => setTimeout(resolve, ms))]);
}

test('Echo.channel().listen() gets what Laravel broadcasts, by the event class name', async () => {
  const channel = await subscribed(echo().channel('orders'));
  const shipped = heard(channel, 'OrderShipped');
  // Laravel's broadcaster: the event's class as its name, its public properties as data.
  await rest.trigger('orders', 'App\\Events\\OrderShipped', { order: { id: 42 } });
  assert.deepEqual(await shipped, { order: { id: 42 } });
});

test('a broadcast with toOthers() (the X-Socket-ID Echo sends) skips the sender\'s connection', async () => {
  const [sender, other] = [echo(), echo()];
  const [mine, theirs] = await Promise.all([
    subscribed(sender.channel('others')),
    subscribed(other.channel('others')),
  ]);
  const skipped = heardWithin(mine, '.Posted', 500);
  const got = heard(theirs, '.Posted');
  await rest.trigger('others', 'Posted', { n: 1 }, { socket_id: sender.socketId() });
  assert.deepEqual(await got, { n: 1 });
  assert.equal(await skipped, undefined);
});

test('Echo.private() authorizes through the app, and whisper() reaches the other members', async () => {
  const [a, b] = [echo(), echo()];
  const [mine, theirs] = await Promise.all([
    subscribed(a.private('room.1')),
    subscribed(b.private('room.1')),
  ]);
  const typing = heard(theirs, 'typing', 'listenForWhisper');
  mine.whisper('typing', { name: 'a' });
  assert.deepEqual(await typing, { name: 'a' });
});

test('Echo.join() gives here() the members, then joining() and leaving() once per user', async () => {
  const first = echo({ id: 1, name: 'Taylor' });
  const room = first.join('chat.1');
  const here = new Promise((resolve) => room.here(resolve));
  assert.deepEqual(await here, [{ id: 1, name: 'Taylor' }]);
  const joining = new Promise((resolve) => room.joining(resolve));
  const second = echo({ id: 2, name: 'Abigail' });
  const theirs = second.join('chat.1');
  const theirHere = new Promise((resolve) => theirs.here(resolve));
  assert.deepEqual(await joining, { id: 2, name: 'Abigail' });
  const ids = (await theirHere).map((user) => user.id).sort();
  assert.deepEqual(ids, [1, 2]);
  const leaving = new Promise((resolve) => room.leaving(resolve));
  second.leave('chat.1');
  assert.deepEqual(await leaving, { id: 2, name: 'Abigail' });
});
