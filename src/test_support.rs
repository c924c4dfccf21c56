//! Helpers the unit tests of several modules share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A waker that counts its wake-ups.
pub struct CountingWaker(pub AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
