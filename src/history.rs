//! Per-room message history (`--history-size N` and `--history-ttl D`, both above zero to turn
//! it on): the last N room messages of each room, each for at most D, with an increasing
//! `offset` within its room and the history's `epoch`, a random string drawn when the history
//! is created, so that a history that was lost (the room idle past its TTL, the node
//! restarted) is never mistaken for the one a client saw.
//!
//! What it keeps per message is the frame that clients who opted in receive (the seed's
//! `room_message` plus `"offset"`), encoded once when the message is appended: the same bytes
//! go to the opted-in members live and to a recovering client later.
//!
//! Recovery is all or nothing: a client that says it saw offset O of epoch E gets every message
//! after O, in order, when E is still the epoch and all of them are still kept (and there are
//! at most [`HistoryConfig::max_recovery`]); otherwise nothing, and it is told so.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How much history each room keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Messages kept per room.
    pub size: usize,
    /// How long a message is kept.
    pub ttl: Duration,
    /// The most messages one recovery replays; a longer gap is not recovered.
    pub max_recovery: usize,
}

/// The history of every room: the flags' sizes, and the config file's exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPolicy {
    pub base: HistoryConfig,
    /// `[[history-rooms]]`: the first pattern a room matches decides its size and TTL.
    pub rooms: Vec<crate::config::HistoryRoom>,
}

impl HistoryPolicy {
    /// What `room` keeps; `None` for a room whose pattern says size 0.
    pub fn for_room(&self, room: &str) -> Option<HistoryConfig> {
        match self.rooms.iter().find(|rule| rule.matches(room)) {
            Some(rule) if rule.size == 0 => None,
            Some(rule) => Some(HistoryConfig {
                size: rule.size,
                ttl: rule.ttl,
                ..self.base
            }),
            None => Some(self.base),
        }
    }
}

impl From<HistoryConfig> for HistoryPolicy {
    fn from(base: HistoryConfig) -> Self {
        Self {
            base,
            rooms: Vec::new(),
        }
    }
}

/// One message kept.
struct Entry {
    offset: u64,
    at: Instant,
    /// The opted-in variant of its `room_message` frame.
    frame: Bytes,
}

/// Where a client that says what it saw stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Everything it missed, in order (possibly nothing).
    Recovered(Vec<Bytes>),
    /// Not all of it is here (another epoch, evicted, expired, too many, or an offset from the
    /// future): nothing is replayed.
    NotRecovered,
}

/// One room's history.
pub struct RoomHistory {
    epoch: Arc<str>,
    /// The last offset given (0: none yet).
    top: u64,
    entries: VecDeque<Entry>,
    /// When the last message was appended or the history created: a history idle past its TTL
    /// has nothing left and can be dropped.
    touched: Instant,
}

impl RoomHistory {
    pub fn new(now: Instant) -> Self {
        Self {
            epoch: Arc::from(format!("{:016x}", rand::random::<u64>())),
            top: 0,
            entries: VecDeque::new(),
            touched: now,
        }
    }

    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The offset of the last message appended (0 before the first).
    pub fn top(&self) -> u64 {
        self.top
    }

    /// The offset the next message gets.
    pub fn next_offset(&self) -> u64 {
        self.top + 1
    }

    /// Keeps `frame` as the message with [`RoomHistory::next_offset`], dropping what is beyond
    /// the size or older than the TTL.
    pub fn append(&mut self, frame: Bytes, now: Instant, config: &HistoryConfig) -> u64 {
        self.top += 1;
        self.entries.push_back(Entry {
            offset: self.top,
            at: now,
            frame,
        });
        while self.entries.len() > config.size {
            self.entries.pop_front();
        }
        self.expire(now, config.ttl);
        self.touched = now;
        self.top
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        while self
            .entries
            .front()
            .is_some_and(|entry| now.duration_since(entry.at) > ttl)
        {
            self.entries.pop_front();
        }
    }

    /// Whether nothing is left and nothing was added for a TTL: the history can be dropped
    /// (a new one, with a new epoch, starts with the room's next message).
    pub fn is_idle(&mut self, now: Instant, ttl: Duration) -> bool {
        self.expire(now, ttl);
        self.entries.is_empty() && now.duration_since(self.touched) > ttl
    }

    /// What a client that saw `offset` of `epoch` missed.
    pub fn since(
        &mut self,
        offset: u64,
        epoch: &str,
        now: Instant,
        config: &HistoryConfig,
    ) -> Recovery {
        self.expire(now, config.ttl);
        if epoch != &*self.epoch || offset > self.top {
            return Recovery::NotRecovered;
        }
        let missed = self.top - offset;
        if missed == 0 {
            return Recovery::Recovered(Vec::new());
        }
        if missed > config.max_recovery as u64 {
            return Recovery::NotRecovered;
        }
        match self.entries.front() {
            Some(first) if first.offset <= offset + 1 => {}
            _ => return Recovery::NotRecovered,
        }
        let frames = self
            .entries
            .iter()
            .filter(|entry| entry.offset > offset)
            .map(|entry| entry.frame.clone())
            .collect();
        Recovery::Recovered(frames)
    }

    /// The last `limit` messages kept, oldest first, as their frames.
    pub fn last(&mut self, limit: usize, now: Instant, ttl: Duration) -> Vec<Bytes> {
        self.expire(now, ttl);
        let skip = self.entries.len().saturating_sub(limit);
        self.entries
            .iter()
            .skip(skip)
            .map(|entry| entry.frame.clone())
            .collect()
    }

    /// The first `limit` messages kept after offset `since`, oldest first (a page forward).
    pub fn after(&mut self, since: u64, limit: usize, now: Instant, ttl: Duration) -> Vec<Bytes> {
        self.expire(now, ttl);
        self.entries
            .iter()
            .filter(|entry| entry.offset > since)
            .take(limit)
            .map(|entry| entry.frame.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: HistoryConfig = HistoryConfig {
        size: 3,
        ttl: Duration::from_secs(60),
        max_recovery: 2,
    };

    fn filled(count: u64, now: Instant) -> RoomHistory {
        let mut history = RoomHistory::new(now);
        for n in 1..=count {
            history.append(Bytes::from(n.to_string()), now, &CONFIG);
        }
        history
    }

    fn frames(recovery: Recovery) -> Vec<String> {
        match recovery {
            Recovery::Recovered(frames) => frames
                .iter()
                .map(|f| String::from_utf8(f.to_vec()).unwrap())
                .collect(),
            Recovery::NotRecovered => panic!("not recovered"),
        }
    }

    #[test]
    fn offsets_increase_from_one_and_the_newest_are_kept() {
        let now = Instant::now();
        let mut history = filled(5, now);
        assert_eq!(history.top(), 5);
        let kept: Vec<_> = history.last(10, now, CONFIG.ttl);
        assert_eq!(kept, ["3", "4", "5"].map(Bytes::from));
    }

    #[test]
    fn a_gap_within_the_history_is_recovered_in_order() {
        let now = Instant::now();
        let mut history = filled(4, now);
        let epoch = history.epoch().clone();
        assert_eq!(frames(history.since(2, &epoch, now, &CONFIG)), ["3", "4"]);
        assert_eq!(
            frames(history.since(4, &epoch, now, &CONFIG)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn recovery_is_never_partial() {
        let now = Instant::now();
        let mut history = filled(6, now);
        let epoch = history.epoch().clone();
        // Evicted: 3 is gone (size 3 keeps 4..6), and 3 messages are over max_recovery anyway.
        assert_eq!(
            history.since(2, &epoch, now, &CONFIG),
            Recovery::NotRecovered
        );
        // Another epoch, or an offset from the future.
        assert_eq!(
            history.since(5, "other", now, &CONFIG),
            Recovery::NotRecovered
        );
        assert_eq!(
            history.since(7, &epoch, now, &CONFIG),
            Recovery::NotRecovered
        );
        // More than max_recovery, though all kept.
        let big = HistoryConfig { size: 10, ..CONFIG };
        let mut history = RoomHistory::new(now);
        for n in 0..5 {
            history.append(Bytes::from(n.to_string()), now, &big);
        }
        let epoch = history.epoch().clone();
        assert_eq!(history.since(1, &epoch, now, &big), Recovery::NotRecovered);
    }

    #[test]
    fn expired_messages_are_not_recovered_and_an_idle_history_can_go() {
        let start = Instant::now();
        let mut history = filled(2, start);
        let epoch = history.epoch().clone();
        let later = start + CONFIG.ttl + Duration::from_secs(1);
        assert_eq!(
            history.since(1, &epoch, later, &CONFIG),
            Recovery::NotRecovered
        );
        assert!(history.last(10, later, CONFIG.ttl).is_empty());
        assert!(history.is_idle(later, CONFIG.ttl));
        assert!(!filled(1, start).is_idle(start, CONFIG.ttl));
    }
}
