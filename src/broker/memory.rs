//! The single-node broker: a publication is delivered straight into the local hub, with
//! nothing in between (the hot path of a one-node deployment costs one virtual call more).

use std::sync::Arc;

use super::{Broker, Delivery, Publication};
use crate::hub::Router;

/// Delivers every publication to the local hub; subscriptions need no bookkeeping.
pub struct MemoryBroker {
    hub: Arc<dyn Router>,
}

impl MemoryBroker {
    pub fn new(hub: Arc<dyn Router>) -> Self {
        Self { hub }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, publication: &Publication<'_>) -> Delivery {
        Delivery::Done(self.hub.deliver(publication))
    }

    fn subscribe(&self, _room: &str) {}

    fn unsubscribe(&self, _room: &str) {}
}
