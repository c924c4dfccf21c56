//! A counter for paths that every worker thread takes often: one cache line per thread slot,
//! summed only when read.
//!
//! One `AtomicU64` shared by all workers would make every increment pull the same cache line
//! from whichever core touched it last; at one increment per socket write on a many-core host
//! that line never stops moving. Here each thread adds to its own line, and the rare reader
//! (a metrics scrape) adds the lines up.
//!
//! This module imports nothing of ours.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

/// Cells per counter. Threads beyond this share cells (still correct, just less spread).
const CELLS: usize = 32;

/// A monotonically increasing count, spread over per-thread cache lines.
pub struct ShardedCounter {
    cells: Box<[CachePadded<AtomicU64>; CELLS]>,
}

impl Default for ShardedCounter {
    fn default() -> Self {
        Self {
            cells: Box::new(std::array::from_fn(|_| CachePadded::new(AtomicU64::new(0)))),
        }
    }
}

impl std::fmt::Debug for ShardedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ShardedCounter").field(&self.get()).finish()
    }
}

thread_local! {
    /// This thread's cell, handed out round-robin on the thread's first increment.
    static CELL: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % CELLS
    };
}

impl ShardedCounter {
    /// Adds `n` to this thread's cell.
    #[inline]
    pub fn add(&self, n: u64) {
        let cell = CELL.with(|cell| *cell);
        self.cells[cell].fetch_add(n, Ordering::Relaxed);
    }

    /// The total over all cells. Increments made concurrently may or may not be included.
    pub fn get(&self) -> u64 {
        self.cells
            .iter()
            .map(|cell| cell.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn increments_from_many_threads_add_up() {
        let counter = Arc::new(ShardedCounter::default());
        let threads: Vec<_> = (0..(CELLS + 8))
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counter.add(3);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(counter.get(), 3 * 1000 * (CELLS as u64 + 8));
    }
}
