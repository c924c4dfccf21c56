//! The command line: one subcommand per scenario, options common to all of them, and the
//! defaults every option documents. Parsing only: no I/O happens here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::source_ip::SourceIps;

/// Load generator for roomcast and any server speaking its WebSocket rooms protocol.
///
/// Every scenario stops by itself (bounded by --duration and its counts), then prints a summary
/// (or one JSON object with --json). Run it against servers you own: it is built to saturate
/// them.
#[derive(Parser, Debug)]
#[command(name = "roomcast-loadtest", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options every scenario takes (before or after the subcommand).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Common options (any scenario)")]
pub struct CommonArgs {
    /// Server URL, ws:// or wss://. Repeat for a cluster: clients are spread over the URLs
    /// round-robin (give all of them on the same side of the subcommand).
    #[arg(long = "url", global = true, default_value = "ws://127.0.0.1:8080/")]
    pub urls: Vec<String>,

    /// Wire protocol. `native`: roomcast's rooms protocol at --url. `pusher`: the Pusher
    /// Channels protocol 7 at `/app/KEY?protocol=7` on --url's host and port (its path is not
    /// used), private channels signed with --pusher-app's secret, messages as client events
    /// (fanout and connections only).
    #[arg(long, global = true, value_enum, default_value_t = Protocol::Native)]
    pub protocol: Protocol,

    /// With --protocol pusher: the app as roomcast's `--pusher-app` gives it. The key goes in
    /// the path; the secret signs each private-channel subscription. [default: none]
    #[arg(long, global = true, value_name = "ID:KEY:SECRET")]
    pub pusher_app: Option<crate::pusher::App>,

    /// Token sent as the `token` query parameter of every upgrade request. [default: none]
    #[arg(long, global = true)]
    pub token: Option<String>,

    /// `Origin` header sent with every upgrade request. [default: none]
    #[arg(long, global = true)]
    pub origin: Option<String>,

    /// Accept any TLS certificate (self-signed staging servers). Signatures are still checked.
    /// [default: off]
    #[arg(long, global = true, default_value_t = false)]
    pub insecure: bool,

    /// PEM file of extra CA certificates trusted for wss://, besides Mozilla's roots.
    /// [default: none]
    #[arg(long, global = true, value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,

    /// Local source addresses, handed out round-robin, one per connection: `127.0.0.1-127.0.0.20`,
    /// `127.0.0.1-20`, or a comma list. Lifts the ~28k ephemeral ports per source address.
    /// [default: the kernel picks]
    #[arg(long, global = true, value_name = "LIST")]
    pub source_ips: Option<SourceIps>,

    /// Worker threads of the generator's runtime. [default: all cores]
    #[arg(long, global = true)]
    pub threads: Option<usize>,

    /// PID of the server (same machine): samples its CPU time and RSS around the measured
    /// phase and reports CPU per delivery / RSS per connection. Repeat for a cluster on this
    /// machine: CPU and RSS are summed over the processes. [default: none]
    #[arg(long, global = true)]
    pub server_pid: Vec<u32>,

    /// Limit for TCP connect + TLS + upgrade + welcome of one connection.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Limit for any single reply or write (room_joined, a blocked send, the close handshake).
    /// reconnect-storm: also the whole storm, from the SIGTERM to the last client back.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Offer permessage-deflate (RFC 7692) as browsers do
    /// (`permessage-deflate; client_max_window_bits`), inflate every message the server sends
    /// compressed, and fail each connection whose server declines (it is not measured plain).
    /// Clients still send uncompressed, which RFC 7692 allows. [default: off]
    #[arg(long, global = true, default_value_t = false)]
    pub compression: bool,

    /// Print one JSON report object on stdout instead of the text summary (no progress bar).
    /// [default: off]
    #[arg(long, global = true, default_value_t = false)]
    pub json: bool,

    /// Hide the progress bar (it is also hidden when stderr is not a terminal). [default: off]
    #[arg(long, global = true, default_value_t = false)]
    pub no_progress: bool,
}

/// The protocol the clients speak (`--protocol`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// roomcast's rooms protocol (shared/PROTOCOL.md).
    Native,
    /// Pusher Channels, protocol version 7 (roomcast with --pusher-app).
    Pusher,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Native => "native",
            Protocol::Pusher => "pusher",
        }
    }
}

/// What a fan-out message carries after its stamp (`--payload`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// `x` padding up to --size.
    Stamp,
    /// A ~1 KB JSON order-shipped event (see `message::realistic_body`).
    Realistic,
}

impl PayloadKind {
    pub fn name(self) -> &'static str {
        match self {
            PayloadKind::Stamp => "stamp",
            PayloadKind::Realistic => "realistic",
        }
    }
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Fan-out latency and throughput: subscribers in rooms, publishers sending stamped
    /// room_message at a fixed rate; reports deliveries/s, loss and latency percentiles.
    Fanout(FanoutArgs),
    /// Idle connections: open N at a ramp rate, hold them; reports connect rate, failures by
    /// cause and (with --server-pid) server RSS per connection.
    Connections(ConnectionsArgs),
    /// Connection churn: workers looping connect, welcome, join_room, room_message, leave_room,
    /// close; reports handshakes/s and errors by cause.
    Churn(ChurnArgs),
    /// A reconnect storm: N clients in rooms on server A, SIGTERM to A (which closes them all
    /// with 1001 Going Away), every client reconnecting to --reconnect-url and re-joining its
    /// room at once; reports the time until the first, half, 99% and all are back, failures by
    /// cause and (with --server-pid) the reconnect target's CPU per reconnect.
    ReconnectStorm(ReconnectStormArgs),
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Fan-out options")]
pub struct FanoutArgs {
    /// Subscriber connections, spread round-robin over the rooms.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,

    /// Rooms.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,

    /// Publisher connections, spread round-robin over the rooms (each also receives the other
    /// publishers' messages in its room).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,

    /// Messages per second per publisher. 0 = as fast as possible (saturation), limited by
    /// --window.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,

    /// Length of the publish phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Stop each publisher after this many messages. 0 = only --duration limits.
    #[arg(long, default_value_t = 0)]
    pub messages: u64,

    /// Every client joins with `"since":{}` (opted in to offsets; native protocol only): against a server keeping
    /// history, they receive the offset-carrying variant of each room message.
    #[arg(long)]
    pub since: bool,

    /// Bytes of each message's `message` string (the stamp, padded); never less than the stamp
    /// (~30 bytes).
    #[arg(long, default_value_t = 64)]
    pub size: usize,

    /// What each message's `message` string carries after the stamp. `stamp`: `x` padding up
    /// to --size. `realistic`: a deterministic JSON broadcast event of about 1 KB (an order
    /// notification, as a Laravel app broadcasts it; its ids follow the sequence number), sent as
    /// the string's text, so it is escaped JSON on the wire as Pusher's `data` is; --size is
    /// not used.
    #[arg(long, value_enum, default_value_t = PayloadKind::Stamp)]
    pub payload: PayloadKind,

    /// With --rate 0: most messages a publisher may have in flight, counted as undelivered
    /// deliveries divided by its room's receivers.
    #[arg(long, default_value_t = 128)]
    pub window: u64,

    /// After publishing stops, how long to wait for in-flight deliveries before counting loss.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub grace: Duration,

    /// Connections opened per second during setup. 0 = as fast as --concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,

    /// Connection attempts in flight at once during setup.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,

    /// Room names are `<prefix>-<run id>-<n>` (Pusher channels: `private-<prefix>-<run id>-<n>`),
    /// so runs never share rooms.
    #[arg(long, default_value = "loadtest")]
    pub room_prefix: String,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Connections options")]
pub struct ConnectionsArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,

    /// Connection attempts started per second. 0 = as fast as --concurrency allows.
    #[arg(long, default_value_t = 500.0)]
    pub ramp: f64,

    /// How long to hold the connections open once the ramp is done.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    /// Longest the ramp may take; attempts not started by then are skipped.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Churn options")]
pub struct ChurnArgs {
    /// Concurrent workers, each looping over whole connection lifecycles.
    #[arg(long, default_value_t = 50)]
    pub workers: usize,

    /// How long the workers loop.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Stop after this many cycles in total. 0 = only --duration limits.
    #[arg(long, default_value_t = 0)]
    pub cycles: u64,

    /// Bytes of the room_message each cycle sends.
    #[arg(long, default_value_t = 64)]
    pub size: usize,

    /// Pause of a worker after a failed cycle, so a refusing server is not hammered in a
    /// tight loop.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub backoff: Duration,

    /// Room names are `<prefix>-<run id>-<worker>`.
    #[arg(long, default_value = "loadtest")]
    pub room_prefix: String,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Reconnect storm options")]
pub struct ReconnectStormArgs {
    /// Clients: each opens one connection to the (one) --url, server A, joins its room, and
    /// after the drain reconnects to --reconnect-url. Never more than one socket per client at a
    /// time: the old connection is closed before the new one is opened.
    #[arg(long, default_value_t = 19_000)]
    pub clients: usize,

    /// Rooms; client `i` is in room `i % rooms`, on A and again after it reconnects.
    #[arg(long, default_value_t = 1000)]
    pub rooms: usize,

    /// PID of server A (same machine). Once every client is in its room, the generator sends it
    /// SIGTERM: that instant is t0. roomcast then closes every connection with 1001 and stops
    /// accepting. Clients not back in their rooms by t0 + --timeout are counted as not back.
    #[arg(long, value_name = "PID")]
    pub drain_pid: u32,

    /// Where the clients reconnect, server B (a load balancer's address in a real deploy).
    /// Give B's PID as --server-pid to measure its CPU per reconnect. [default: the --url]
    #[arg(long, value_name = "URL")]
    pub reconnect_url: Option<String>,

    /// Initial connection attempts started per second (to A). 0 = as fast as --concurrency
    /// allows.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,

    /// Initial connection attempts in flight at once. The reconnects are not limited: every
    /// client reconnects the moment its connection ends, as real clients do.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,

    /// Longest the initial ramp may take; attempts not started by then are skipped.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub ramp_limit: Duration,

    /// Shortest pause of a client after a failed reconnect (refused, reset, an error reply...)
    /// before it tries again.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    pub backoff_min: Duration,

    /// Longest such pause; each one is drawn uniformly between the two, so the retries of
    /// thousands of clients do not arrive in lockstep.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,

    /// Room names are `<prefix>-<run id>-<n>`.
    #[arg(long, default_value = "loadtest")]
    pub room_prefix: String,
}

impl Scenario {
    /// Sockets the scenario holds open at once, for the open-file limit check.
    pub fn max_connections(&self) -> usize {
        match self {
            Scenario::Fanout(a) => a.subscribers + a.publishers,
            // Each lifecycle is short, but a socket lingers briefly while closing.
            Scenario::Connections(a) => a.connections,
            Scenario::Churn(a) => a.workers,
            // A client closes its connection to A before it opens one to B.
            Scenario::ReconnectStorm(a) => a.clients,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout(_) => "fanout",
            Scenario::Connections(_) => "connections",
            Scenario::Churn(_) => "churn",
            Scenario::ReconnectStorm(_) => "reconnect-storm",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn common_options_go_before_or_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "roomcast-loadtest",
            "--json",
            "fanout",
            "--url",
            "ws://127.0.0.1:9001/",
            "--url",
            "ws://127.0.0.1:9002/",
            "--rate",
            "0",
            "--source-ips",
            "127.0.0.1-3",
        ])
        .unwrap();
        assert_eq!(cli.common.urls.len(), 2);
        assert!(cli.common.json);
        assert_eq!(cli.common.source_ips.unwrap().addrs().len(), 3);
        let Scenario::Fanout(f) = cli.scenario else {
            panic!()
        };
        assert_eq!(f.rate, 0.0);
        assert_eq!(f.subscribers, 1000);
        assert_eq!(f.duration, Duration::from_secs(10));
    }

    #[test]
    fn protocol_is_native_unless_pusher_is_asked_for() {
        let cli = Cli::try_parse_from(["roomcast-loadtest", "fanout"]).unwrap();
        assert_eq!(cli.common.protocol, Protocol::Native);
        assert!(cli.common.pusher_app.is_none());
        let cli = Cli::try_parse_from([
            "roomcast-loadtest",
            "--protocol",
            "pusher",
            "fanout",
            "--pusher-app",
            "1001:key:secret",
        ])
        .unwrap();
        assert_eq!(cli.common.protocol, Protocol::Pusher);
        assert_eq!(cli.common.pusher_app.unwrap().key, "key");
        assert!(
            Cli::try_parse_from(["roomcast-loadtest", "--pusher-app", "x:k:s", "fanout"]).is_err()
        );
    }

    #[test]
    fn reconnect_storm_needs_a_drain_pid_and_defaults_the_rest() {
        assert!(Cli::try_parse_from(["roomcast-loadtest", "reconnect-storm"]).is_err());
        let cli = Cli::try_parse_from([
            "roomcast-loadtest",
            "reconnect-storm",
            "--drain-pid",
            "4242",
            "--url",
            "ws://127.0.0.1:9001/",
            "--timeout",
            "60s",
        ])
        .unwrap();
        assert_eq!(cli.common.timeout, Duration::from_secs(60));
        let Scenario::ReconnectStorm(s) = &cli.scenario else {
            panic!()
        };
        assert_eq!((s.clients, s.rooms, s.drain_pid), (19_000, 1000, 4242));
        assert_eq!(s.reconnect_url, None);
        assert_eq!(s.backoff_min, Duration::from_millis(5));
        assert_eq!(s.backoff_max, Duration::from_millis(50));
        assert_eq!(cli.scenario.max_connections(), 19_000);
        assert_eq!(cli.scenario.name(), "reconnect-storm");
    }

    #[test]
    fn default_url_is_used_when_none_given() {
        let cli = Cli::try_parse_from(["roomcast-loadtest", "churn"]).unwrap();
        assert_eq!(cli.common.urls, ["ws://127.0.0.1:8080/"]);
    }
}
