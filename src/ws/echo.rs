//! `--echo-path`: every message straight back with its opcode, through the same frame reader
//! and writer as every protocol, for conformance suites (Autobahn). No greeting, no rooms, no
//! rate limit.

use super::protocol::{Opening, Protocol};
use crate::hub::ConnId;
use crate::node::Node;
use crate::outbox::Outbox;
use crate::protocol;
use std::sync::Arc;

/// An echo connection, in the hub's registry under `conn` so that a shutdown reaches it too.
pub struct Echo {
    outbox: Outbox,
    conn: ConnId,
    node: Arc<Node>,
}

impl Protocol for Echo {
    const NAME: &'static str = "echo";

    fn open(opening: Opening<'_>) -> Self {
        opening
            .node
            .router
            .register_outside(opening.conn, &opening.outbox, false);
        Echo {
            outbox: opening.outbox,
            conn: opening.conn,
            node: opening.node.clone(),
        }
    }

    fn conn(&self) -> ConnId {
        self.conn
    }

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn node(&self) -> &Arc<Node> {
        &self.node
    }

    fn on_message(&mut self, binary: bool, payload: &mut [u8]) {
        self.outbox.push(protocol::data(binary, payload));
    }

    fn disconnect(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.node.router.unregister_outside(self.conn);
        None
    }
}
