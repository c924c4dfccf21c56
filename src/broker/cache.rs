//! Cache channels' last events on one node, for the memory broker: each channel's last event
//! and when it was kept, dropped once [`super::CACHE_TTL`] old. (Across nodes they are Redis
//! keys with that TTL: see `redis/mod.rs`.)

use std::time::Instant;

use dashmap::DashMap;
use serde_json::value::RawValue;

use super::{LastEvent, CACHE_TTL};

/// Past this many kept events, a write first drops the expired ones: the table stays bounded
/// by what was published within a TTL.
const SWEEP_ABOVE: usize = 4096;

#[derive(Default)]
pub struct LastEvents {
    events: DashMap<Box<str>, (Box<RawValue>, Instant)>,
}

impl LastEvents {
    pub fn keep(&self, group: &str, text: &RawValue) {
        let now = Instant::now();
        if self.events.len() > SWEEP_ABOVE {
            self.events
                .retain(|_, (_, kept)| now.duration_since(*kept) < CACHE_TTL);
        }
        self.events.insert(group.into(), (text.to_owned(), now));
    }

    pub fn get(&self, group: &str) -> LastEvent {
        let now = Instant::now();
        let found = self.events.get(group)?;
        let (text, kept) = &*found;
        if now.duration_since(*kept) < CACHE_TTL {
            return Some(text.clone());
        }
        drop(found);
        self.events
            .remove_if(group, |_, (_, kept)| now.duration_since(*kept) >= CACHE_TTL);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_event_kept_is_the_one_read() {
        let events = LastEvents::default();
        assert!(events.get("pusher/1001/cache-x").is_none());
        let first = RawValue::from_string(r#"{"n":1}"#.into()).unwrap();
        let second = RawValue::from_string(r#"{"n":2}"#.into()).unwrap();
        events.keep("pusher/1001/cache-x", &first);
        events.keep("pusher/1001/cache-x", &second);
        assert_eq!(
            events.get("pusher/1001/cache-x").unwrap().get(),
            r#"{"n":2}"#
        );
        assert!(events.get("pusher/1001/cache-y").is_none());
    }
}
