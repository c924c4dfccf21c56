//! User authentication (`pusher:signin`): which of this node's connections are signed in as
//! which user of which app, so that `POST /apps/{id}/users/{user}/terminate_connections` can
//! close them (on every node: the API asks the others through the broker), and a connection
//! may subscribe to its own user's `#server-to-user-{id}` channel only.

use dashmap::DashMap;

use super::wire::{self, code};
use crate::hub::ConnId;
use crate::outbox::{CloseRequest, Outbox};

/// The channel Pusher sends a user's own events on (`sendToUser`).
pub const SERVER_TO_USER: &str = "#server-to-user-";

/// An app (by its index) and one of its user ids.
type AppUser = (u16, Box<str>);

/// Signed-in connections of this node, by app and user id.
#[derive(Default)]
pub struct Users {
    signed_in: DashMap<AppUser, Vec<(ConnId, Outbox)>>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("signed_in", &self.signed_in.len())
            .finish()
    }
}

impl Users {
    pub fn sign_in(&self, app: u16, user: &str, conn: ConnId, outbox: &Outbox) {
        let mut connections = self.signed_in.entry((app, user.into())).or_default();
        if !connections.iter().any(|(known, _)| *known == conn) {
            connections.push((conn, outbox.clone()));
        }
    }

    pub fn sign_out(&self, app: u16, user: &str, conn: ConnId) {
        let key = (app, Box::from(user));
        if let Some(mut connections) = self.signed_in.get_mut(&key) {
            connections.retain(|(known, _)| *known != conn);
        }
        self.signed_in
            .remove_if(&key, |_, connections| connections.is_empty());
    }

    /// Closes this node's connections of `user` of `app`: `pusher:error` 4009, then the close
    /// (pusher-js does not reconnect after a 4000-4099 code). Returns how many.
    pub fn terminate(&self, app: u16, user: &str) -> usize {
        let Some((_, connections)) = self.signed_in.remove(&(app, Box::from(user))) else {
            return 0;
        };
        for (_, outbox) in &connections {
            outbox.push(wire::error(
                code::UNAUTHORIZED,
                "Connection terminated: the app ended this user's connections",
            ));
            outbox.request_close(CloseRequest {
                code: Some(code::UNAUTHORIZED),
                flush: true,
            });
        }
        connections.len()
    }
}

/// The user whose `#server-to-user-` channel `channel` is, if it is one.
pub fn server_to_user(channel: &str) -> Option<&str> {
    channel.strip_prefix(SERVER_TO_USER)
}
