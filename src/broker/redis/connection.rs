//! How the Redis broker talks to Redis, one server (`--redis`) or a Redis Cluster
//! (`--redis-cluster`), behind one small interface, so the broker's logic is written once.
//!
//! - **Commands** run in batches ([`Commands::run`]): on one server a batch is one pipeline, one
//!   round trip; on a cluster it is split by hash slot, each slot's commands one pipeline in
//!   their order, the slots' pipelines at once (a cluster cannot pipeline across slots). Order
//!   holds per slot, which is what the broker relies on: a room's channel and member set share
//!   one slot (the room name is their hash tag), so a room's membership scripts and messages
//!   keep their order, and one node's keys share the node id's slot.
//! - **Subscriptions**: on one server a pub/sub connection (`SUBSCRIBE`, `PUBLISH`); on a
//!   cluster, sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`) on a RESP3 cluster connection: a
//!   message travels only within the shard that owns its channel, instead of to every node of
//!   the cluster. A subscription is split into a sink (subscribe, unsubscribe) and a stream (the
//!   messages), so one task can do both at once.

use std::collections::HashMap;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc;

use super::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};

/// Where Redis is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// One server (`--redis URL`).
    Single(String),
    /// A cluster, by one or more of its masters (`--redis-cluster URL,...`).
    Cluster(Vec<String>),
}

/// A Redis client for an [`Endpoint`], opened once.
#[derive(Clone)]
pub(super) enum Client {
    Single(redis::Client),
    Cluster {
        nodes: Vec<String>,
        commands: ClusterClient,
    },
}

impl Client {
    /// Opens `endpoint` (its URLs were checked by the configuration).
    pub fn open(endpoint: &Endpoint) -> RedisResult<Client> {
        match endpoint {
            Endpoint::Single(url) => Ok(Client::Single(redis::Client::open(url.as_str())?)),
            Endpoint::Cluster(nodes) => Ok(Client::Cluster {
                nodes: nodes.clone(),
                commands: cluster_builder(nodes).build()?,
            }),
        }
    }

    /// Whether channels are a cluster's shard channels.
    pub fn sharded(&self) -> bool {
        matches!(self, Client::Cluster { .. })
    }

    /// A connection for commands, with the broker's timeouts, reconnecting by itself after a
    /// failure (the next command finds out and reconnects).
    pub async fn commands(&self) -> RedisResult<Commands> {
        match self {
            Client::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(RESPONSE_TIMEOUT);
                let manager = client.get_connection_manager_with_config(config).await;
                Ok(Commands::Single(manager?))
            }
            Client::Cluster { commands, .. } => {
                let connection = commands.get_async_connection().await?;
                Ok(Commands::Cluster(connection))
            }
        }
    }

    /// A new subscription connection.
    pub async fn subscription(&self) -> RedisResult<(SubscriptionSink, SubscriptionStream)> {
        match self {
            Client::Single(client) => {
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok((
                    SubscriptionSink::Single(sink),
                    SubscriptionStream::Single(stream),
                ))
            }
            Client::Cluster { nodes, .. } => {
                // A client of its own per session: pushes go to this session's channel.
                let (pushes, received) = mpsc::unbounded_channel();
                let client = cluster_builder(nodes)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .build()?;
                let connection = client.get_async_connection().await?;
                Ok((
                    SubscriptionSink::Cluster(connection),
                    SubscriptionStream::Cluster(received),
                ))
            }
        }
    }
}

fn cluster_builder(nodes: &[String]) -> redis::cluster::ClusterClientBuilder {
    ClusterClient::builder(nodes.to_vec())
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .retries(2)
}

/// A connection for commands.
#[derive(Clone)]
pub(super) enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Commands {
    /// Runs `batch` in order (per hash slot on a cluster) and returns each command's answer,
    /// a command that Redis refused answered by its `Value::ServerError`; an error only when
    /// the connection failed. One command's error (a script's, say) must not take the other
    /// commands' answers with it: they ran, and whoever waits on them gets them.
    pub async fn run(&mut self, batch: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Commands::Single(connection) => {
                let mut pipe = redis::pipe();
                for command in batch {
                    pipe.add_command(command);
                }
                // Not `query_async`: it turns one command's error into the whole pipeline's.
                connection.send_packed_commands(&pipe, 0, pipe.len()).await
            }
            Commands::Cluster(connection) => {
                // The commands of each slot, in order, with where their answers go.
                let mut by_slot: HashMap<u16, (redis::Pipeline, Vec<usize>)> = HashMap::new();
                let count = batch.len();
                for (at, command) in batch.into_iter().enumerate() {
                    let (pipe, places) = by_slot.entry(slot_of(&command)).or_default();
                    pipe.add_command(command);
                    places.push(at);
                }
                let runs = by_slot.into_values().map(|(pipe, places)| {
                    let mut connection = connection.clone();
                    async move {
                        let answers = pipe.query_async::<Vec<Value>>(&mut connection).await;
                        (places, answers)
                    }
                });
                let mut answers = vec![Value::Nil; count];
                for (places, run) in futures_util::future::join_all(runs).await {
                    match run {
                        Ok(values) => {
                            for (at, value) in places.into_iter().zip(values) {
                                answers[at] = value;
                            }
                        }
                        // The cluster client reports a slot's pipeline as a whole (it must see
                        // every answer to follow a redirect): a refused command costs the
                        // answers of its slot's commands, not the other slots'.
                        Err(error) if is_refusal(&error) => {
                            for at in places {
                                answers[at] = refused(&error);
                            }
                        }
                        Err(error) => return Err(error),
                    }
                }
                Ok(answers)
            }
        }
    }

    /// Runs one command.
    pub async fn query<T: redis::FromRedisValue>(&mut self, command: Cmd) -> RedisResult<T> {
        let answer = self.run(vec![command]).await?;
        redis::from_redis_value(answer.first().unwrap_or(&Value::Nil))
    }
}

/// Whether Redis answered `error` to a command (rather than the connection failing).
fn is_refusal(error: &redis::RedisError) -> bool {
    !(error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_cluster_error())
}

/// A refused command's answer, as the single-server pipeline gives it (a `Value::ServerError`,
/// which redis-rs builds only by parsing a reply).
fn refused(error: &redis::RedisError) -> Value {
    let detail = error
        .detail()
        .unwrap_or_default()
        .replace(['\r', '\n'], " ");
    let reply = format!("-{} {detail}\r\n", error.code().unwrap_or("ERR"));
    redis::parse_redis_value(reply.as_bytes()).unwrap_or(Value::Nil)
}

/// The cluster hash slot of a command's key: the first argument after the name, or for `EVAL`
/// the first key after the key count; of its hash tag (`{...}`) when it has one.
fn slot_of(command: &Cmd) -> u16 {
    let args: Vec<&[u8]> = command
        .args_iter()
        .filter_map(|arg| match arg {
            redis::Arg::Simple(bytes) => Some(bytes),
            redis::Arg::Cursor => None,
        })
        .collect();
    let key_at = match args.first() {
        Some(name) if name.eq_ignore_ascii_case(b"EVAL") => 3,
        _ => 1,
    };
    key_slot(args.get(key_at).copied().unwrap_or_default())
}

/// Redis Cluster's slot of `key`: CRC16 (XMODEM) of its hash tag, or of all of it, mod 16384.
pub(super) fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % 16384
}

/// Where subscription changes are sent.
pub(super) enum SubscriptionSink {
    Single(PubSubSink),
    Cluster(ClusterConnection),
}

impl SubscriptionSink {
    /// Subscribes to `channels` (on a cluster, one shard channel per command, at once).
    pub async fn subscribe(&mut self, channels: &[&str]) -> RedisResult<()> {
        match self {
            SubscriptionSink::Single(sink) => sink.subscribe(channels).await,
            SubscriptionSink::Cluster(connection) => {
                let each = channels.iter().map(|channel| {
                    let mut connection = connection.clone();
                    async move { connection.ssubscribe(*channel).await }
                });
                futures_util::future::join_all(each)
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }

    pub async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            SubscriptionSink::Single(sink) => sink.unsubscribe(channel).await,
            SubscriptionSink::Cluster(connection) => connection.sunsubscribe(channel).await,
        }
    }
}

/// The messages of a subscription.
pub(super) enum SubscriptionStream {
    Single(PubSubStream),
    Cluster(mpsc::UnboundedReceiver<PushInfo>),
}

/// One message received: its channel and payload.
pub(super) enum Received {
    Single(redis::Msg),
    Cluster { channel: Vec<u8>, payload: Vec<u8> },
}

impl Received {
    pub fn channel(&self) -> &str {
        match self {
            Received::Single(message) => message.get_channel_name(),
            Received::Cluster { channel, .. } => std::str::from_utf8(channel).unwrap_or(""),
        }
    }

    pub fn payload(&self) -> &[u8] {
        match self {
            Received::Single(message) => message.get_payload_bytes(),
            Received::Cluster { payload, .. } => payload,
        }
    }
}

impl SubscriptionStream {
    /// The next message; `None` when the connection is gone.
    pub async fn next(&mut self) -> Option<Received> {
        match self {
            SubscriptionStream::Single(stream) => stream.next().await.map(Received::Single),
            SubscriptionStream::Cluster(pushes) => loop {
                let push = pushes.recv().await?;
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        let mut data = push.data.into_iter();
                        if let (
                            Some(Value::BulkString(channel)),
                            Some(Value::BulkString(payload)),
                        ) = (data.next(), data.next())
                        {
                            return Some(Received::Cluster { channel, payload });
                        }
                    }
                    // A connection to a shard closed: the session starts over (subscribes
                    // again, registers the members again), as on one server.
                    PushKind::Disconnection => return None,
                    _ => {}
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway `redis-server` on a free port; `None` where none is installed (CI has one).
    struct Scratch(std::process::Child, u16);

    impl Scratch {
        async fn start() -> Option<Scratch> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .ok()?
                .local_addr()
                .ok()?
                .port();
            let child = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .ok()?;
            let scratch = Scratch(child, port);
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Some(scratch);
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            None
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[tokio::test]
    async fn a_command_redis_refuses_costs_only_its_own_answer_in_a_batch() {
        let Some(redis) = Scratch::start().await else {
            return;
        };
        let client = Client::open(&Endpoint::Single(format!("redis://127.0.0.1:{}", redis.1)))
            .expect("a valid url");
        let mut commands = client.commands().await.expect("connected");
        let mut set = redis::cmd("SET");
        set.arg("k").arg("v");
        let mut failing = redis::cmd("EVAL");
        failing
            .arg("return redis.call('XADD', KEYS[1], '*', 'f', 'v')")
            .arg(1)
            .arg("k");
        let mut get = redis::cmd("GET");
        get.arg("k");
        let answers = commands
            .run(vec![set, failing, get])
            .await
            .expect("the connection works");
        assert_eq!(answers.len(), 3);
        assert!(matches!(answers[0], Value::Okay), "{:?}", answers[0]);
        assert!(
            matches!(&answers[1], Value::ServerError(e) if e.code() == "WRONGTYPE"),
            "{:?}",
            answers[1]
        );
        assert_eq!(answers[2], Value::BulkString(b"v".to_vec()));
    }

    #[test]
    fn a_refusal_becomes_the_server_error_value_a_single_server_answers() {
        // As the cluster client reports it: the reply turned into an error.
        let reply = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
        let error = redis::parse_redis_value(reply)
            .expect("a reply")
            .extract_error()
            .expect_err("an error reply");
        assert!(is_refusal(&error));
        let Value::ServerError(refusal) = refused(&error) else {
            panic!("not a server error");
        };
        assert_eq!(refusal.code(), "WRONGTYPE");
        assert!(refusal
            .details()
            .unwrap()
            .contains("holding the wrong kind"));
    }
}
