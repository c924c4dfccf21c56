//! One WebSocket connection after the upgrade: a reader (this task) and a writer (its own task).
//!
//! The reader turns frames into protocol commands (via fastwebsockets: fragments reassembled,
//! UTF-8 checked, pings answered, close handshake done). The writer owns the socket's write half
//! and drains the connection's [`Outbox`](crate::outbox::Outbox) in batches. Nothing the reader
//! does writes to the socket directly: replies, pongs and close frames are queued like any other
//! frame, which keeps one order for everything a client receives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Role, WebSocketError};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::{debug, info_span, Instrument};

use super::commands::Session;
use super::fragment::{Assembler, FragmentError};
use crate::hub::Member;
use crate::outbox::{self, CloseRequest, Outbox, WriterExit};
use crate::protocol::{self, close_code};
use crate::server::Context;

/// Source of process-unique connection numbers.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A fresh, unguessable client id: `client_` and 128 random bits in hex. The seed's
/// `uniqid()` is time-based and guessable, and the id is the only address of private messages.
fn new_client_id() -> Arc<str> {
    format!("client_{:032x}", rand::random::<u128>()).into()
}

/// Serves one upgraded connection until it closes. `prebuffered` holds bytes the HTTP layer read
/// past the upgrade request; they are the start of the WebSocket stream.
pub async fn run(stream: TcpStream, prebuffered: Bytes, ctx: Arc<Context>) {
    let peer = stream.peer_addr().ok();
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let client_id = new_client_id();
    let span = info_span!("conn", id = %client_id, peer = ?peer);
    serve(stream, prebuffered, ctx, conn, client_id)
        .instrument(span)
        .await
}

async fn serve(
    stream: TcpStream,
    prebuffered: Bytes,
    ctx: Arc<Context>,
    conn: u64,
    client_id: Arc<str>,
) {
    let config = &ctx.config;
    let (read_half, write_half) = stream.into_split();
    let reader = std::io::Cursor::new(prebuffered).chain(read_half);
    // fastwebsockets' own writer is not used: frames reach the socket through the outbox.
    let (ws_read, _) =
        fastwebsockets::after_handshake_split(reader, tokio::io::sink(), Role::Server);
    let mut frames = ws_read;
    // fastwebsockets refuses a frame whose length is >= its limit; ours is "more than".
    frames.set_max_message_size(config.max_message_size.saturating_add(1));
    let mut assembler = Assembler::new(config.max_message_size);

    let (outbox, receiver) = outbox::outbox(
        config.outbound_queue,
        config.slow_consumer,
        ctx.outbox_stats.clone(),
    );
    let mut writer = tokio::spawn(
        receiver.run_writer(write_half, config.drain_timeout, |code| {
            protocol::close(code, "")
        }),
    );

    outbox.push(protocol::welcome(&client_id, protocol::timestamp()));
    let member = Member {
        conn,
        client_id,
        outbox: outbox.clone(),
    };
    ctx.router.connect(&member);
    let mut session = Session::new(member, ctx.router.clone());
    debug!("connected");

    // Frames fastwebsockets obliges us to send (pong, close echo) go through the outbox too.
    let mut obligated = |frame: Frame<'static>| {
        send_obligated(&outbox, frame);
        std::future::ready(Ok::<(), std::convert::Infallible>(()))
    };

    let mut writer_done = false;
    let end = loop {
        let frame = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break End::Close(CloseRequest {
                code: Some(close_code::GOING_AWAY),
                flush: true,
            }),
            exit = &mut writer => {
                writer_done = true;
                debug!(exit = ?exit.unwrap_or(WriterExit::Failed), "writer stopped first");
                break End::WriterStopped;
            }
            frame = frames.read_frame(&mut obligated) => frame,
        };
        match frame {
            Ok(frame) => match frame.opcode {
                OpCode::Close => break End::PeerClosed,
                OpCode::Ping | OpCode::Pong => {}
                // The seed (Ratchet) hands binary messages to the same handler as text.
                OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                    match assembler.push(frame) {
                        Ok(Some(mut message)) => session.handle_message(&mut message.payload),
                        Ok(None) => {}
                        Err(error) => break End::from(error),
                    }
                }
            },
            Err(error) => break End::from(error),
        }
    };
    debug!(?end, "disconnecting");

    session.disconnect();
    drop(session);
    if !writer_done {
        match end {
            End::Close(request) => {
                outbox.request_close(request);
            }
            End::Abort => writer.abort(),
            End::PeerClosed | End::WriterStopped => {}
        }
        let _ = writer.await;
    }
}

/// Why the reader stopped.
#[derive(Debug)]
enum End {
    /// Close with this request (protocol violation, shutdown).
    Close(CloseRequest),
    /// The peer sent a close frame; its echo is already queued.
    PeerClosed,
    /// The writer finished first (slow consumer closed, socket failed).
    WriterStopped,
    /// The transport is gone: nothing more can be sent.
    Abort,
}

impl From<WebSocketError> for End {
    fn from(error: WebSocketError) -> Self {
        let code = match error {
            WebSocketError::InvalidUTF8 => close_code::INVALID_PAYLOAD,
            WebSocketError::FrameTooLarge => close_code::MESSAGE_TOO_BIG,
            // An invalid close code was answered by fastwebsockets' obligated 1002 already.
            WebSocketError::InvalidCloseCode => return End::PeerClosed,
            WebSocketError::UnexpectedEOF
            | WebSocketError::IoError(_)
            | WebSocketError::ConnectionClosed
            | WebSocketError::SendError(_) => return End::Abort,
            _ => close_code::PROTOCOL_ERROR,
        };
        End::Close(CloseRequest {
            code: Some(code),
            flush: false,
        })
    }
}

impl From<FragmentError> for End {
    fn from(error: FragmentError) -> Self {
        let code = match error {
            FragmentError::InvalidSequence => close_code::PROTOCOL_ERROR,
            FragmentError::TooBig => close_code::MESSAGE_TOO_BIG,
            FragmentError::InvalidUtf8 => close_code::INVALID_PAYLOAD,
        };
        End::Close(CloseRequest {
            code: Some(code),
            flush: false,
        })
    }
}

fn send_obligated(outbox: &Outbox, frame: Frame<'static>) {
    match frame.opcode {
        OpCode::Pong => {
            outbox.push(protocol::pong(&frame.payload));
        }
        OpCode::Close => {
            // Echo the peer's code; a close payload over 125 bytes breaks RFC 6455 5.5.
            let code = if frame.payload.len() > 125 {
                Some(close_code::PROTOCOL_ERROR)
            } else if frame.payload.len() >= 2 {
                Some(u16::from_be_bytes([frame.payload[0], frame.payload[1]]))
            } else {
                None
            };
            outbox.request_close(CloseRequest { code, flush: true });
        }
        _ => {}
    }
}
