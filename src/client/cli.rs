//! `roomcast client` and `roomcast publish`: command-line clients built on the
//! [library](super), reconnection included.
//!
//! `roomcast client URL [--room R]... [--json]` prints what arrives (readable lines on stdout,
//! or each message's JSON with `--json`; connection news on stderr) and sends each line read
//! from stdin as a `room_message` to the current room, the one joined last. Commands:
//! `/join ROOM`, `/leave [ROOM]`, `/pm ID TEXT`, `/broadcast TEXT`, `/meta KEY=VALUE`, `/quit`,
//! `/help`; a line starting with `//` is sent with one slash less. End of input (or Ctrl-C)
//! closes the connection after sending what is queued.
//!
//! `roomcast publish URL --room ROOM MESSAGE` joins the room, sends one message and exits 0
//! once the server has processed it (a `set_metadata` with nothing to merge follows the message;
//! its reply comes after any error the message caused), or non-zero with the reason.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::{Client, ClientConfig, ClientMessage, Event, ServerMessage};

/// `roomcast client`.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Server URL: ws://host:port/ or wss://host/.
    pub url: String,
    /// A room to join at start (repeatable); lines typed go to the last one joined.
    #[arg(long = "room", value_name = "ROOM")]
    pub rooms: Vec<String>,
    /// Print every server message as its JSON, one per line, instead of readable lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// `roomcast publish`.
#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Server URL: ws://host:port/ or wss://host/.
    pub url: String,
    /// The room to send to (joined first).
    #[arg(long)]
    pub room: String,
    /// The message: a string, or any JSON value with --json.
    pub message: String,
    /// MESSAGE is JSON (an object, a number…), sent as that value.
    #[arg(long)]
    pub json: bool,
    /// Give up (exit 1) after this long, connecting and retrying included.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// Options of both commands.
#[derive(Args, Debug)]
pub struct ConnectionArgs {
    /// Token (JWT), sent as the `token` query parameter of the upgrade.
    #[arg(long, env = "ROOMCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of CA certificates to trust for wss:// besides the usual roots (a private CA,
    /// a self-signed server).
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

impl ConnectionArgs {
    fn config(&self, url: &str) -> Result<ClientConfig, String> {
        let mut config = ClientConfig::new(url);
        if let Some(token) = &self.token {
            config = config.token(token);
        }
        if let Some(path) = &self.ca_cert {
            let pem =
                std::fs::read(path).map_err(|e| format!("--ca-cert {}: {e}", path.display()))?;
            config = config.extra_root_pem(pem);
        }
        Ok(config)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Runs `roomcast client`.
pub fn run_client(args: ClientArgs) -> ExitCode {
    match runtime() {
        Ok(runtime) => runtime.block_on(interactive(args)),
        Err(error) => {
            eprintln!("roomcast client: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `roomcast publish`.
pub fn run_publish(args: PublishArgs) -> ExitCode {
    let result = runtime().and_then(|runtime| runtime.block_on(publish(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("roomcast publish: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn interactive(args: ClientArgs) -> ExitCode {
    let client = args
        .connection
        .config(&args.url)
        .and_then(|config| Client::connect(config).map_err(|e| e.to_string()));
    let mut client = match client {
        Ok(client) => client,
        Err(error) => {
            eprintln!("roomcast client: {error}");
            return ExitCode::from(2);
        }
    };
    let mut shell = Shell::new(args.url.clone(), args.json);
    for room in &args.rooms {
        let join = ClientMessage::join(room.clone());
        shell.apply(&join);
        if let Err(error) = client.send(join) {
            eprintln!("roomcast client: {error}");
            return ExitCode::FAILURE;
        }
    }
    let mut lines = stdin_lines();
    let mut stdin_open = true;
    let mut connected = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ctrl_c_armed = true;
    loop {
        tokio::select! {
            event = client.next_event() => {
                let Some(event) = event else {
                    eprintln!("roomcast client: the connection ended for good");
                    return ExitCode::FAILURE;
                };
                match &event {
                    Event::Connected { .. } => connected = true,
                    Event::Disconnected { .. } => connected = false,
                    _ => {}
                }
                if shell.show(&event).is_err() {
                    break; // stdout is gone
                }
                if connected && !stdin_open {
                    break; // end of input before the connection: what was typed can go now
                }
            }
            line = lines.recv(), if stdin_open => {
                let Some(line) = line else {
                    stdin_open = false;
                    if connected {
                        break;
                    }
                    continue; // wait for the connection, then send what is queued
                };
                match parse_input(&line, shell.current_room(), |id| shell.resolve(id)) {
                    Ok(Input::Send(message)) => {
                        shell.apply(&message);
                        if let Err(error) = client.send(message) {
                            eprintln!("! {error}");
                        }
                    }
                    Ok(Input::Quit) => break,
                    Ok(Input::Help) => eprintln!("{HELP}"),
                    Ok(Input::Nothing) => {}
                    Err(error) => eprintln!("! {error}"),
                }
            }
            result = &mut ctrl_c, if ctrl_c_armed => {
                if result.is_ok() {
                    break;
                }
                ctrl_c_armed = false;
            }
        }
    }
    client.close().await;
    while let Some(event) = client.next_event().await {
        if shell.show(&event).is_err() {
            break;
        }
    }
    ExitCode::SUCCESS
}

const HELP: &str = "\
lines are sent to the current room (the last joined); commands:
  /join ROOM          join ROOM and make it the current room
  /leave [ROOM]       leave ROOM (default: the current room)
  /pm ID TEXT         private message to a client id (a unique prefix of one seen will do)
  /broadcast TEXT     to every other connected client
  /meta KEY=VALUE     set metadata (VALUE is JSON if it parses, else a string)
  /quit               close and exit (so does end of input or Ctrl-C)
  //TEXT              send \"/TEXT\" to the room";

async fn publish(args: PublishArgs) -> Result<(), String> {
    let message = if args.json {
        serde_json::from_str::<Value>(&args.message)
            .map_err(|e| format!("MESSAGE is not JSON: {e}"))?
    } else {
        Value::String(args.message.clone())
    };
    let config = args
        .connection
        .config(&args.url)?
        .connect_timeout(args.timeout.min(Duration::from_secs(10)));
    let mut client = Client::connect(config).map_err(|e| e.to_string())?;
    // Queued before the connection exists; sent in this order once it does. The empty
    // set_metadata is answered after the server has handled the message before it.
    let queued = client
        .join_room(args.room.clone())
        .and_then(|()| client.room_message(args.room.clone(), message))
        .and_then(|()| client.set_metadata(Map::new()));
    if let Err(error) = queued {
        return Err(error.to_string());
    }
    let mut last_failure: Option<String> = None;
    let outcome = tokio::time::timeout(args.timeout, async {
        let mut connected = false;
        while let Some(event) = client.next_event().await {
            match event {
                Event::Connected { .. } => connected = true,
                Event::Disconnected { reason } if connected => {
                    return Err(format!(
                        "the connection was lost before the server confirmed the message: {reason}"
                    ));
                }
                Event::Disconnected { reason } => last_failure = Some(reason),
                Event::Message(ServerMessage::Error { message, .. }) => {
                    return Err(format!("the server refused: {message}"));
                }
                Event::Message(ServerMessage::MetadataUpdated { .. }) => return Ok(()),
                _ => {}
            }
        }
        Err(last_failure
            .clone()
            .unwrap_or_else(|| "the connection ended".into()))
    })
    .await;
    let result = match outcome {
        Ok(result) => result,
        Err(_) => Err(format!(
            "timed out after {}{}",
            humantime::format_duration(args.timeout),
            last_failure.map(|r| format!(": {r}")).unwrap_or_default()
        )),
    };
    client.close().await;
    result
}

/// Lines of stdin, read on a thread of their own (a blocking read cannot be cancelled);
/// invalid UTF-8 is replaced, not fatal. The channel closes at end of input.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel(64);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match stdin.read_until(b'\n', &mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buffer);
                    let line = line.trim_end_matches(['\n', '\r']).to_owned();
                    if sender.blocking_send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    receiver
}

/// What one line of input asks for.
#[derive(Debug, PartialEq)]
pub(crate) enum Input {
    Send(ClientMessage),
    Quit,
    Help,
    Nothing,
}

/// Parses one line. `current_room` receives plain lines; `resolve` turns a `/pm` target into
/// a full id.
pub(crate) fn parse_input(
    line: &str,
    current_room: Option<&str>,
    resolve: impl Fn(&str) -> String,
) -> Result<Input, String> {
    let to_room = |text: &str| match current_room {
        Some(room) => Ok(Input::Send(ClientMessage::RoomMessage {
            room: room.to_owned(),
            message: Value::String(text.to_owned()),
        })),
        None => Err("not in a room: /join ROOM first (or /help)".to_owned()),
    };
    if line.trim().is_empty() {
        return Ok(Input::Nothing);
    }
    if let Some(escaped) = line.strip_prefix("//") {
        return to_room(&format!("/{escaped}"));
    }
    let Some(command) = line.strip_prefix('/') else {
        return to_room(line);
    };
    let (name, rest) = command
        .split_once(char::is_whitespace)
        .unwrap_or((command, ""));
    let rest = rest.trim();
    match name {
        "join" if !rest.is_empty() => Ok(Input::Send(ClientMessage::join(rest))),
        "join" => Err("usage: /join ROOM".into()),
        "leave" => match (rest, current_room) {
            ("", None) => Err("usage: /leave ROOM".into()),
            ("", Some(room)) | (room, _) => Ok(Input::Send(ClientMessage::LeaveRoom {
                room: room.to_owned(),
            })),
        },
        "pm" | "msg" => match rest.split_once(char::is_whitespace) {
            Some((to, text)) if !text.trim().is_empty() => {
                Ok(Input::Send(ClientMessage::PrivateMessage {
                    to: resolve(to),
                    message: Value::String(text.trim_start().to_owned()),
                }))
            }
            _ => Err("usage: /pm ID TEXT".into()),
        },
        "broadcast" | "all" if !rest.is_empty() => Ok(Input::Send(ClientMessage::Broadcast {
            message: Value::String(rest.to_owned()),
        })),
        "broadcast" | "all" => Err("usage: /broadcast TEXT".into()),
        "meta" => match rest.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                let value = serde_json::from_str(value.trim())
                    .unwrap_or_else(|_| Value::String(value.trim().to_owned()));
                let mut metadata = Map::new();
                metadata.insert(key.trim().to_owned(), value);
                Ok(Input::Send(ClientMessage::SetMetadata { metadata }))
            }
            _ => Err("usage: /meta KEY=VALUE".into()),
        },
        "quit" | "exit" | "q" => Ok(Input::Quit),
        "help" | "?" => Ok(Input::Help),
        _ => Err(format!("unknown command /{name} (try /help)")),
    }
}

/// The interactive client's view: rooms joined (the last is current), ids seen, output.
struct Shell {
    url: String,
    json: bool,
    rooms: Vec<String>,
    known_ids: BTreeSet<String>,
}

impl Shell {
    fn new(url: String, json: bool) -> Self {
        Self {
            url,
            json,
            rooms: Vec::new(),
            known_ids: BTreeSet::new(),
        }
    }

    fn current_room(&self) -> Option<&str> {
        self.rooms.last().map(String::as_str)
    }

    /// Follows joins and leaves for the current room.
    fn apply(&mut self, message: &ClientMessage) {
        match message {
            ClientMessage::JoinRoom { room, .. } => {
                self.rooms.retain(|r| r != room);
                self.rooms.push(room.clone());
            }
            ClientMessage::LeaveRoom { room } => self.rooms.retain(|r| r != room),
            _ => {}
        }
    }

    /// A `/pm` target: the one id seen that starts with it (an ellipsis from the display
    /// removed), else the text as typed (a full client id, or a user id).
    fn resolve(&self, target: &str) -> String {
        let prefix = target.trim_end_matches('…');
        let mut matches = self.known_ids.iter().filter(|id| id.starts_with(prefix));
        match (matches.next(), matches.next()) {
            (Some(id), None) => id.clone(),
            _ => target.to_owned(),
        }
    }

    fn remember(&mut self, message: &ServerMessage) {
        let id = match message {
            ServerMessage::Broadcast { from, .. }
            | ServerMessage::RoomMessage { from, .. }
            | ServerMessage::PrivateMessage { from, .. } => from,
            ServerMessage::MemberJoined { client_id, .. } => client_id,
            _ => return,
        };
        if self.known_ids.len() < 10_000 {
            self.known_ids.insert(id.clone());
        }
    }

    /// Prints an event: server messages on stdout, connection news on stderr. Fails when
    /// stdout is closed.
    fn show(&mut self, event: &Event) -> std::io::Result<()> {
        match event {
            Event::Message(message) => {
                self.remember(message);
                let line = if self.json {
                    message.to_json()
                } else {
                    describe(message)
                };
                print_line(&line)
            }
            Event::Other(text) if self.json => print_line(text),
            Event::Other(text) => print_line(&format!("? {}", sanitize(text))),
            Event::Connected { client_id, user_id } => {
                let user = user_id
                    .as_ref()
                    .map(|u| format!(" (user {})", sanitize(u)))
                    .unwrap_or_default();
                eprintln!("* connected to {} as {client_id}{user}", self.url);
                Ok(())
            }
            Event::Disconnected { reason } => {
                eprintln!("* disconnected: {}", sanitize(reason));
                Ok(())
            }
            Event::Reconnecting { attempt, delay } => {
                eprintln!(
                    "* reconnecting in {:.1} s (attempt {attempt})",
                    delay.as_secs_f64()
                );
                Ok(())
            }
        }
    }
}

fn print_line(line: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

/// One readable line for a server message.
pub(crate) fn describe(message: &ServerMessage) -> String {
    let members = |n: u64| {
        if n == 1 {
            "1 member".to_owned()
        } else {
            format!("{n} members")
        }
    };
    match message {
        ServerMessage::Welcome { client_id, .. } => format!("* welcome, {client_id}"),
        ServerMessage::Broadcast { from, message, .. } => {
            format!("[broadcast] {}: {}", short(from), text(message))
        }
        ServerMessage::RoomJoined {
            room,
            members: n,
            recovered,
            ..
        } => {
            let recovery = match recovered {
                Some(true) => ", missed messages recovered",
                Some(false) => ", missed messages not recovered",
                None => "",
            };
            format!("[{}] * joined ({}{recovery})", sanitize(room), members(*n))
        }
        ServerMessage::MemberJoined {
            room,
            client_id,
            total_members,
        } => format!(
            "[{}] * {} joined ({})",
            sanitize(room),
            short(client_id),
            members(*total_members)
        ),
        ServerMessage::MemberLeft {
            room,
            client_id,
            total_members,
        } => format!(
            "[{}] * {} left ({})",
            sanitize(room),
            short(client_id),
            members(*total_members)
        ),
        ServerMessage::RoomMessage {
            room,
            from,
            message,
            ..
        } => format!("[{}] {}: {}", sanitize(room), short(from), text(message)),
        ServerMessage::PrivateMessage { from, message, .. } => {
            format!("[private] {}: {}", short(from), text(message))
        }
        ServerMessage::MetadataUpdated { metadata } => {
            format!("* metadata: {}", Value::Object(metadata.clone()))
        }
        ServerMessage::Error { message, .. } => format!("! {}", sanitize(message)),
    }
}

/// `client_` and the first 8 of its 32 hex digits; other ids (user ids) whole.
fn short(id: &str) -> String {
    match id.get(..15) {
        Some(prefix) if id.starts_with("client_") && id.len() > 16 => format!("{prefix}…"),
        _ => sanitize(id),
    }
}

/// A message body: strings as they are, other JSON compact.
fn text(value: &Value) -> String {
    match value {
        Value::String(text) => sanitize(text),
        other => sanitize(&other.to_string()),
    }
}

/// Control characters (terminal escape sequences from other users) made visible.
fn sanitize(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(line: &str, room: Option<&str>) -> Result<Input, String> {
        parse_input(line, room, |id| format!("resolved:{id}"))
    }

    fn send(message: ClientMessage) -> Result<Input, String> {
        Ok(Input::Send(message))
    }

    #[test]
    fn plain_lines_go_to_the_current_room() {
        assert_eq!(
            parse("hello there ", Some("lobby")),
            send(ClientMessage::RoomMessage {
                room: "lobby".into(),
                message: json!("hello there ")
            })
        );
        assert!(parse("hello", None).is_err());
        assert_eq!(parse("   ", Some("lobby")), Ok(Input::Nothing));
        assert_eq!(
            parse("//join is a word", Some("r")),
            send(ClientMessage::RoomMessage {
                room: "r".into(),
                message: json!("/join is a word")
            })
        );
    }

    #[test]
    fn slash_commands() {
        assert_eq!(
            parse("/join  news ", None),
            send(ClientMessage::join("news"))
        );
        assert!(parse("/join", None).is_err());
        assert_eq!(
            parse("/leave", Some("news")),
            send(ClientMessage::LeaveRoom {
                room: "news".into()
            })
        );
        assert_eq!(
            parse("/leave other", Some("news")),
            send(ClientMessage::LeaveRoom {
                room: "other".into()
            })
        );
        assert!(parse("/leave", None).is_err());
        assert_eq!(
            parse("/pm client_ab12 hi  there", None),
            send(ClientMessage::PrivateMessage {
                to: "resolved:client_ab12".into(),
                message: json!("hi  there")
            })
        );
        assert!(parse("/pm client_ab12", None).is_err());
        assert_eq!(
            parse("/broadcast all hands", None),
            send(ClientMessage::Broadcast {
                message: json!("all hands")
            })
        );
        assert_eq!(
            parse("/meta name = ann lee", None),
            send(ClientMessage::SetMetadata {
                metadata: json!({"name": "ann lee"}).as_object().unwrap().clone()
            })
        );
        assert_eq!(
            parse("/meta age=42", None),
            send(ClientMessage::SetMetadata {
                metadata: json!({"age": 42}).as_object().unwrap().clone()
            })
        );
        assert!(parse("/meta =x", None).is_err());
        assert_eq!(parse("/quit", None), Ok(Input::Quit));
        assert_eq!(parse("/help", None), Ok(Input::Help));
        assert!(parse("/dance", None).unwrap_err().contains("/dance"));
    }

    #[test]
    fn the_current_room_is_the_last_joined() {
        let mut shell = Shell::new("ws://x/".into(), false);
        assert_eq!(shell.current_room(), None);
        for room in ["a", "b", "a"] {
            shell.apply(&ClientMessage::join(room));
        }
        assert_eq!(shell.current_room(), Some("a"));
        shell.apply(&ClientMessage::LeaveRoom { room: "a".into() });
        assert_eq!(shell.current_room(), Some("b"));
    }

    #[test]
    fn pm_targets_resolve_from_a_unique_prefix() {
        let mut shell = Shell::new("ws://x/".into(), false);
        for id in [
            "client_ab12cd34000000000000000000000000",
            "client_ab99ee00000000000000000000000000",
        ] {
            shell.remember(&ServerMessage::MemberJoined {
                room: "r".into(),
                client_id: id.into(),
                total_members: 2,
            });
        }
        assert_eq!(
            shell.resolve("client_ab12cd34…"),
            "client_ab12cd34000000000000000000000000"
        );
        assert_eq!(shell.resolve("client_ab"), "client_ab", "ambiguous");
        assert_eq!(shell.resolve("user-7"), "user-7");
    }

    #[test]
    fn readable_lines() {
        let id = "client_ab12cd34ef56ab12cd34ef56ab12cd34";
        assert_eq!(
            describe(&ServerMessage::RoomMessage {
                room: "lobby".into(),
                from: id.into(),
                message: json!("hello"),
                timestamp: 1,
                offset: None,
            }),
            "[lobby] client_ab12cd34…: hello"
        );
        assert_eq!(
            describe(&ServerMessage::RoomJoined {
                room: "lobby".into(),
                members: 1,
                offset: None,
                epoch: None,
                recovered: None,
            }),
            "[lobby] * joined (1 member)"
        );
        assert_eq!(
            describe(&ServerMessage::MemberLeft {
                room: "lobby".into(),
                client_id: id.into(),
                total_members: 3
            }),
            "[lobby] * client_ab12cd34… left (3 members)"
        );
        assert_eq!(
            describe(&ServerMessage::PrivateMessage {
                from: "user-7".into(),
                message: json!({"n": 1}),
                timestamp: 1
            }),
            r#"[private] user-7: {"n":1}"#
        );
        assert_eq!(
            describe(&ServerMessage::Broadcast {
                from: id.into(),
                message: json!("\u{1b}[2Jgotcha"),
                timestamp: 1
            }),
            "[broadcast] client_ab12cd34…: \\u{1b}[2Jgotcha"
        );
        assert_eq!(
            describe(&ServerMessage::Error {
                message: "Room does not exist".into(),
                timestamp: 1
            }),
            "! Room does not exist"
        );
    }
}
