//! The bounded outbound queue of one connection, holding frames that are already encoded.
//!
//! The hub (fan-out) and the connection's own reader push [`Bytes`] into an [`Outbox`]; the
//! connection's writer drains everything queued and hands it to the socket in as few vectored
//! writes as the kernel accepts ("corking"): one syscall for many frames, never one per frame.
//!
//! Pushing is lock-free (a tokio bounded mpsc: atomics only, blocks of slots reused, so no
//! allocation per frame in steady state) and never waits. A full queue means a slow consumer,
//! handled by the configured [`SlowConsumerPolicy`], so one client that stops reading can
//! neither grow the server's memory nor slow down the clients around it.
//!
//! This module sits at the bottom of the crate: it imports nothing of ours.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

/// What to do with a frame for a client whose outbound queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumerPolicy {
    /// Close the connection with 1013 (Try Again Later); queued frames are discarded. The client
    /// reconnects and resynchronises, and never silently misses a message.
    Close,
    /// Drop the frame and keep the connection; counted in [`OutboxStats::dropped`].
    Drop,
}

/// Counters shared by every outbox of a server. Touched only on the rare slow-consumer path.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Frames dropped under [`SlowConsumerPolicy::Drop`].
    pub dropped: AtomicU64,
    /// Connections closed under [`SlowConsumerPolicy::Close`].
    pub closed_slow: AtomicU64,
}

/// Frames handed to one `writev` call. Enough to amortise the syscall; small enough for the
/// stack array of slices.
const IOV_PER_WRITE: usize = 64;

/// RFC 6455 close code 1013, Try Again Later: sent to a slow consumer.
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// The most frames handed to one `writev` call; Linux accepts up to 1024 (IOV_MAX).
const MAX_BATCH: usize = 256;

/// A request, from any thread, that the writer stop: send a close frame and shut the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    /// Status code for the close frame; `None` sends a close frame without a code.
    pub code: Option<u16>,
    /// Whether frames already queued are written first (drain) or discarded (slow consumer).
    pub flush: bool,
}

/// Packs a [`CloseRequest`] in one atomic word: bit 31 set = requested, bit 30 = flush,
/// bit 29 = has code, low 16 bits = code.
const CLOSE_REQUESTED: u32 = 1 << 31;
const CLOSE_FLUSH: u32 = 1 << 30;
const CLOSE_HAS_CODE: u32 = 1 << 29;

struct Shared {
    close: AtomicU32,
    wake_writer: Notify,
    policy: SlowConsumerPolicy,
    stats: Arc<OutboxStats>,
}

/// The sending side of a connection's outbound queue. Cheap to clone: the hub keeps one per
/// room membership and one in the client directory.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    shared: Arc<Shared>,
}

/// The receiving side, owned by the connection's writer.
pub struct OutboxReceiver {
    rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    /// Most frames the writer takes out of the queue at once. Frames taken out no longer count
    /// against the queue's capacity, so this is capped by the capacity: a connection holds at
    /// most twice `capacity` frames in all (queued plus being written).
    batch_limit: usize,
}

/// Creates an outbox holding at most `capacity` frames.
pub fn outbox(
    capacity: usize,
    policy: SlowConsumerPolicy,
    stats: Arc<OutboxStats>,
) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let shared = Arc::new(Shared {
        close: AtomicU32::new(0),
        wake_writer: Notify::new(),
        policy,
        stats,
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
        },
        OutboxReceiver {
            rx,
            shared,
            batch_limit: capacity.clamp(1, MAX_BATCH),
        },
    )
}

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was full and the frame was dropped (policy `drop`).
    Dropped,
    /// The queue was full and the connection is being closed (policy `close`), or it is
    /// already closing: the frame will not be delivered.
    Closing,
}

impl Outbox {
    /// Queues a frame without ever waiting. This is the per-recipient step of every fan-out:
    /// a reference-count increment on the shared frame and a lock-free enqueue.
    #[inline]
    pub fn push(&self, frame: Bytes) -> Pushed {
        match self.tx.try_send(frame) {
            Ok(()) => Pushed::Queued,
            Err(mpsc::error::TrySendError::Closed(_)) => Pushed::Closing,
            Err(mpsc::error::TrySendError::Full(_)) => self.overflow(),
        }
    }

    #[cold]
    fn overflow(&self) -> Pushed {
        match self.shared.policy {
            SlowConsumerPolicy::Drop => {
                self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                Pushed::Dropped
            }
            SlowConsumerPolicy::Close => {
                let first = self.request_close(CloseRequest {
                    code: Some(CLOSE_TRY_AGAIN_LATER),
                    flush: false,
                });
                if first {
                    self.shared
                        .stats
                        .closed_slow
                        .fetch_add(1, Ordering::Relaxed);
                }
                Pushed::Closing
            }
        }
    }

    /// Asks the writer to close the connection. Only the first request counts; returns whether
    /// this was it.
    pub fn request_close(&self, request: CloseRequest) -> bool {
        let mut word = CLOSE_REQUESTED;
        if request.flush {
            word |= CLOSE_FLUSH;
        }
        if let Some(code) = request.code {
            word |= CLOSE_HAS_CODE | u32::from(code);
        }
        let first = self
            .shared
            .close
            .compare_exchange(0, word, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.shared.wake_writer.notify_one();
        }
        first
    }

    /// Whether a close was requested (by anyone) for this connection.
    pub fn is_closing(&self) -> bool {
        self.shared.close.load(Ordering::Acquire) != 0
    }

    /// Whether two outboxes feed the same connection.
    pub fn same_connection(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// Why the writer stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum WriterExit {
    /// A close frame was written after a [`CloseRequest`].
    Closed(CloseRequest),
    /// Every [`Outbox`] was dropped without a close request.
    Abandoned,
    /// The socket failed or the peer stopped reading past the deadline.
    Failed,
}

impl OutboxReceiver {
    /// Takes the next queued frame without waiting (for tests and benches; the writer drains
    /// the queue itself).
    pub fn try_next(&mut self) -> Option<Bytes> {
        self.rx.try_recv().ok()
    }

    fn close_request(&self) -> Option<CloseRequest> {
        let word = self.shared.close.load(Ordering::Acquire);
        (word & CLOSE_REQUESTED != 0).then(|| CloseRequest {
            code: (word & CLOSE_HAS_CODE != 0).then_some(word as u16),
            flush: word & CLOSE_FLUSH != 0,
        })
    }

    /// Drains the queue into `io` until a close is requested, then writes the close frame built
    /// by `close_frame` and shuts the socket down. `linger` bounds how long the closing phase
    /// (flushing, close frame) may wait on a peer that does not read.
    pub async fn run_writer<W, F>(
        mut self,
        mut io: W,
        linger: Duration,
        close_frame: F,
    ) -> WriterExit
    where
        W: AsyncWrite + Unpin,
        F: FnOnce(Option<u16>) -> Bytes,
    {
        let mut pending = VecDeque::new();
        let exit = match self.write_until_close(&mut io, &mut pending).await {
            Ok((request, front_partial)) => {
                if request.flush {
                    while let Ok(frame) = self.rx.try_recv() {
                        pending.push_back(frame);
                    }
                } else {
                    // A slow consumer: discard what waits, but finish a frame the socket has
                    // taken part of, so the close frame that follows is still well-formed.
                    pending.truncate(usize::from(front_partial));
                }
                pending.push_back(close_frame(request.code));
                let closing = async {
                    write_frames(&mut io, &mut pending).await?;
                    io.shutdown().await
                };
                match tokio::time::timeout(linger, closing).await {
                    Ok(Ok(())) => WriterExit::Closed(request),
                    _ => WriterExit::Failed,
                }
            }
            Err(exit) => exit,
        };
        // Later pushes fail fast with `Pushed::Closing` instead of filling a dead queue.
        self.rx.close();
        exit
    }

    /// The steady state: wait for frames, write them in batches, until a close is requested.
    /// Returns the request and whether the front of `pending` is a frame the socket has taken
    /// only part of; or why it ended without a request.
    async fn write_until_close<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        pending: &mut VecDeque<Bytes>,
    ) -> Result<(CloseRequest, bool), WriterExit> {
        let mut batch: Vec<Bytes> = Vec::new();
        let mut front_partial = false;
        loop {
            if let Some(request) = self.close_request() {
                return Ok((request, front_partial));
            }
            if pending.is_empty() {
                tokio::select! {
                    biased;
                    _ = self.shared.wake_writer.notified() => continue,
                    received = self.rx.recv_many(&mut batch, self.batch_limit) => {
                        if received == 0 {
                            return Err(WriterExit::Abandoned);
                        }
                        pending.extend(batch.drain(..));
                    }
                }
            }
            // Pick up frames queued while the previous write was in flight (corking).
            while pending.len() < self.batch_limit {
                match self.rx.try_recv() {
                    Ok(frame) => pending.push_back(frame),
                    Err(_) => break,
                }
            }
            // Each `write_vectored` either writes some bytes or none, so racing it against a
            // close request never loses track of a partly written frame. The closing phase
            // then runs under the linger deadline, so a peer that stopped reading cannot hold
            // the writer forever.
            tokio::select! {
                biased;
                _ = self.shared.wake_writer.notified() => continue,
                written = write_some(io, pending) => match written {
                    Ok(0) | Err(_) => return Err(WriterExit::Failed),
                    Ok(n) => front_partial = advance(pending, n),
                }
            }
        }
    }
}

async fn write_some<W: AsyncWrite + Unpin>(
    io: &mut W,
    pending: &VecDeque<Bytes>,
) -> std::io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); IOV_PER_WRITE];
    let mut count = 0;
    for (slot, frame) in slices.iter_mut().zip(pending.iter()) {
        *slot = IoSlice::new(frame);
        count += 1;
    }
    io.write_vectored(&slices[..count]).await
}

/// Drops the frames `written` bytes completed and advances into a partly written one; returns
/// whether the new front frame is partly written.
fn advance(pending: &mut VecDeque<Bytes>, mut written: usize) -> bool {
    while let Some(front) = pending.front_mut() {
        if written >= front.len() {
            written -= front.len();
            pending.pop_front();
        } else {
            front.advance(written);
            return written > 0;
        }
    }
    false
}

async fn write_frames<W: AsyncWrite + Unpin>(
    io: &mut W,
    pending: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !pending.is_empty() {
        let n = write_some(io, pending).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        advance(pending, n);
    }
    io.flush().await
}
