"""roomcast's Pusher endpoint driven from Python: the `pusher` REST SDK from PyPI (which also
signs GET requests with body_md5) and the Pysher client (protocol 6), both unmodified, versions
pinned in requirements.txt. tests/pusher.rs starts the server and runs this with ROOMCAST_HOST,
ROOMCAST_PORT, APP_ID, APP_KEY, APP_SECRET; one test per behaviour."""

import json
import os
import queue
import threading
import time
import unittest

import pusher
import pysher

HOST = os.environ["ROOMCAST_HOST"]
PORT = int(os.environ["ROOMCAST_PORT"])
APP_ID, KEY, SECRET = os.environ["APP_ID"], os.environ["APP_KEY"], os.environ["APP_SECRET"]
WAIT = 5


def rest(secret=SECRET):
    return pusher.Pusher(app_id=APP_ID, key=KEY, secret=secret, host=HOST, port=PORT, ssl=False)


class Client:
    """A Pysher connection; `subscribed` binds events to a queue once a channel is in."""

    def __init__(self, user_data=None):
        self.connected = threading.Event()
        self.events = queue.Queue()
        self.pysher = pysher.Pusher(KEY, secure=False, custom_host=HOST, port=PORT, secret=SECRET,
                                    user_data=user_data, log_level=40)
        self.pysher.connection.bind("pusher:connection_established", lambda _data: self.connected.set())
        self.pysher.connect()
        assert self.connected.wait(WAIT), "pysher connected"
        # Pysher takes its socket id in its own handler of the same event, maybe after ours.
        deadline = time.time() + WAIT
        while not self.socket_id() and time.time() < deadline:
            time.sleep(0.01)

    def socket_id(self):
        return self.pysher.connection.socket_id

    def subscribed(self, name, *events, count=1):
        """Subscribes, and waits until the server counts `count` subscriptions to `name` (Pysher
        sends the subscribe before it makes the channel object, so it may miss the
        subscription_succeeded: the server is asked instead)."""
        channel = self.pysher.subscribe(name)
        for event in events:
            channel.bind(event, lambda data, event=event: self.events.put((event, data)))
        deadline = time.time() + WAIT
        while time.time() < deadline:
            info = rest().channel_info(name, attributes=["subscription_count"])
            if info.get("subscription_count", 0) >= count:
                return channel
            time.sleep(0.02)
        raise AssertionError(f"{name} subscribed")

    def next(self):
        return self.events.get(timeout=WAIT)

    def close(self):
        # Its thread is a daemon: not waited for beyond a moment.
        self.pysher.disconnect(timeout=0.2)


class PythonSdk(unittest.TestCase):
    def setUp(self):
        self.clients = []

    def tearDown(self):
        for client in self.clients:
            client.close()

    def client(self, user_data=None):
        client = Client(user_data)
        self.clients.append(client)
        return client

    def test_pysher_on_protocol_6_receives_what_the_python_sdk_triggers(self):
        listener = self.client()
        listener.subscribed("py-news", "headline")
        rest().trigger("py-news", "headline", {"title": "from python"})
        event, data = listener.next()
        self.assertEqual(event, "headline")
        self.assertEqual(json.loads(data), {"title": "from python"})

    def test_a_trigger_with_a_socket_id_skips_that_pysher_connection(self):
        sender, other = self.client(), self.client()
        sender.subscribed("py-chat", "said")
        other.subscribed("py-chat", "said", count=2)
        rest().trigger("py-chat", "said", {"n": 1}, socket_id=sender.socket_id())
        self.assertEqual(other.next()[0], "said")
        with self.assertRaises(queue.Empty):
            sender.events.get(timeout=0.5)

    def test_pysher_subscribes_to_a_private_channel_it_signs_with_the_secret(self):
        listener = self.client()
        listener.subscribed("private-py", "secret-event")
        rest().trigger("private-py", "secret-event", "hush")
        self.assertEqual(listener.next(), ("secret-event", "hush"))

    def test_a_batch_from_the_python_sdk_arrives_in_order(self):
        listener = self.client()
        listener.subscribed("py-batch", "one", "two")
        rest().trigger_batch([
            {"channel": "py-batch", "name": "one", "data": "1"},
            {"channel": "py-batch", "name": "two", "data": "2"},
        ])
        self.assertEqual([listener.next()[0], listener.next()[0]], ["one", "two"])

    def test_the_python_sdk_queries_channels_signing_get_requests_with_body_md5(self):
        listener = self.client()
        listener.subscribed("py-listed")
        listed = rest().channels_info(prefix_filter="py-list", attributes=["subscription_count"])
        self.assertEqual(listed, {"channels": {"py-listed": {"subscription_count": 1}}})
        info = rest().channel_info("py-listed", attributes=["subscription_count"])
        self.assertEqual(info, {"occupied": True, "subscription_count": 1})

    def test_a_presence_channel_signed_by_the_python_sdk_lists_its_users(self):
        member = self.client(user_data={"user_id": "py-user", "user_info": {"name": "Py"}})
        member.subscribed("presence-py")
        self.assertEqual(rest().users_info("presence-py"), {"users": [{"id": "py-user"}]})
        info = rest().channel_info("presence-py", attributes=["user_count"])
        self.assertEqual(info, {"occupied": True, "user_count": 1})

    def test_the_python_sdks_presence_auth_is_accepted_with_its_channel_data(self):
        client = self.client()
        auth = rest().authenticate("presence-py-auth", client.socket_id(), {"user_id": "authed"})
        client.pysher.connection.send_event("pusher:subscribe", {
            "channel": "presence-py-auth",
            "auth": auth["auth"],
            "channel_data": auth["channel_data"],
        })
        deadline = time.time() + WAIT
        users = []
        while not users and time.time() < deadline:
            time.sleep(0.05)
            users = rest().users_info("presence-py-auth")["users"]
        self.assertEqual(users, [{"id": "authed"}])

    def test_a_request_signed_with_another_secret_is_refused(self):
        with self.assertRaises(pusher.errors.PusherBadAuth):
            rest(secret="not-the-secret").trigger("py-news", "x", {})
        with self.assertRaises(pusher.errors.PusherBadAuth):
            rest(secret="not-the-secret").channels_info()


if __name__ == "__main__":
    unittest.main(verbosity=2)
