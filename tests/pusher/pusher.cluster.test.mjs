// Two roomcast nodes on one Redis (`--redis`), each with the same app: a Pusher channel spans
// them as a room does. pusher-js clients on either node, the REST SDK calling either; one test
// per behaviour. tests/pusher.rs starts Redis and the nodes (ROOMCAST_PORT, ROOMCAST_PORT_B).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { port, restOf, client, member, memberIds, signedIn, becomes, connected, subscribed, next, within } from './helpers.mjs';

const portB = Number(process.env.ROOMCAST_PORT_B);
const restA = restOf(port);
const restB = restOf(portB);
const onA = () => client({ wsPort: port });
const onB = () => client({ wsPort: portB });
const memberOnA = (id, info = {}) => member(id, info, { wsPort: port });
const memberOnB = (id, info = {}) => member(id, info, { wsPort: portB });

test('an event triggered on one node reaches the subscribers on both', async () => {
  const [a, b] = await Promise.all([subscribed(onA(), 'cluster-news'), subscribed(onB(), 'cluster-news')]);
  const gotA = next(a, 'headline');
  const gotB = next(b, 'headline');
  const response = await restA.trigger('cluster-news', 'headline', { title: 'both nodes' });
  assert.equal(response.status, 200);
  assert.deepEqual(await gotA, { title: 'both nodes' });
  assert.deepEqual(await gotB, { title: 'both nodes' });
});

test('a trigger on one node with the socket_id of a connection on the other skips that connection only', async () => {
  const sender = onB();
  const [mine, neighbour, far] = await Promise.all([
    subscribed(sender, 'cluster-chat'),
    subscribed(onB(), 'cluster-chat'),
    subscribed(onA(), 'cluster-chat'),
  ]);
  await connected(sender);
  const skipped = within(mine, 'said', 700);
  const heardNear = next(neighbour, 'said');
  const heardFar = next(far, 'said');
  await restA.trigger('cluster-chat', 'said', { text: 'hi' }, { socket_id: sender.connection.socket_id });
  assert.deepEqual(await heardNear, { text: 'hi' });
  assert.deepEqual(await heardFar, { text: 'hi' });
  assert.equal(await skipped, undefined, 'the excluded socket, on the other node, got nothing');
});

test('a client event on a private channel reaches its members on the other node, not the sender', async () => {
  const [a, b] = await Promise.all([subscribed(onA(), 'private-cluster'), subscribed(onB(), 'private-cluster')]);
  const echoed = within(a, 'client-typing', 700);
  const heard = next(b, 'client-typing');
  assert.equal(a.trigger('client-typing', { who: 'a' }), true);
  assert.deepEqual(await heard, { who: 'a' });
  assert.equal(await echoed, undefined);
});

test('a batch triggered on one node arrives in order on the other', async () => {
  const channel = await subscribed(onB(), 'cluster-batch');
  const got = [];
  const all = new Promise((resolve) => {
    for (const name of ['one', 'two', 'three']) {
      channel.bind(name, (data) => {
        got.push(data.n);
        if (got.length === 3) resolve();
      });
    }
  });
  await restA.triggerBatch([
    { channel: 'cluster-batch', name: 'one', data: { n: 1 } },
    { channel: 'cluster-batch', name: 'two', data: { n: 2 } },
    { channel: 'cluster-batch', name: 'three', data: { n: 3 } },
  ]);
  await all;
  assert.deepEqual(got, [1, 2, 3]);
});

test('after the last subscriber on a node leaves, the other node still delivers to its own', async () => {
  const leaver = onA();
  const [gone, stays] = await Promise.all([subscribed(leaver, 'cluster-leave'), subscribed(onB(), 'cluster-leave')]);
  leaver.unsubscribe('cluster-leave');
  await new Promise((resolve) => setTimeout(resolve, 100));
  const late = within(gone, 'after', 700);
  const heard = next(stays, 'after');
  await restB.trigger('cluster-leave', 'after', { n: 1 });
  assert.deepEqual(await heard, { n: 1 });
  assert.equal(await late, undefined);
});

test('a presence joiner on one node is listed the members of both, and they hear it once', async () => {
  const a = await subscribed(memberOnA('ana', { node: 'a' }), 'presence-cluster');
  const benSeen = next(a, 'pusher:member_added');
  const b = await subscribed(memberOnB('ben', { node: 'b' }), 'presence-cluster');
  assert.deepEqual(await benSeen, { id: 'ben', info: { node: 'b' } });
  assert.deepEqual(memberIds(b), ['ana', 'ben']);
  const heardA = next(a, 'pusher:member_added');
  const heardB = next(b, 'pusher:member_added');
  const joiner = await subscribed(memberOnB('cat', { node: 'b' }), 'presence-cluster');
  assert.deepEqual(memberIds(joiner), ['ana', 'ben', 'cat']);
  assert.deepEqual(joiner.members.get('ana').info, { node: 'a' });
  assert.deepEqual(await heardA, { id: 'cat', info: { node: 'b' } });
  assert.deepEqual(await heardB, { id: 'cat', info: { node: 'b' } });
  assert.deepEqual(memberIds(a), ['ana', 'ben', 'cat']);
  assert.deepEqual(memberIds(b), ['ana', 'ben', 'cat']);
});

test('a user connected on both nodes is added once and removed only when its last connection, on either node, leaves', async () => {
  const watcher = await subscribed(memberOnA('watcher'), 'presence-two-tabs');
  const added = [];
  const removed = [];
  watcher.bind('pusher:member_added', (m) => added.push(m.id));
  watcher.bind('pusher:member_removed', (m) => removed.push(m.id));
  const tabA = memberOnA('dee');
  const tabB = memberOnB('dee');
  await subscribed(tabA, 'presence-two-tabs');
  const second = await subscribed(tabB, 'presence-two-tabs');
  assert.deepEqual(memberIds(second), ['dee', 'watcher']);
  tabA.disconnect();
  await new Promise((resolve) => setTimeout(resolve, 500));
  assert.deepEqual(removed, [], 'dee is still there on node B');
  const gone = next(watcher, 'pusher:member_removed');
  tabB.disconnect();
  await gone;
  assert.deepEqual(added, ['dee']);
  assert.deepEqual(removed, ['dee']);
  assert.deepEqual(memberIds(watcher), ['watcher']);
});

test('members joining and leaving on both nodes at once leave every member with the same exact list', async () => {
  const name = 'presence-churn';
  const watchers = await Promise.all([subscribed(memberOnA('wa'), name), subscribed(memberOnB('wb'), name)]);
  const churners = [];
  for (let n = 0; n < 10; n += 1) churners.push(n % 2 ? memberOnA(`u${n}`) : memberOnB(`u${n}`));
  await Promise.all(churners.map((c) => subscribed(c, name)));
  // Half of them leave while a late joiner on each node arrives.
  const leaving = churners.filter((_, n) => n < 5);
  leaving.forEach((c) => c.unsubscribe(name));
  const [lateA, lateB] = await Promise.all([subscribed(memberOnA('late-a'), name), subscribed(memberOnB('late-b'), name)]);
  const expected = ['late-a', 'late-b', 'u5', 'u6', 'u7', 'u8', 'u9', 'wa', 'wb'];
  const settled = async (channel) => {
    for (let tries = 0; tries < 40 && memberIds(channel).join() !== expected.join(); tries += 1) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return memberIds(channel);
  };
  for (const channel of [...watchers, lateA, lateB]) {
    assert.deepEqual(await settled(channel), expected);
    assert.equal(channel.members.count, expected.length);
  }
});

test('a client event on a presence channel reaches the other node with the sender\'s user_id', async () => {
  const [a, b] = await Promise.all([subscribed(memberOnA('eve'), 'presence-cluster-typing'), subscribed(memberOnB('fay'), 'presence-cluster-typing')]);
  const heard = new Promise((resolve) => b.bind('client-typing', (data, metadata) => resolve({ data, metadata })));
  assert.equal(a.trigger('client-typing', { typing: true }), true);
  assert.deepEqual(await heard, { data: { typing: true }, metadata: { user_id: 'eve' } });
});

test('a cache channel\'s last event, triggered on one node, is given to a new subscriber on the other', async () => {
  await restA.trigger('cache-cluster-score', 'score', { home: 1 });
  await restA.trigger('cache-cluster-score', 'score', { home: 2 });
  const late = onB().subscribe('cache-cluster-score');
  assert.deepEqual(await next(late, 'score'), { home: 2 });
});

test('sendToUser on one node reaches the user\'s connection on the other, and terminateUserConnections there closes it', async () => {
  const onOther = await signedIn({ id: 'roaming' }, { wsPort: portB });
  const notice = new Promise((resolve) => onOther.user.bind('notice', resolve));
  await restA.sendToUser('roaming', 'notice', { n: 1 });
  assert.deepEqual(await notice, { n: 1 });
  const closed = becomes(onOther, 'disconnected');
  const response = await restA.terminateUserConnections('roaming');
  assert.equal(response.status, 200);
  await closed;
});

test('channel counts and presence users are summed over both nodes, on whichever node they are asked', async () => {
  await Promise.all([
    subscribed(memberOnA('gil'), 'presence-counted-cluster'),
    subscribed(memberOnB('gil'), 'presence-counted-cluster'),
    subscribed(memberOnB('hal'), 'presence-counted-cluster'),
  ]);
  for (const rest of [restA, restB]) {
    const info = await (await rest.get({ path: '/channels/presence-counted-cluster', params: { info: 'user_count,subscription_count' } })).json();
    assert.deepEqual(info, { occupied: true, subscription_count: 3, user_count: 2 });
    const listed = await (await rest.get({ path: '/channels', params: { filter_by_prefix: 'presence-counted-c', info: 'user_count' } })).json();
    assert.deepEqual(listed, { channels: { 'presence-counted-cluster': { user_count: 2 } } });
    const users = await (await rest.get({ path: '/channels/presence-counted-cluster/users' })).json();
    assert.deepEqual(users, { users: [{ id: 'gil' }, { id: 'hal' }] });
  }
});
