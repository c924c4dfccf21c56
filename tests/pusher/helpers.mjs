// What both suites share: pusher-js clients of a node, the REST SDK, and waiting for events.
// The Rust harness (tests/pusher.rs) gives ROOMCAST_HOST, ROOMCAST_PORT (and ROOMCAST_PORT_B
// for a second node), APP_ID, APP_KEY, APP_SECRET.
import { after } from 'node:test';
import Pusher from 'pusher-js';
import PusherServer from 'pusher';

export const host = process.env.ROOMCAST_HOST;
export const port = Number(process.env.ROOMCAST_PORT);
export const appId = process.env.APP_ID;
export const key = process.env.APP_KEY;
export const secret = process.env.APP_SECRET;

/** The REST SDK, as Laravel's broadcaster calls it, against the node on `nodePort`. */
export function restOf(nodePort = port, appSecret = secret) {
  return new PusherServer({ appId, key, secret: appSecret, host, port: String(nodePort), useTLS: false });
}

export const rest = restOf();

const clients = [];
after(() => clients.forEach((client) => client.disconnect()));

/**
 * A pusher-js client of the node on `options.wsPort` (default: the first); `authorize` signs
 * private channels the way an app's /broadcasting/auth would.
 */
/** How a pusher-js client (or Echo on it) reaches the first node: plain ws, no stats. */
export const connection = {
  wsHost: host,
  wsPort: port,
  forceTLS: false,
  enabledTransports: ['ws'],
  disableStats: true,
  cluster: 'mt1',
};

export function client(options = {}, appKey = key) {
  const pusher = new Pusher(appKey, {
    ...connection,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, rest.authorizeChannel(socketId, channelName)),
    },
    ...options,
  });
  clients.push(pusher);
  return pusher;
}

export function connected(pusher) {
  return new Promise((resolve, reject) => {
    if (pusher.connection.state === 'connected') return resolve();
    pusher.connection.bind('connected', resolve);
    pusher.connection.bind('failed', () => reject(new Error('connection failed')));
  });
}

export function subscribed(pusher, name) {
  const channel = pusher.subscribe(name);
  return new Promise((resolve, reject) => {
    channel.bind('pusher:subscription_succeeded', () => resolve(channel));
    channel.bind('pusher:subscription_error', (error) => reject(Object.assign(new Error('subscription error'), { error })));
  });
}

export function next(channel, event, ms = 3000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    channel.bind(event, (data) => {
      clearTimeout(timer);
      resolve(data);
    });
  });
}

/** Resolves with whatever `event` brings within `ms`, or with `undefined`. */
export function within(channel, event, ms) {
  return next(channel, event, ms).catch(() => undefined);
}

/**
 * A pusher-js client that joins presence channels as user `userId` with `userInfo`, signed
 * the way Laravel's /broadcasting/auth signs them (the SDK's authorizeChannel with
 * presence data).
 */
export function member(userId, userInfo, options = {}) {
  return client({
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, rest.authorizeChannel(socketId, channelName, { user_id: userId, user_info: userInfo })),
    },
    ...options,
  });
}

/** The ids of a presence channel's members, sorted. */
export function memberIds(channel) {
  const ids = [];
  channel.members.each((m) => ids.push(m.id));
  return ids.sort();
}

/**
 * A pusher-js client that signs in (`pusher.signin()`) as `user`, authenticated the way an
 * app's /broadcasting/user-auth would (the SDK's authenticateUser); resolves once its
 * `#server-to-user-` channel is subscribed, so `sendToUser` reaches it.
 */
export async function signedIn(user, options = {}) {
  const pusher = client({
    userAuthentication: {
      customHandler: ({ socketId }, callback) => callback(null, rest.authenticateUser(socketId, user)),
    },
    ...options,
  });
  pusher.signin();
  await pusher.user.signinDonePromise;
  for (let tries = 0; !pusher.user.serverToUserChannel?.subscribed; tries += 1) {
    if (tries > 100) throw new Error('#server-to-user- channel not subscribed');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return pusher;
}

/** Resolves with the connection's next state change to `state`, or rejects after `ms`. */
export function becomes(pusher, state, ms = 3000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`not ${state} within ${ms} ms`)), ms);
    pusher.connection.bind('state_change', ({ current }) => {
      if (current === state) {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}
