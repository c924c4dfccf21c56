//! Comparison peer for roomcast's load tests: the seed rooms protocol (`shared/PROTOCOL.md`,
//! subset: welcome, join_room, leave_room, room_message, broadcast, leave-all on close) on
//! tokio-tungstenite, written the way most Rust WebSocket tutorials do it:
//!
//! - shared state is `Arc<Mutex<HashMap<..>>>`: clients by id (each an unbounded channel into
//!   its connection's writer task) and rooms as sets of client ids;
//! - one task per connection, its socket split into a sink (fed by the channel) and a stream;
//! - every outgoing message is built and serialized with `serde_json::to_string` per recipient,
//!   inside the fan-out loop, while the locks are held.
//!
//! It exists only to be measured beside roomcast; it is not hardened for anything else.
//!
//! Usage: `tungstenite-naive [PORT | HOST:PORT]` (or env `PORT`; host defaults to 127.0.0.1).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error, Message};

type ClientId = String;
type Clients = Arc<Mutex<HashMap<ClientId, UnboundedSender<Message>>>>;
type Rooms = Arc<Mutex<HashMap<String, HashSet<ClientId>>>>;

/// Every message the server sends, in the seed's field order (`type` first).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerMessage<'a> {
    Welcome {
        client_id: &'a str,
        timestamp: u64,
    },
    Error {
        message: &'a str,
        timestamp: u64,
    },
    RoomJoined {
        room: &'a str,
        members: usize,
    },
    MemberJoined {
        room: &'a str,
        client_id: &'a str,
        total_members: usize,
    },
    MemberLeft {
        room: &'a str,
        client_id: &'a str,
        total_members: usize,
    },
    RoomMessage {
        room: &'a str,
        from: &'a str,
        message: &'a Value,
        timestamp: u64,
    },
    Broadcast {
        from: &'a str,
        message: &'a Value,
        timestamp: u64,
    },
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn send(tx: &UnboundedSender<Message>, msg: &ServerMessage<'_>) {
    let text = serde_json::to_string(msg).expect("server messages always serialize");
    let _ = tx.send(Message::Text(text));
}

fn send_error(tx: &UnboundedSender<Message>, message: &str) {
    send(
        tx,
        &ServerMessage::Error {
            message,
            timestamp: now(),
        },
    );
}

#[tokio::main]
async fn main() {
    let arg = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("PORT").ok())
        .unwrap_or_else(|| "8080".to_string());
    let addr = if arg.contains(':') {
        arg
    } else {
        format!("127.0.0.1:{arg}")
    };

    let listener = TcpListener::bind(&addr).await.expect("bind");
    println!(
        "tungstenite-naive listening on {}",
        listener.local_addr().expect("local addr")
    );

    let clients: Clients = Arc::new(Mutex::new(HashMap::new()));
    let rooms: Rooms = Arc::new(Mutex::new(HashMap::new()));

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                tokio::spawn(handle_connection(stream, clients.clone(), rooms.clone()));
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
}

async fn handle_connection(stream: TcpStream, clients: Clients, rooms: Rooms) {
    let _ = stream.set_nodelay(true);
    // 64 KiB, roomcast's default --max-message-size (tungstenite would otherwise allow 64 MiB).
    let config = WebSocketConfig {
        max_message_size: Some(64 << 10),
        max_frame_size: Some(64 << 10),
        ..Default::default()
    };
    let ws = match tokio_tungstenite::accept_async_with_config(stream, Some(config)).await {
        Ok(ws) => ws,
        Err(_) => return,
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();

    // Writer task: everything for this client goes through its channel.
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let id: ClientId = format!("client_{:032x}", rand::random::<u128>());
    clients.lock().unwrap().insert(id.clone(), tx.clone());
    send(
        &tx,
        &ServerMessage::Welcome {
            client_id: &id,
            timestamp: now(),
        },
    );

    // The rooms this connection is in, so closing leaves exactly those.
    let mut joined: HashSet<String> = HashSet::new();

    while let Some(frame) = stream.next().await {
        let text = match frame {
            Ok(Message::Text(text)) => text,
            // Binary messages go to the same handler as text, as in the seed and roomcast.
            Ok(Message::Binary(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            // Over the 64 KiB limit: close with 1009 (Message Too Big), as roomcast does.
            Err(Error::Capacity(_)) => {
                let _ = tx.send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Size,
                    reason: "".into(),
                })));
                break;
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue, // ping/pong: tungstenite answers pings itself
        };
        handle_message(&text, &id, &tx, &clients, &rooms, &mut joined);
    }

    // Disconnect: forget the client, then leave every room it was in.
    clients.lock().unwrap().remove(&id);
    for room in joined.drain() {
        leave_room(&room, &id, &clients, &rooms);
    }
    drop(tx);
    let _ = writer.await;
}

fn handle_message(
    text: &str,
    id: &str,
    tx: &UnboundedSender<Message>,
    clients: &Clients,
    rooms: &Rooms,
    joined: &mut HashSet<String>,
) {
    let parsed: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(_) => return send_error(tx, "Invalid message format"),
    };
    let Some(kind) = parsed.get("type").and_then(Value::as_str) else {
        // Not an object, or no string `type`.
        return send_error(tx, "Invalid message format");
    };

    // `room`: missing or null is "", any other non-string is refused (as roomcast does).
    let room = || -> Result<&str, ()> {
        match parsed.get("room") {
            None | Some(Value::Null) => Ok(""),
            Some(Value::String(room)) => Ok(room.as_str()),
            Some(_) => Err(()),
        }
    };
    // `message`: missing or null is "", anything else is relayed verbatim.
    let empty = Value::String(String::new());
    let message = match parsed.get("message") {
        None | Some(Value::Null) => &empty,
        Some(value) => value,
    };

    match kind {
        "join_room" => {
            let Ok(room) = room() else {
                return send_error(tx, "Room name must be a string");
            };
            if room.is_empty() {
                return send_error(tx, "Room name required");
            }
            let mut rooms = rooms.lock().unwrap();
            let members = rooms.entry(room.to_string()).or_default();
            if !members.insert(id.to_string()) {
                return; // already a member: nothing happens
            }
            joined.insert(room.to_string());
            let total = members.len();
            send(
                tx,
                &ServerMessage::RoomJoined {
                    room,
                    members: total,
                },
            );
            let clients = clients.lock().unwrap();
            for member in members.iter() {
                if member == id {
                    continue;
                }
                if let Some(member_tx) = clients.get(member) {
                    send(
                        member_tx,
                        &ServerMessage::MemberJoined {
                            room,
                            client_id: id,
                            total_members: total,
                        },
                    );
                }
            }
        }
        "leave_room" => {
            let Ok(room) = room() else {
                return send_error(tx, "Room name must be a string");
            };
            if joined.remove(room) {
                leave_room(room, id, clients, rooms);
            }
        }
        "room_message" => {
            let Ok(room) = room() else {
                return send_error(tx, "Room name must be a string");
            };
            let rooms = rooms.lock().unwrap();
            let Some(members) = rooms.get(room) else {
                return send_error(tx, "Room does not exist");
            };
            if !members.contains(id) {
                return send_error(tx, "You are not in this room");
            }
            let timestamp = now();
            let clients = clients.lock().unwrap();
            for member in members.iter() {
                if member == id {
                    continue;
                }
                if let Some(member_tx) = clients.get(member) {
                    send(
                        member_tx,
                        &ServerMessage::RoomMessage {
                            room,
                            from: id,
                            message,
                            timestamp,
                        },
                    );
                }
            }
        }
        "broadcast" => {
            let timestamp = now();
            let clients = clients.lock().unwrap();
            for (other, other_tx) in clients.iter() {
                if other == id {
                    continue;
                }
                send(
                    other_tx,
                    &ServerMessage::Broadcast {
                        from: id,
                        message,
                        timestamp,
                    },
                );
            }
        }
        // private_message and set_metadata are outside the measured subset.
        other => send_error(tx, &format!("Unknown message type: {other}")),
    }
}

fn leave_room(room: &str, id: &str, clients: &Clients, rooms: &Rooms) {
    let mut rooms = rooms.lock().unwrap();
    let Some(members) = rooms.get_mut(room) else {
        return;
    };
    if !members.remove(id) {
        return;
    }
    if members.is_empty() {
        rooms.remove(room);
        return;
    }
    let total = members.len();
    let clients = clients.lock().unwrap();
    for member in members.iter() {
        if let Some(member_tx) = clients.get(member) {
            send(
                member_tx,
                &ServerMessage::MemberLeft {
                    room,
                    client_id: id,
                    total_members: total,
                },
            );
        }
    }
}
