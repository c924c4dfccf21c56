//! `--relay-path`: the seed's Swoole variant as a protocol of its own. A connection there is
//! greeted with `{"type":"welcome","fd":N}` (N: its number on this node, as Swoole's `fd`),
//! and every message it sends is relayed verbatim, with its opcode, to every connection on
//! that path, the sender included, as the Swoole example's `push` loop does. No rooms, no
//! directory, no JSON parsing; the token, the connection caps, the rate limit, the heartbeat
//! and the frame limits apply as on the seed protocol. The relay is node-local: behind a load
//! balancer each node relays among its own connections.

use std::time::Instant;

use super::protocol::{heartbeat_from_now, Opening, Protocol};
use crate::hub::ConnId;
use crate::limits::{Rate, RateLimiter};
use crate::node::Node;
use crate::outbox::{CloseRequest, Outbox};
use crate::protocol::{self, close_code};

/// The hub group every relay connection is in.
const GROUP: &str = "relay";

pub struct Relay {
    outbox: Outbox,
    conn: ConnId,
    rate: Option<RateLimiter>,
    node: std::sync::Arc<Node>,
    /// Flooded: what it still sends is dropped while it closes.
    closing: bool,
}

/// The greeting, written in one place.
fn welcome(conn: ConnId) -> bytes::Bytes {
    protocol::data(
        false,
        format!(r#"{{"type":"welcome","fd":{conn}}}"#).as_bytes(),
    )
}

impl Protocol for Relay {
    const NAME: &'static str = "relay";

    fn open(opening: Opening<'_>) -> Self {
        let Opening {
            node,
            conn,
            identity,
            outbox,
            writer,
            ..
        } = opening;
        writer.push_direct(welcome(conn));
        heartbeat_from_now(node, &outbox, &identity);
        node.router.register_outside(conn, &outbox, true);
        node.router.join_group(GROUP, conn, &outbox);
        Relay {
            outbox,
            conn,
            rate: RateLimiter::new(&node.session_limits, Instant::now()),
            node: node.clone(),
            closing: false,
        }
    }

    fn conn(&self) -> ConnId {
        self.conn
    }

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn node(&self) -> &std::sync::Arc<Node> {
        &self.node
    }

    fn on_message(&mut self, binary: bool, payload: &mut [u8]) {
        if self.closing {
            return;
        }
        if let Some(rate) = self.rate.as_mut() {
            match rate.take(payload.len(), &self.node.session_limits, Instant::now()) {
                Rate::Allowed => {}
                // Nothing to answer in: the Swoole protocol has no error frame. Dropped.
                Rate::Refused => return,
                Rate::Flooding => {
                    self.closing = true;
                    self.outbox.request_close(CloseRequest {
                        code: Some(close_code::POLICY_VIOLATION),
                        flush: true,
                    });
                    return;
                }
            }
        }
        let frame = protocol::data(binary, payload);
        let delivered = self.node.router.send_to_group(GROUP, &frame, None);
        self.node
            .metrics
            .fanout_deliveries
            .increment(delivered as u64);
    }

    fn disconnect(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.node.router.leave_group(GROUP, self.conn);
        self.node.router.unregister_outside(self.conn);
        None
    }
}
