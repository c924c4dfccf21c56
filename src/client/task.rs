//! The background task of one client: connect, run the session, reconnect with backoff.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::{interval_at, timeout, Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::transport::{Failure, Target, Ws};
use super::{ClientConfig, ClientMessage, Event, ReconnectPolicy, ServerMessage};
use crate::protocol::close_code;
use crate::protocol::typed::Position;

/// How long closing may take: sending what is queued, the close frame, the server's reply.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages taken from the queue and written with one flush.
const BATCH: usize = 64;

/// How a session ended.
enum End {
    /// The connection was lost: reconnect.
    Lost(String),
    /// The client was closed: stop.
    Closed,
}

pub(crate) struct Task {
    target: Target,
    policy: ReconnectPolicy,
    connect_timeout: Duration,
    keepalive: Option<Duration>,
    commands: mpsc::Receiver<ClientMessage>,
    events: mpsc::Sender<Event>,
    close: CancellationToken,
    finished: CancellationToken,
    /// Rooms joined and not left, in the order joined: joined again on every reconnection.
    rooms: Vec<String>,
    /// Where each room's history stood in what this client received (the last offset and the
    /// epoch): sent as `since` when it joins again, so what it missed is replayed.
    positions: HashMap<String, Position>,
    /// Everything set with `set_metadata`, merged: sent again on every reconnection.
    metadata: Map<String, Value>,
    /// Messages whose write failed: sent again after reconnecting.
    unsent: Vec<ClientMessage>,
}

impl Task {
    pub(crate) fn new(
        target: Target,
        config: &ClientConfig,
        commands: mpsc::Receiver<ClientMessage>,
        events: mpsc::Sender<Event>,
        close: CancellationToken,
        finished: CancellationToken,
    ) -> Self {
        Self {
            target,
            policy: config.reconnect.clone(),
            connect_timeout: config.connect_timeout,
            keepalive: config.keepalive.filter(|period| !period.is_zero()),
            commands,
            events,
            close,
            finished,
            rooms: Vec::new(),
            positions: HashMap::new(),
            metadata: Map::new(),
            unsent: Vec::new(),
        }
    }

    pub(crate) async fn run(mut self) {
        // However the task ends, `close()` callers are released and new sends refused.
        let _finished = self.finished.clone().drop_guard();
        let mut attempt: u32 = 0;
        loop {
            if attempt > 0 {
                if !self.policy.allows(attempt) {
                    debug!(url = %self.target.shown_url, attempt, "giving up reconnecting");
                    break;
                }
                let delay = self.policy.delay(attempt, &mut rand::thread_rng());
                if !self.emit(Event::Reconnecting { attempt, delay }).await {
                    break;
                }
                tokio::select! {
                    _ = self.close.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            let opened = tokio::select! {
                _ = self.close.cancelled() => break,
                opened = self.open() => opened,
            };
            match opened {
                Err(failure) => {
                    debug!(url = %self.target.shown_url, reason = %failure.reason, "connection attempt failed");
                    let reason = failure.reason;
                    if !self.emit(Event::Disconnected { reason }).await || failure.fatal {
                        break;
                    }
                    attempt = attempt.saturating_add(1);
                }
                Ok((ws, client_id, user_id)) => {
                    debug!(url = %self.target.shown_url, %client_id, "connected");
                    // When closing meanwhile, the session closes the connection properly.
                    self.emit(Event::Connected { client_id, user_id }).await;
                    match self.session(ws).await {
                        End::Closed => break,
                        End::Lost(reason) => {
                            debug!(url = %self.target.shown_url, %reason, "connection lost");
                            if !self.emit(Event::Disconnected { reason }).await {
                                break;
                            }
                            attempt = 1;
                        }
                    }
                }
            }
        }
        // Dropping the receiver makes every later send fail with `Closed`.
        self.commands.close();
    }

    /// Hands an event to the application, waiting for room in the buffer. `false` when the
    /// client is being closed (the event is then dropped).
    async fn emit(&self, event: Event) -> bool {
        tokio::select! {
            biased;
            // A dropped receiver is fine: a send-only application.
            _ = self.events.send(event) => true,
            _ = self.close.cancelled() => false,
        }
    }

    /// One attempt: TCP, TLS, upgrade and the `welcome`, within the connect timeout.
    async fn open(&self) -> Result<(Ws, String, Option<String>), Failure> {
        let attempt = async {
            let mut ws = self.target.connect().await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return match serde_json::from_str::<ServerMessage>(&text) {
                            Ok(ServerMessage::Welcome {
                                client_id, user_id, ..
                            }) => Ok((ws, client_id, user_id)),
                            _ => Err(Failure::retry(format!(
                                "expected a welcome message, got {}",
                                clip(&text)
                            ))),
                        };
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return Err(Failure::retry(closed_reason(frame.as_ref())))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        return Err(Failure::retry(format!("waiting for the welcome: {e}")))
                    }
                    None => {
                        return Err(Failure::retry(
                            "the connection closed before the welcome message",
                        ))
                    }
                }
            }
        };
        timeout(self.connect_timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(Failure::retry(format!(
                    "no welcome from {} within {:?}",
                    self.target.shown_url, self.connect_timeout
                )))
            })
    }

    /// A connected session: restore the state, then relay both ways until the connection is
    /// lost or the client closed.
    async fn session(&mut self, mut ws: Ws) -> End {
        let mut restore = Vec::new();
        if !self.metadata.is_empty() {
            restore.push(ClientMessage::SetMetadata {
                metadata: self.metadata.clone(),
            });
        }
        restore.extend(self.rooms.iter().map(|room| ClientMessage::JoinRoom {
            room: room.clone(),
            since: Some(self.positions.get(room).cloned().unwrap_or_default()),
        }));
        // Room and metadata changes among the unsent are already in the state just restored.
        restore.extend(self.unsent.iter().filter(|m| !is_state(m)).cloned());
        if let Err(reason) = self.write(&mut ws, &restore).await {
            return End::Lost(reason);
        }
        self.unsent.clear();

        let mut keepalive = self.keepalive.map(|period| {
            let mut ticks = interval_at(Instant::now() + period, period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            (ticks, period)
        });
        let mut last_heard = Instant::now();
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                _ = self.close.cancelled() => return self.close_gracefully(ws).await,
                frame = ws.next() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(text))) => self.deliver(text).await,
                        // The seed's server (Ratchet) treats binary like text; do the same.
                        Some(Ok(Message::Binary(data))) => match String::from_utf8(data) {
                            Ok(text) => self.deliver(text).await,
                            Err(_) => debug!("ignoring a binary frame that is not UTF-8"),
                        },
                        Some(Ok(Message::Close(frame))) => {
                            let reason = closed_reason(frame.as_ref());
                            finish_close(&mut ws).await;
                            return End::Lost(reason);
                        }
                        // Pings are answered by tungstenite; pongs only count as activity.
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return End::Lost(format!("connection lost: {e}")),
                        None => return End::Lost("connection lost".into()),
                    }
                }
                received = self.commands.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        // Every handle was dropped.
                        return self.close_gracefully(ws).await;
                    }
                    for message in &mut batch {
                        self.track(message);
                    }
                    if let Err(reason) = self.write(&mut ws, &batch).await {
                        self.unsent.append(&mut batch);
                        return End::Lost(reason);
                    }
                    batch.clear();
                }
                _ = tick(&mut keepalive) => {
                    if let Some((_, period)) = &keepalive {
                        let silent = last_heard.elapsed();
                        if silent >= *period * 2 {
                            return End::Lost(format!(
                                "nothing from the server for {} s (keepalive)",
                                silent.as_secs()
                            ));
                        }
                    }
                    if let Err(reason) = self.write_frame(&mut ws, Message::Ping(Vec::new())).await {
                        return End::Lost(reason);
                    }
                }
            }
        }
    }

    /// Sends what is still queued, closes with 1000 and reads until the server's reply, all
    /// within [`CLOSE_TIMEOUT`].
    async fn close_gracefully(&mut self, mut ws: Ws) -> End {
        let mut queued = Vec::new();
        while let Ok(message) = self.commands.try_recv() {
            queued.push(message);
        }
        let events = &self.events;
        let _ = timeout(CLOSE_TIMEOUT, async {
            for message in &queued {
                if ws.feed(Message::Text(message.to_json())).await.is_err() {
                    return;
                }
            }
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            if ws.close(Some(frame)).await.is_err() {
                return;
            }
            // Replies to what was just sent (an error, say) still reach the application.
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Text(text) = message {
                    let _ = events.try_send(parse(text));
                }
            }
        })
        .await;
        let _ = self.events.try_send(Event::Disconnected {
            reason: "closed by the client".into(),
        });
        End::Closed
    }

    async fn deliver(&mut self, text: String) {
        let event = parse(text);
        if let Event::Message(message) = &event {
            self.follow(message);
        }
        self.emit(event).await;
    }

    /// Keeps each room's history position from what the server sends.
    fn follow(&mut self, message: &ServerMessage) {
        match message {
            ServerMessage::RoomJoined {
                room,
                offset: Some(offset),
                epoch: Some(epoch),
                ..
            } => {
                let position = Position {
                    offset: Some(*offset),
                    epoch: Some(epoch.clone()),
                };
                self.positions.insert(room.clone(), position);
            }
            ServerMessage::RoomMessage {
                room,
                offset: Some(offset),
                ..
            } => {
                if let Some(position) = self.positions.get_mut(room) {
                    position.offset = Some(*offset);
                }
            }
            _ => {}
        }
    }

    /// Keeps the rooms and metadata to restore after a reconnection. A join opts in to the
    /// room's history (`since`), so that a rejoin can recover what it missed: a server
    /// without history ignores it.
    fn track(&mut self, message: &mut ClientMessage) {
        match message {
            ClientMessage::JoinRoom { room, since } => {
                if since.is_none() {
                    *since = Some(self.positions.get(room).cloned().unwrap_or_default());
                }
                // An empty name is refused by the server: nothing to restore.
                if !room.is_empty() && !self.rooms.contains(room) {
                    self.rooms.push(room.clone());
                }
            }
            ClientMessage::LeaveRoom { room } => {
                self.rooms.retain(|r| r != room);
                self.positions.remove(room);
            }
            ClientMessage::SetMetadata { metadata } => {
                for (key, value) in metadata {
                    self.metadata.insert(key.clone(), value.clone());
                }
            }
            _ => {}
        }
    }

    /// Writes messages and flushes once; a write that stalls for the connect timeout counts as
    /// a lost connection.
    async fn write(&self, ws: &mut Ws, messages: &[ClientMessage]) -> Result<(), String> {
        if messages.is_empty() {
            return Ok(());
        }
        let io = async {
            for message in messages {
                ws.feed(Message::Text(message.to_json())).await?;
            }
            ws.flush().await
        };
        self.bounded(io).await
    }

    async fn write_frame(&self, ws: &mut Ws, frame: Message) -> Result<(), String> {
        self.bounded(ws.send(frame)).await
    }

    async fn bounded(
        &self,
        io: impl std::future::Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), String> {
        match timeout(self.connect_timeout, io).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot send: {e}")),
            Err(_) => Err(format!(
                "a write stalled for {:?} (the server is not reading)",
                self.connect_timeout
            )),
        }
    }
}

/// Room and metadata changes: restored from the tracked state rather than resent.
fn is_state(message: &ClientMessage) -> bool {
    matches!(
        message,
        ClientMessage::JoinRoom { .. }
            | ClientMessage::LeaveRoom { .. }
            | ClientMessage::SetMetadata { .. }
    )
}

fn parse(text: String) -> Event {
    match serde_json::from_str::<ServerMessage>(&text) {
        Ok(message) => Event::Message(message),
        Err(_) => Event::Other(text),
    }
}

async fn tick(keepalive: &mut Option<(Interval, Duration)>) {
    match keepalive {
        Some((ticks, _)) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// After the server's close frame: keep polling briefly so tungstenite sends the reply and the
/// server sees a clean close.
async fn finish_close(ws: &mut Ws) {
    let _ = timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// `reason` of a [`Event::Disconnected`] for a close frame from the server.
fn closed_reason(frame: Option<&CloseFrame<'_>>) -> String {
    let Some(frame) = frame else {
        return "the server closed the connection".into();
    };
    let code = u16::from(frame.code);
    let meaning = match code {
        close_code::NORMAL => "normal closure",
        close_code::GOING_AWAY => "going away: the server is shutting down",
        close_code::PROTOCOL_ERROR => "protocol error",
        close_code::INVALID_PAYLOAD => "invalid payload",
        close_code::POLICY_VIOLATION => "policy violation: over the rate limit",
        close_code::MESSAGE_TOO_BIG => "message too big",
        close_code::TRY_AGAIN_LATER => "try again later: this client read too slowly",
        close_code::IDLE_TIMEOUT => "idle timeout",
        close_code::TOKEN_EXPIRED => "the token expired",
        _ => "",
    };
    let mut reason = format!("the server closed the connection with {code}");
    if !meaning.is_empty() {
        reason.push_str(&format!(" ({meaning})"));
    }
    if !frame.reason.is_empty() {
        reason.push_str(&format!(": {}", frame.reason));
    }
    reason
}

/// At most 200 characters of a message, for error texts.
fn clip(text: &str) -> String {
    let mut clipped: String = text.chars().take(200).collect();
    if clipped.len() < text.len() {
        clipped.push('…');
    }
    clipped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_name_the_code() {
        let frame = CloseFrame {
            code: CloseCode::from(1001),
            reason: "".into(),
        };
        assert_eq!(
            closed_reason(Some(&frame)),
            "the server closed the connection with 1001 (going away: the server is shutting down)"
        );
        let frame = CloseFrame {
            code: CloseCode::from(4321),
            reason: "bye".into(),
        };
        assert_eq!(
            closed_reason(Some(&frame)),
            "the server closed the connection with 4321: bye"
        );
        assert_eq!(closed_reason(None), "the server closed the connection");
    }

    #[test]
    fn unknown_messages_are_passed_on_as_text() {
        assert_eq!(
            parse(r#"{"type":"presence","who":1}"#.into()),
            Event::Other(r#"{"type":"presence","who":1}"#.into())
        );
        assert!(matches!(
            parse(r#"{"type":"room_joined","room":"r","members":1}"#.into()),
            Event::Message(ServerMessage::RoomJoined { .. })
        ));
        assert_eq!(clip(&"é".repeat(300)).chars().count(), 201);
    }
}
