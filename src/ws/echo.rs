//! `--echo-path`: every message straight back with its opcode, through the same frame reader
//! and writer as every protocol, for conformance suites (Autobahn). No greeting, no rooms, no
//! rate limit.

use super::protocol::{Opening, Protocol};
use crate::hub::ConnId;
use crate::node::Node;
use crate::outbox::Outbox;
use crate::protocol;

/// An echo connection, in the hub's registry under `conn` so that a shutdown reaches it too.
pub struct Echo {
    outbox: Outbox,
    conn: ConnId,
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
        }
    }

    fn conn(&self) -> ConnId {
        self.conn
    }

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn on_message(&mut self, binary: bool, payload: &mut [u8]) {
        self.outbox.push(protocol::data(binary, payload));
    }

    fn disconnect(&mut self, node: &Node) -> Option<tokio::sync::oneshot::Receiver<()>> {
        node.router.unregister_outside(self.conn);
        None
    }
}
