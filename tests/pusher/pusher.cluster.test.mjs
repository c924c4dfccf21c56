// Two roomcast nodes on one Redis (`--redis`), each with the same app: a Pusher channel spans
// them as a room does. pusher-js clients on either node, the REST SDK calling either; one test
// per behaviour. tests/pusher.rs starts Redis and the nodes (ROOMCAST_PORT, ROOMCAST_PORT_B).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { port, restOf, client, connected, subscribed, next, within } from './helpers.mjs';

const portB = Number(process.env.ROOMCAST_PORT_B);
const restA = restOf(port);
const restB = restOf(portB);
const onA = () => client({ wsPort: port });
const onB = () => client({ wsPort: portB });

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
