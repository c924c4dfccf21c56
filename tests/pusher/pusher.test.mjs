// roomcast's Pusher endpoint driven by the unmodified pusher-js client (as a browser or Laravel
// Echo uses it) and the pusher REST SDK (as Laravel's broadcaster calls it). tests/pusher.rs
// starts the server with one app and runs this (see helpers.mjs); one test per behaviour.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { port, rest, restOf, client, member, memberIds, signedIn, becomes, connected, subscribed, next, within } from './helpers.mjs';

test('pusher-js connects and gets a socket id of the form digits.digits', async () => {
  const pusher = client();
  await connected(pusher);
  assert.match(pusher.connection.socket_id, /^\d+\.\d+$/);
});

test('a public channel receives what the REST SDK triggers on it', async () => {
  const pusher = client();
  const channel = await subscribed(pusher, 'orders');
  const got = next(channel, 'order-shipped');
  const response = await rest.trigger('orders', 'order-shipped', { order: 42, items: ['a', 'b'] });
  assert.equal(response.status, 200);
  assert.deepEqual(await got, { order: 42, items: ['a', 'b'] });
});

test('one trigger reaches several channels, each subscriber once', async () => {
  const a = await subscribed(client(), 'north');
  const b = await subscribed(client(), 'south');
  const gotA = next(a, 'weather');
  const gotB = next(b, 'weather');
  await rest.trigger(['north', 'south'], 'weather', 'rain');
  assert.equal(await gotA, 'rain');
  assert.equal(await gotB, 'rain');
});

test('a batch of events from the REST SDK arrives in order', async () => {
  const pusher = client();
  const [first, second] = await Promise.all([subscribed(pusher, 'batch-a'), subscribed(pusher, 'batch-b')]);
  const got = [];
  const all = new Promise((resolve) => {
    const take = (name) => (data) => {
      got.push([name, data]);
      if (got.length === 3) resolve();
    };
    first.bind('one', take('a/one'));
    first.bind('two', take('a/two'));
    second.bind('three', take('b/three'));
  });
  const response = await rest.triggerBatch([
    { channel: 'batch-a', name: 'one', data: { n: 1 } },
    { channel: 'batch-a', name: 'two', data: { n: 2 } },
    { channel: 'batch-b', name: 'three', data: { n: 3 } },
  ]);
  assert.equal(response.status, 200);
  await all;
  assert.deepEqual(got, [['a/one', { n: 1 }], ['a/two', { n: 2 }], ['b/three', { n: 3 }]]);
});

test('a trigger with a socket_id skips that connection', async () => {
  const sender = client();
  const other = client();
  const [mine, theirs] = await Promise.all([subscribed(sender, 'chat'), subscribed(other, 'chat')]);
  const skipped = within(mine, 'said', 500);
  const heard = next(theirs, 'said');
  await rest.trigger('chat', 'said', { text: 'hi' }, { socket_id: sender.connection.socket_id });
  assert.deepEqual(await heard, { text: 'hi' });
  assert.equal(await skipped, undefined, 'the excluded socket got nothing');
});

test('after unsubscribing, a channel sends nothing more', async () => {
  const pusher = client();
  const channel = await subscribed(pusher, 'leaving');
  pusher.unsubscribe('leaving');
  const late = within(channel, 'gone', 500);
  // The unsubscribe goes out before the trigger: both on the one socket, in order, and the
  // trigger waits for its HTTP answer, given after the fan-out.
  await new Promise((resolve) => setTimeout(resolve, 100));
  await rest.trigger('leaving', 'gone', {});
  assert.equal(await late, undefined);
});

test('a private channel authorized with the app secret subscribes, and client events reach the other members only', async () => {
  const alice = client();
  const bob = client();
  const [a, b] = await Promise.all([subscribed(alice, 'private-room'), subscribed(bob, 'private-room')]);
  const echoed = within(a, 'client-typing', 500);
  const heard = next(b, 'client-typing');
  assert.equal(a.trigger('client-typing', { who: 'alice' }), true);
  assert.deepEqual(await heard, { who: 'alice' });
  assert.equal(await echoed, undefined, 'the sender does not get its own client event');
});

test('a private channel with an auth signed by another secret is refused with status 401', async () => {
  const forger = restOf(port, 'not-the-secret');
  const pusher = client({
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, forger.authorizeChannel(socketId, channelName)),
    },
  });
  await assert.rejects(subscribed(pusher, 'private-vault'), (error) => {
    assert.equal(error.error.status, 401);
    assert.equal(error.error.type, 'AuthError');
    return true;
  });
});

test('an unknown app key gets pusher:error 4001 and pusher-js does not reconnect', async () => {
  const pusher = client({}, 'no-such-key');
  const errors = [];
  const states = [];
  pusher.connection.bind('error', (error) => errors.push(error));
  pusher.connection.bind('state_change', ({ current }) => states.push(current));
  await new Promise((resolve) => setTimeout(resolve, 1000));
  // pusher-js wraps the server's pusher:error in the connection's error event.
  const refusal = errors.map((error) => error?.error ?? error).find((error) => error?.data?.code);
  assert.ok(refusal, `a pusher:error among ${JSON.stringify(errors)}`);
  assert.equal(refusal.type, 'PusherError');
  assert.equal(refusal.data.code, 4001);
  // 4000-4099: pusher-js gives up rather than reconnecting (it was connecting before the
  // listener was bound; with a 4200 code it would have been connecting again at once).
  assert.deepEqual(states, ['disconnected']);
});

test('the REST SDK is refused with 401 when it signs with another secret', async () => {
  const forger = restOf(port, 'not-the-secret');
  await assert.rejects(forger.trigger('orders', 'x', {}), (error) => {
    assert.equal(error.status, 401);
    return true;
  });
});

test('a presence channel lists its members to a joiner, itself and each member\'s info included', async () => {
  const alice = await subscribed(member('alice', { name: 'Alice' }), 'presence-lobby');
  assert.equal(alice.members.count, 1);
  assert.equal(alice.members.me.id, 'alice');
  const bob = await subscribed(member('bob', { name: 'Bob' }), 'presence-lobby');
  assert.equal(bob.members.count, 2);
  assert.deepEqual(memberIds(bob), ['alice', 'bob']);
  assert.deepEqual(bob.members.get('alice').info, { name: 'Alice' });
  assert.equal(bob.members.me.id, 'bob');
});

test('member_added and member_removed reach the others once per user, not per connection', async () => {
  const watcher = await subscribed(member('watcher', {}), 'presence-tabs');
  const added = next(watcher, 'pusher:member_added');
  const firstTab = member('carol', { tab: 1 });
  await subscribed(firstTab, 'presence-tabs');
  assert.deepEqual(await added, { id: 'carol', info: { tab: 1 } });
  const addedAgain = within(watcher, 'pusher:member_added', 500);
  const secondTab = member('carol', { tab: 2 });
  const second = await subscribed(secondTab, 'presence-tabs');
  assert.equal(second.members.count, 2, 'carol once, with the watcher');
  assert.equal(await addedAgain, undefined, 'a second connection of carol is not a new member');
  const removedEarly = within(watcher, 'pusher:member_removed', 500);
  firstTab.disconnect();
  assert.equal(await removedEarly, undefined, 'carol is still there on her second tab');
  assert.equal(watcher.members.count, 2);
  const removed = next(watcher, 'pusher:member_removed');
  secondTab.unsubscribe('presence-tabs');
  assert.deepEqual(await removed, { id: 'carol', info: { tab: 1 } });
  assert.equal(watcher.members.count, 1);
});

test('a numeric user_id, as Laravel sends it, is a member id string', async () => {
  const watcher = await subscribed(member('watcher', {}), 'presence-numeric');
  const added = next(watcher, 'pusher:member_added');
  const channel = await subscribed(member(42, { name: 'Answer' }), 'presence-numeric');
  assert.deepEqual(memberIds(channel), ['42', 'watcher']);
  assert.deepEqual(channel.members.get(42).info, { name: 'Answer' });
  assert.deepEqual(await added, { id: '42', info: { name: 'Answer' } });
});

test('a client event on a presence channel reaches the others with the sender\'s user_id', async () => {
  const [dan, erin] = await Promise.all([
    subscribed(member('dan', {}), 'presence-typing'),
    subscribed(member('erin', {}), 'presence-typing'),
  ]);
  const heard = new Promise((resolve) => erin.bind('client-typing', (data, metadata) => resolve({ data, metadata })));
  const echoed = within(dan, 'client-typing', 500);
  assert.equal(dan.trigger('client-typing', { typing: true }), true);
  assert.deepEqual(await heard, { data: { typing: true }, metadata: { user_id: 'dan' } });
  assert.equal(await echoed, undefined);
});

test('a presence subscription whose channel_data is not the one signed is refused with status 401', async () => {
  const forger = client({
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        const signed = rest.authorizeChannel(socketId, channelName, { user_id: 'mallory' });
        callback(null, { auth: signed.auth, channel_data: JSON.stringify({ user_id: 'admin' }) });
      },
    },
  });
  await assert.rejects(subscribed(forger, 'presence-vault'), (error) => error.error.status === 401);
});

test('a presence channel takes 100 users and refuses the 101st with status 403; another connection of a member still joins', async () => {
  const members = [];
  for (let n = 0; n < 100; n += 1) members.push(subscribed(member(`user-${n}`, {}), 'presence-full'));
  const joined = await Promise.all(members);
  // They join concurrently, in any order: the last one in sees all 100.
  assert.equal(Math.max(...joined.map((subscription) => subscription.members.count)), 100);
  await assert.rejects(subscribed(member('user-100', {}), 'presence-full'), (error) => error.error.status === 403);
  const again = await subscribed(member('user-7', {}), 'presence-full');
  assert.equal(again.members.count, 100);
});

test('a cache channel tells a subscriber pusher:cache_miss until an event is sent, then gives each new subscriber the last one', async () => {
  const first = client();
  const channel = first.subscribe('cache-prices');
  const missed = next(channel, 'pusher:cache_miss');
  await next(channel, 'pusher:subscription_succeeded');
  await missed;
  const live = next(channel, 'price');
  await rest.trigger('cache-prices', 'price', { eur: 1 });
  assert.deepEqual(await live, { eur: 1 });
  await rest.trigger('cache-prices', 'price', { eur: 2 });
  const late = client().subscribe('cache-prices');
  const noMiss = within(late, 'pusher:cache_miss', 500);
  assert.deepEqual(await next(late, 'price'), { eur: 2 }, 'the last event, after subscription_succeeded');
  assert.equal(await noMiss, undefined);
});

test('a presence cache channel lists its members, then gives the last event', async () => {
  await rest.trigger('presence-cache-board', 'posted', { n: 7 });
  const pusher = member('reader', {});
  const channel = pusher.subscribe('presence-cache-board');
  const order = [];
  channel.bind('pusher:subscription_succeeded', (members) => order.push(['members', members.count]));
  const last = new Promise((resolve) => channel.bind('posted', (data) => { order.push(['posted', data.n]); resolve(); }));
  await last;
  assert.deepEqual(order, [['members', 1], ['posted', 7]]);
});

test('a signed-in user gets what sendToUser sends it, on each of its connections, and nobody else does', async () => {
  const [phone, laptop, other] = await Promise.all([
    signedIn({ id: 'user-1', name: 'One' }),
    signedIn({ id: 'user-1', name: 'One' }),
    signedIn({ id: 'user-2' }),
  ]);
  const got = (pusher) => new Promise((resolve) => pusher.user.bind('notice', resolve));
  const [onPhone, onLaptop] = [got(phone), got(laptop)];
  const elsewhere = new Promise((resolve) => {
    other.user.bind('notice', resolve);
    setTimeout(() => resolve(undefined), 500);
  });
  const response = await rest.sendToUser('user-1', 'notice', { text: 'for one' });
  assert.equal(response.status, 200);
  assert.deepEqual(await onPhone, { text: 'for one' });
  assert.deepEqual(await onLaptop, { text: 'for one' });
  assert.equal(await elsewhere, undefined);
});

test('a sign-in with an auth for another socket gets pusher:error 4009 and the connection is closed', async () => {
  const other = client();
  await connected(other);
  const pusher = client({
    userAuthentication: {
      customHandler: (_params, callback) =>
        callback(null, rest.authenticateUser(other.connection.socket_id, { id: 'intruder' })),
    },
  });
  await connected(pusher);
  const errors = [];
  pusher.connection.bind('error', (error) => errors.push(error?.error ?? error));
  const gone = becomes(pusher, 'disconnected');
  pusher.signin();
  await gone;
  assert.ok(errors.some((error) => error?.data?.code === 4009), JSON.stringify(errors));
});

test('terminateUserConnections closes every connection of that user, which does not reconnect, and no other', async () => {
  const [first, second, bystander] = await Promise.all([
    signedIn({ id: 'user-3' }),
    signedIn({ id: 'user-3' }),
    signedIn({ id: 'user-4' }),
  ]);
  const closed = [becomes(first, 'disconnected'), becomes(second, 'disconnected')];
  const response = await rest.terminateUserConnections('user-3');
  assert.equal(response.status, 200);
  await Promise.all(closed);
  await new Promise((resolve) => setTimeout(resolve, 500));
  assert.equal(first.connection.state, 'disconnected', 'no reconnection after 4009');
  assert.equal(bystander.connection.state, 'connected');
});

test('GET /channels lists the occupied channels of a prefix, with subscription_count when asked', async () => {
  const [a, b] = [client(), client()];
  await Promise.all([subscribed(a, 'listing-one'), subscribed(b, 'listing-one'), subscribed(a, 'listing-two')]);
  const response = await rest.get({ path: '/channels', params: { filter_by_prefix: 'listing-', info: 'subscription_count' } });
  assert.equal(response.status, 200);
  assert.deepEqual(await response.json(), {
    channels: { 'listing-one': { subscription_count: 2 }, 'listing-two': { subscription_count: 1 } },
  });
  const plain = await (await rest.get({ path: '/channels', params: { filter_by_prefix: 'listing-t' } })).json();
  assert.deepEqual(plain, { channels: { 'listing-two': {} } });
});

test('GET /channels/{name} says whether it is occupied, and a presence channel\'s user_count and users', async () => {
  const tabs = [member('ann', {}), member('ann', {}), member('bo', {})];
  for (const tab of tabs) await subscribed(tab, 'presence-counted');
  const info = await (await rest.get({ path: '/channels/presence-counted', params: { info: 'user_count,subscription_count' } })).json();
  assert.deepEqual(info, { occupied: true, subscription_count: 3, user_count: 2 });
  const users = await (await rest.get({ path: '/channels/presence-counted/users' })).json();
  assert.deepEqual(users, { users: [{ id: 'ann' }, { id: 'bo' }] });
  const empty = await (await rest.get({ path: '/channels/nobody-here' })).json();
  assert.deepEqual(empty, { occupied: false });
});

test('user_count of a channel that is not a presence channel, and users of one, are refused with 400', async () => {
  await assert.rejects(rest.get({ path: '/channels/public-one', params: { info: 'user_count' } }), (error) => error.status === 400);
  await assert.rejects(rest.get({ path: '/channels', params: { info: 'user_count' } }), (error) => error.status === 400);
  await assert.rejects(rest.get({ path: '/channels/public-one/users' }), (error) => error.status === 400);
});

test('a trigger asked for info answers with each channel\'s counts after the event went out', async () => {
  await subscribed(member('cy', {}), 'presence-info');
  await subscribed(client(), 'info-public');
  const response = await rest.trigger(['presence-info', 'info-public'], 'ping', {}, { info: 'user_count,subscription_count' });
  assert.deepEqual(await response.json(), {
    channels: {
      'presence-info': { user_count: 1, subscription_count: 1 },
      'info-public': { subscription_count: 1 },
    },
  });
});
