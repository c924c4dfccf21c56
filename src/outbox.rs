//! The bounded outbound queue of one connection, holding frames that are already encoded.
//!
//! The hub (fan-out) and the connection's own reader push [`Bytes`] into an [`Outbox`]; the
//! connection task drains everything queued and hands it to the socket in as few vectored
//! writes as the kernel accepts ("corking"): one syscall for many frames, never one per frame.
//!
//! Pushing is lock-free (a tokio bounded mpsc: atomics only, blocks of slots reused, so no
//! allocation per frame in steady state) and never waits. The queue is created by the first
//! push: the welcome and heartbeat pings bypass it ([`OutboxReceiver::push_direct`],
//! [`Outbox::request_ping`]), so a connection nobody sends anything owns none (~0.8 KiB less
//! per idle connection). The queue is bounded twice, in frames
//! and in bytes ([`QueueLimits`]): many small frames or a few large ones. A full queue means a
//! slow consumer, handled by the configured [`SlowConsumerPolicy`], so one client that stops
//! reading can neither grow the server's memory nor slow down the clients around it.
//!
//! The draining side is poll-based ([`OutboxReceiver::poll_flush`]) so that one task per
//! connection can read and write without a second task, and an idle connection holds no write
//! buffer: frames are gathered in a per-thread batch and only what the socket refuses is kept.
//!
//! This module sits near the bottom of the crate: it imports only [`crate::counter`].

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;

use crate::counter::ShardedCounter;

/// A queued frame: the encoded frame behind one more pointer. Why not `Bytes` itself: the
/// queue's storage is allocated per connection in blocks of 32 slots, and an 8-byte slot
/// instead of a 32-byte one halves what every connection's queue costs (1.8 -> 0.9 KiB
/// measured). A fan-out wraps its frame once and clones the `Arc` per recipient.
pub type SharedFrame = Arc<OutFrame>;

/// One frame as every recipient shares it, and its compressed form (permessage-deflate), made
/// by the first recipient that compresses and then shared by all the others that do: a
/// fan-out's frame is compressed at most once.
pub struct OutFrame {
    frame: Bytes,
    compressed: OnceLock<Bytes>,
}

impl OutFrame {
    /// The frame, shared.
    pub fn shared(frame: Bytes) -> SharedFrame {
        Arc::new(OutFrame {
            frame,
            compressed: OnceLock::new(),
        })
    }

    /// The bytes a connection sends for this frame: the frame itself (a reference-count
    /// increment), or, when it compresses frames from `compress_from` payload bytes (not
    /// `u32::MAX`), see [`OutFrame::for_compressing`].
    #[inline]
    fn as_sent(&self, compress_from: u32, stats: &OutboxStats) -> Bytes {
        if compress_from == u32::MAX {
            self.frame.clone()
        } else {
            self.for_compressing(compress_from as usize, stats)
        }
    }

    /// The bytes to send to a recipient that compresses frames of at least `min_size` payload
    /// bytes: the compressed frame when that is smaller, else the frame.
    fn for_compressing(&self, min_size: usize, stats: &OutboxStats) -> Bytes {
        self.compressed
            .get_or_init(
                || match crate::ws::deflate::compressed_frame(&self.frame, min_size) {
                    Some(compressed) => {
                        stats.frames_compressed.fetch_add(1, Ordering::Relaxed);
                        compressed
                    }
                    None => self.frame.clone(),
                },
            )
            .clone()
    }
}

impl std::ops::Deref for OutFrame {
    type Target = Bytes;

    fn deref(&self) -> &Bytes {
        &self.frame
    }
}

/// How much may wait in one connection's queue before it counts as a slow consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Frames waiting, whatever their size.
    pub frames: usize,
    /// Bytes of the frames waiting, counted per connection even when a fan-out frame is shared
    /// (it measures how far behind the client is). A frame larger than this still goes through
    /// when nothing else waits, so every message the server accepts can be delivered.
    pub bytes: usize,
}

impl QueueLimits {
    /// A bound in frames alone.
    pub fn frames(frames: usize) -> Self {
        Self {
            frames,
            bytes: usize::MAX,
        }
    }
}

/// What to do with a frame for a client whose outbound queue is full.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumerPolicy {
    /// Close the connection with 1013 (Try Again Later); queued frames are discarded. The client
    /// reconnects and resynchronises, and never silently misses a message.
    Close,
    /// Drop the frame and keep the connection; the drop is counted.
    Drop,
}

/// Counters shared by every outbox of a server: `frames_written` once per socket write (spread
/// over per-thread cache lines), the others only on the rare slow-consumer path.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Frames dropped under [`SlowConsumerPolicy::Drop`].
    pub dropped: AtomicU64,
    /// Connections closed under [`SlowConsumerPolicy::Close`].
    pub closed_slow: AtomicU64,
    /// Frames written to sockets completely; added once per write syscall.
    pub frames_written: ShardedCounter,
    /// Frames compressed (permessage-deflate): once per frame, however many recipients
    /// share the compressed bytes.
    pub frames_compressed: AtomicU64,
}

/// Frames handed to one `writev` call: enough to amortise the syscall, few enough for a stack
/// array of slices. Linux accepts up to 1024 (IOV_MAX).
const IOV_PER_WRITE: usize = 64;

/// RFC 6455 close code 1013, Try Again Later: sent to a slow consumer.
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// The most frames taken out of one queue at once.
const MAX_BATCH: usize = 256;

/// A batch stops taking frames once it holds this many bytes: a socket's send buffer takes no
/// more in one write, and what the socket refuses stays with the connection, outside the
/// queue's byte bound; this caps that part.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// How many batches one [`OutboxReceiver::poll_flush`] writes before it yields, so a connection
/// whose queue refills as fast as it drains cannot monopolise a worker thread.
const BATCHES_PER_POLL: usize = 4;

/// A request, from any thread, that the connection close: send a close frame and shut the
/// socket.
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
    /// The queue itself, created by the first push: a connection nobody has sent anything
    /// (its own welcome is written without it) owns no queue. Set once, never replaced, so a
    /// push reads it with one atomic load.
    queue: OnceLock<mpsc::Sender<SharedFrame>>,
    /// The queue's receiving end, from its creation until the connection's task takes it.
    /// Locked once per connection, never on the per-frame path.
    receiver: Mutex<Option<mpsc::Receiver<SharedFrame>>>,
    /// Frames the queue holds at most.
    capacity: usize,
    /// Set by the heartbeat; the task then writes a ping itself, so that pinging an idle
    /// connection does not create its queue.
    ping_requested: AtomicBool,
    close: AtomicU32,
    /// Wakes the connection task when a close is requested, and when the first push creates
    /// the queue (later frames wake it through the queue).
    close_waker: AtomicWaker,
    policy: SlowConsumerPolicy,
    stats: Arc<OutboxStats>,
    /// Bytes of the frames in the queue: added before a push, taken off when the writer takes
    /// the frame out, so it never goes below zero.
    queued_bytes: AtomicUsize,
    byte_limit: usize,
    /// When the peer was last heard from, on the heartbeat's coarse clock (milliseconds).
    last_seen: AtomicU32,
    /// When the connection's token expires (Unix seconds); 0 for never.
    expires_at: AtomicU64,
}

impl Shared {
    /// Creates the queue (on the first push) and parks its receiving end for the task.
    fn create_queue(&self) -> mpsc::Sender<SharedFrame> {
        let (tx, rx) = mpsc::channel(self.capacity);
        *self.receiver.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
        tx
    }
}

/// The sending side of a connection's outbound queue. Cheap to clone: the hub keeps one per
/// room membership and one in the client directory.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The receiving side, owned by the connection task.
pub struct OutboxReceiver {
    /// The queue's receiving end, once the first push created it.
    rx: Option<mpsc::Receiver<SharedFrame>>,
    shared: Arc<Shared>,
    /// Most frames taken out of the queue at once. Frames taken out no longer count against
    /// the queue's limits, so this is capped by the frame limit (and a batch by
    /// [`MAX_BATCH_BYTES`]): a connection holds at most twice its frame limit in all, and its
    /// byte limit plus one batch (queued plus being written).
    batch_limit: u32,
    /// Frames the socket has not taken yet. Empty, and without an allocation, unless the peer
    /// reads slower than we write.
    unsent: Unsent,
    /// Whether the front of `unsent` must be kept by a close that drops the rest: a frame the
    /// socket has taken only part of, or the handshake's 101 response.
    front_partial: bool,
    /// Whether bytes were written since the last flush. A TLS stream takes frames into its
    /// own buffer and reports them written before they reach the socket; only `poll_flush`
    /// pushes them on, so it must run before the connection goes idle.
    needs_flush: bool,
    /// permessage-deflate: the smallest payload sent compressed (`u32::MAX`: none, the
    /// connection did not negotiate it).
    compress_from: u32,
}

impl Drop for OutboxReceiver {
    /// Closes the queue, creating it if no push has: pushes that come after (from a fan-out
    /// still holding a clone of the outbox) are refused with `Pushed::Closing` instead of
    /// filling a queue nobody reads.
    fn drop(&mut self) {
        self.shared.queue.get_or_init(|| self.shared.create_queue());
        // Dropping a receiver closes its channel; one still parked was never taken.
        drop(
            self.shared
                .receiver
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        if let Some(rx) = self.rx.as_mut() {
            rx.close();
        }
    }
}

/// The frames a connection's socket has not taken yet: one pointer while there are none (an
/// idle connection's case, and every connection's outbound state counts), the deque on the
/// heap only while frames wait. Reads see an empty deque when there is none; a mutable
/// access creates it.
#[derive(Default)]
// The box is the point: one pointer where a bare deque takes four words.
#[allow(clippy::box_collection)]
struct Unsent(Option<Box<VecDeque<Bytes>>>);

impl Unsent {
    /// Frees the deque once it is empty.
    fn release(&mut self) {
        if self.0.as_ref().is_some_and(|frames| frames.is_empty()) {
            self.0 = None;
        }
    }

    #[cfg(test)]
    fn is_allocated(&self) -> bool {
        self.0.is_some()
    }
}

impl std::ops::Deref for Unsent {
    type Target = VecDeque<Bytes>;

    fn deref(&self) -> &VecDeque<Bytes> {
        static NONE: VecDeque<Bytes> = VecDeque::new();
        self.0.as_deref().unwrap_or(&NONE)
    }
}

impl std::ops::DerefMut for Unsent {
    fn deref_mut(&mut self) -> &mut VecDeque<Bytes> {
        self.0.get_or_insert_with(Box::default)
    }
}

thread_local! {
    // The batch a flush gathers from a queue before one vectored write. Per thread, not per
    // connection: an idle connection owns no write buffer.
    static BATCH: RefCell<VecDeque<Bytes>> = RefCell::new(VecDeque::with_capacity(MAX_BATCH));
}

/// Creates an outbox holding at most `limits` (in frames and in bytes).
pub fn outbox(
    limits: QueueLimits,
    policy: SlowConsumerPolicy,
    stats: Arc<OutboxStats>,
) -> (Outbox, OutboxReceiver) {
    let capacity = limits.frames.max(1);
    let shared = Arc::new(Shared {
        queue: OnceLock::new(),
        receiver: Mutex::new(None),
        capacity,
        ping_requested: AtomicBool::new(false),
        close: AtomicU32::new(0),
        close_waker: AtomicWaker::new(),
        policy,
        stats,
        queued_bytes: AtomicUsize::new(0),
        byte_limit: limits.bytes.max(1),
        last_seen: AtomicU32::new(0),
        expires_at: AtomicU64::new(0),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReceiver {
            rx: None,
            shared,
            batch_limit: capacity.clamp(1, MAX_BATCH) as u32,
            unsent: Unsent::default(),
            front_partial: false,
            needs_flush: false,
            compress_from: u32::MAX,
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
    /// Queues a frame for this connection alone (a reply, a pong, a private message).
    #[inline]
    pub fn push(&self, frame: Bytes) -> Pushed {
        self.push_shared(OutFrame::shared(frame))
    }

    /// Queues a frame shared with other recipients without ever waiting. This is the
    /// per-recipient step of every fan-out: a reference-count increment on the shared frame,
    /// one atomic add on this connection's byte count and a lock-free enqueue.
    #[inline]
    pub fn push_shared(&self, frame: SharedFrame) -> Pushed {
        let len = frame.len();
        let before = self.shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before.saturating_add(len) > self.shared.byte_limit {
            self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return self.overflow();
        }
        let mut created = false;
        let queue = self.shared.queue.get_or_init(|| {
            created = true;
            self.shared.create_queue()
        });
        let sent = queue.try_send(frame);
        if created {
            // The task has never polled this queue: tell it through the waker it does poll.
            self.shared.close_waker.wake();
        }
        match sent {
            Ok(()) => Pushed::Queued,
            Err(error) => {
                self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                match error {
                    mpsc::error::TrySendError::Closed(_) => Pushed::Closing,
                    mpsc::error::TrySendError::Full(_) => self.overflow(),
                }
            }
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

    /// Asks the connection to close. Only the first request counts; returns whether this was
    /// it.
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
            self.shared.close_waker.wake();
        }
        first
    }

    /// Frames waiting in the queue (not counting those the writer has taken out).
    pub fn queued(&self) -> usize {
        self.shared
            .queue
            .get()
            .map_or(0, |queue| queue.max_capacity() - queue.capacity())
    }

    /// Bytes of the frames waiting in the queue (not counting those the writer has taken out).
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Relaxed)
    }

    /// Asks the connection's task to send a ping (the heartbeat's). Wakes the task through
    /// the close waker; no frame is queued.
    pub fn request_ping(&self) {
        self.shared.ping_requested.store(true, Ordering::Release);
        self.shared.close_waker.wake();
    }

    /// Records that the peer was heard from at `now` (the heartbeat's coarse clock).
    #[inline]
    pub fn touch(&self, now: u32) {
        self.shared.last_seen.store(now, Ordering::Relaxed);
    }

    /// When the peer was last heard from (see [`touch`](Self::touch)).
    pub fn last_seen(&self) -> u32 {
        self.shared.last_seen.load(Ordering::Relaxed)
    }

    /// Sets when the connection's token expires (Unix seconds).
    pub fn set_expires_at(&self, unix_seconds: u64) {
        self.shared
            .expires_at
            .store(unix_seconds, Ordering::Relaxed);
    }

    /// When the connection's token expires (Unix seconds), if it does.
    pub fn expires_at(&self) -> Option<u64> {
        Some(self.shared.expires_at.load(Ordering::Relaxed)).filter(|&at| at != 0)
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

impl OutboxReceiver {
    /// The connection negotiated permessage-deflate: queued frames of at least `min_size`
    /// payload bytes go out compressed (the handshake response, the welcome and pings, written
    /// outside the queue, do not).
    pub fn compress_from(&mut self, min_size: usize) {
        self.compress_from = u32::try_from(min_size).unwrap_or(u32::MAX - 1);
    }

    /// Takes the next queued frame without waiting (for tests and benches), as the socket
    /// would get it (compressed, when the connection compresses and the frame qualifies).
    pub fn try_next(&mut self) -> Option<Bytes> {
        self.take_queue_once_created();
        let frame = self.rx.as_mut()?.try_recv().ok()?;
        self.taken_bytes(frame.len());
        Some(frame.as_sent(self.compress_from, &self.shared.stats))
    }

    /// Queues a frame of the connection's own task ahead of everything still in the queue,
    /// without creating the queue: the welcome (written before anyone else can reach the
    /// connection) and heartbeat pings (control frames may go between messages). A connection
    /// that is sent nothing else never allocates a queue.
    pub fn push_direct(&mut self, frame: Bytes) {
        self.unsent.push_back(frame);
    }

    /// Queues the HTTP 101 that completes the upgrade, ahead of everything, so it leaves in
    /// the connection's first write with the welcome. It counts as begun (see
    /// `front_partial`): a close, even one that drops what is queued (a slow consumer closed
    /// before the first write), still sends it first, or the client would read a close frame
    /// where it expects an HTTP response.
    pub fn push_handshake_response(&mut self, response: Bytes) {
        self.unsent.push_front(response);
        self.front_partial = true;
    }

    /// Queues `ping` (see [`push_direct`](Self::push_direct)) if the heartbeat asked for one
    /// since the last call ([`Outbox::request_ping`]) and the socket has taken everything
    /// before it. A connection whose socket is backed up gets no ping: it is not idle, and
    /// pings must not pile up outside the queue's bounds.
    #[inline]
    pub fn queue_requested_ping(&mut self, ping: impl FnOnce() -> Bytes) {
        let requested = self.shared.ping_requested.load(Ordering::Relaxed)
            && self.shared.ping_requested.swap(false, Ordering::AcqRel);
        if requested && self.unsent.is_empty() {
            self.unsent.push_back(ping());
        }
    }

    /// Takes the queue's receiving end once the first push has created it. One atomic load
    /// while there is no queue; the lock is taken once per connection.
    #[inline]
    fn take_queue_once_created(&mut self) {
        if self.rx.is_none() && self.shared.queue.get().is_some() {
            self.rx = self
                .shared
                .receiver
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
    }

    /// Frames of `bytes` bytes left the queue: they no longer count against its byte bound.
    #[inline]
    fn taken_bytes(&self, bytes: usize) {
        self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The close request made for this connection, if any. Registers the task to be woken by
    /// a later one.
    pub fn poll_close_request(&self, cx: &mut Context<'_>) -> Option<CloseRequest> {
        if let Some(request) = self.close_request() {
            return Some(request);
        }
        self.shared.close_waker.register(cx.waker());
        self.close_request()
    }

    fn close_request(&self) -> Option<CloseRequest> {
        let word = self.shared.close.load(Ordering::Acquire);
        (word & CLOSE_REQUESTED != 0).then(|| CloseRequest {
            code: (word & CLOSE_HAS_CODE != 0).then_some(word as u16),
            flush: word & CLOSE_FLUSH != 0,
        })
    }

    /// Writes queued frames to `io`, many per vectored write, until the queue is empty
    /// (`Ready(Ok(()))`: idle, woken by the next frame, or by the push that creates the queue
    /// through the close waker, which [`poll_close_request`](Self::poll_close_request) must
    /// have registered first) or the socket is full (`Pending`, woken when it drains or when a
    /// frame arrives).
    pub fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut W,
    ) -> Poll<std::io::Result<()>> {
        // Frames the socket refused last time go first.
        ready!(self.poll_write_unsent(cx, io))?;
        // The slow spell (or the welcome) is over: give the memory back.
        self.unsent.release();
        for _ in 0..BATCHES_PER_POLL {
            let outcome = BATCH.with(|batch| {
                let mut batch = batch.borrow_mut();
                let result = self.write_one_batch(cx, io, &mut batch);
                // Whatever the socket did not take stays with this connection.
                if !batch.is_empty() {
                    self.unsent.extend(batch.drain(..));
                }
                result
            });
            match outcome {
                BatchOutcome::Written => continue,
                BatchOutcome::Empty => {
                    if self.needs_flush {
                        // Pending: the stream keeps bytes it could not pass on yet, and has
                        // registered to be woken when it can.
                        match Pin::new(&mut *io).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.needs_flush = false,
                            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                BatchOutcome::SocketFull => return Poll::Pending,
                BatchOutcome::Failed(error) => return Poll::Ready(Err(error)),
            }
        }
        // More keeps coming: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn write_one_batch<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut W,
        batch: &mut VecDeque<Bytes>,
    ) -> BatchOutcome {
        self.take_queue_once_created();
        let Some(rx) = self.rx.as_mut() else {
            return BatchOutcome::Empty;
        };
        let mut batch_bytes = 0;
        while batch.len() < self.batch_limit as usize && batch_bytes < MAX_BATCH_BYTES {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(frame)) => {
                    // Counted as queued: the frame's own length.
                    batch_bytes += frame.len();
                    batch.push_back(frame.as_sent(self.compress_from, &self.shared.stats));
                }
                // Closed: only `begin_close` closes it, and nothing flushes after that (the
                // sending end lives as long as this receiver, in `Shared`).
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if batch.is_empty() {
            return BatchOutcome::Empty;
        }
        // Once per batch, not per frame.
        self.taken_bytes(batch_bytes);
        while !batch.is_empty() {
            match poll_write_some(cx, io, batch) {
                Poll::Ready(Ok(n)) => self.wrote(n, Some(batch)),
                Poll::Ready(Err(error)) => return BatchOutcome::Failed(error),
                Poll::Pending => return BatchOutcome::SocketFull,
            }
        }
        BatchOutcome::Written
    }

    /// Accounts for `n` bytes written from `batch` (or from `unsent` when `None`).
    fn wrote(&mut self, n: usize, batch: Option<&mut VecDeque<Bytes>>) {
        self.needs_flush = true;
        let frames = match batch {
            Some(batch) => batch,
            None => &mut self.unsent,
        };
        let (partial, completed) = advance(frames, n);
        self.front_partial = partial;
        if completed > 0 {
            self.shared.stats.frames_written.add(completed);
        }
    }

    /// Starts the closing phase: stops the queue, keeps what must still be written (everything
    /// queued when `request.flush`, else only a partly written frame, so the stream stays
    /// well-formed) and appends `close_frame`. Then [`poll_finish`](Self::poll_finish).
    pub fn begin_close(&mut self, request: CloseRequest, close_frame: Bytes) {
        // Later pushes fail fast with `Pushed::Closing` instead of filling a dead queue; a
        // queue no push has created yet is created here, closed.
        self.shared.queue.get_or_init(|| self.shared.create_queue());
        self.take_queue_once_created();
        // Always Some here: the queue exists and this is its only receiver.
        if let Some(rx) = self.rx.as_mut() {
            rx.close();
            if request.flush {
                while let Ok(frame) = rx.try_recv() {
                    self.shared
                        .queued_bytes
                        .fetch_sub(frame.len(), Ordering::Relaxed);
                    self.unsent.push_back(Bytes::clone(&frame));
                }
            }
        }
        if !request.flush {
            self.unsent.truncate(usize::from(self.front_partial));
        }
        self.unsent.push_back(close_frame);
    }

    /// Writes `unsent` (frames the socket refused before, the welcome, pings, what a close
    /// keeps) until it is empty or the socket is full.
    fn poll_write_unsent<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut W,
    ) -> Poll<std::io::Result<()>> {
        while !self.unsent.is_empty() {
            let n = ready!(poll_write_some(cx, io, &self.unsent))?;
            self.wrote(n, None);
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what [`begin_close`](Self::begin_close) kept, then shuts the write side down.
    pub fn poll_finish<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut W,
    ) -> Poll<std::io::Result<()>> {
        ready!(self.poll_write_unsent(cx, io))?;
        match Pin::new(&mut *io).poll_flush(cx) {
            Poll::Ready(Ok(())) => Pin::new(io).poll_shutdown(cx),
            other => other,
        }
    }
}

enum BatchOutcome {
    Written,
    Empty,
    SocketFull,
    Failed(std::io::Error),
}

/// One vectored write of the frames at the front of `frames`. A write of zero bytes is an
/// error: the peer is gone.
fn poll_write_some<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    io: &mut W,
    frames: &VecDeque<Bytes>,
) -> Poll<std::io::Result<usize>> {
    let mut slices = [IoSlice::new(&[]); IOV_PER_WRITE];
    let mut count = 0;
    for (slot, frame) in slices.iter_mut().zip(frames.iter()) {
        *slot = IoSlice::new(frame);
        count += 1;
    }
    match Pin::new(io).poll_write_vectored(cx, &slices[..count]) {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
        other => other,
    }
}

/// Drops the frames `written` bytes completed and advances into a partly written one; returns
/// whether the new front frame is partly written, and how many frames were completed.
fn advance(pending: &mut VecDeque<Bytes>, mut written: usize) -> (bool, u64) {
    let mut completed = 0;
    while let Some(front) = pending.front_mut() {
        if written >= front.len() {
            written -= front.len();
            pending.pop_front();
            completed += 1;
        } else {
            front.advance(written);
            return (written > 0, completed);
        }
    }
    (false, completed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::CountingWaker;

    fn frames(list: &[&'static [u8]]) -> VecDeque<Bytes> {
        list.iter().map(|b| Bytes::from_static(b)).collect()
    }

    #[test]
    fn advance_drops_whole_frames_and_splits_a_partial_one() {
        let mut pending = frames(&[b"abc", b"de", b"fgh"]);
        assert_eq!(advance(&mut pending, 4), (true, 1));
        assert_eq!(pending, frames(&[b"e", b"fgh"]));
        assert_eq!(advance(&mut pending, 1), (false, 1));
        assert_eq!(pending, frames(&[b"fgh"]));
        assert_eq!(advance(&mut pending, 3), (false, 1));
        assert!(pending.is_empty());
    }

    /// A writer that takes at most `limit` bytes per call and records each call.
    struct Recorder {
        calls: usize,
        data: Vec<u8>,
        limit: usize,
    }

    impl Recorder {
        /// A socket that takes up to `limit` bytes per write.
        fn taking(limit: usize) -> Self {
            Self {
                calls: 0,
                data: Vec::new(),
                limit,
            }
        }
    }

    /// Flushes with a no-op waker and expects the queue to end up written and idle.
    fn flush_idle(rx: &mut OutboxReceiver, io: &mut Recorder) {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(rx.poll_flush(&mut cx, io), Poll::Ready(Ok(()))));
    }

    /// An outbox bounded in frames only.
    fn frames_only(frames: usize, policy: SlowConsumerPolicy) -> (Outbox, OutboxReceiver) {
        outbox(QueueLimits::frames(frames), policy, Arc::default())
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            let n = buf.len().min(self.limit);
            self.data.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.limit - n);
                self.data.extend_from_slice(&buf[..take]);
                n += take;
                if n == self.limit {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn many_queued_frames_leave_in_one_vectored_write() {
        let (tx, mut rx) = frames_only(1024, SlowConsumerPolicy::Close);
        for i in 0..50u8 {
            tx.push(Bytes::from(vec![i; 10]));
        }
        let mut io = Recorder::taking(usize::MAX);
        flush_idle(&mut rx, &mut io);
        assert_eq!(io.calls, 1, "50 frames, one syscall");
        assert_eq!(io.data.len(), 500);
    }

    #[test]
    fn a_slow_consumer_close_finishes_the_partly_written_frame_first() {
        let (tx, mut rx) = frames_only(8, SlowConsumerPolicy::Close);
        tx.push(Bytes::from_static(b"0123456789"));
        tx.push(Bytes::from_static(b"abcdefghij"));
        // The socket takes 4 bytes, then nothing.
        let mut io = Recorder::taking(4);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let _ = poll_write_some(&mut cx, &mut io, &frames(&[]));
        *rx.unsent = frames(&[b"0123456789", b"abcdefghij"]);
        rx.front_partial = advance(&mut rx.unsent, 4).0;
        rx.begin_close(
            CloseRequest {
                code: Some(1013),
                flush: false,
            },
            Bytes::from_static(b"CLOSE"),
        );
        io.limit = usize::MAX;
        io.data.clear();
        assert!(matches!(
            rx.poll_finish(&mut cx, &mut io),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.data, b"456789CLOSE");
        assert_eq!(tx.push(Bytes::from_static(b"late")), Pushed::Closing);
    }

    #[test]
    fn the_queue_is_created_by_the_first_push_which_wakes_the_task() {
        let (tx, mut rx) = frames_only(8, SlowConsumerPolicy::Close);
        let wakes = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = Recorder::taking(usize::MAX);
        // The welcome goes out without a queue; the task idles, registered on the close waker.
        rx.push_direct(Bytes::from_static(b"welcome"));
        assert_eq!(rx.poll_close_request(&mut cx), None);
        assert!(matches!(
            rx.poll_flush(&mut cx, &mut io),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.data, b"welcome");
        assert!(tx.shared.queue.get().is_none(), "no queue yet");
        assert!(!rx.unsent.is_allocated(), "nothing kept after the welcome");

        assert_eq!(tx.push(Bytes::from_static(b"first")), Pushed::Queued);
        assert!(tx.shared.queue.get().is_some());
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "the creating push woke the task"
        );
        assert_eq!(tx.push(Bytes::from_static(b"second")), Pushed::Queued);
        assert!(matches!(
            rx.poll_flush(&mut cx, &mut io),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.data, b"welcomefirstsecond");
    }

    #[test]
    fn a_ping_request_wakes_the_task_once_and_creates_no_queue() {
        let (tx, mut rx) = frames_only(8, SlowConsumerPolicy::Close);
        let wakes = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(rx.poll_close_request(&mut cx), None);
        rx.queue_requested_ping(|| Bytes::from_static(b"PING"));
        assert!(rx.unsent.is_empty(), "no request, no ping");
        tx.request_ping();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        rx.queue_requested_ping(|| Bytes::from_static(b"PING"));
        rx.queue_requested_ping(|| Bytes::from_static(b"PING"));
        assert_eq!(*rx.unsent, frames(&[b"PING"]), "one request, one ping");
        assert!(tx.shared.queue.get().is_none());
    }

    /// A writer whose socket never takes anything.
    struct Stuck;

    impl AsyncWrite for Stuck {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    #[test]
    fn pings_do_not_pile_up_behind_a_socket_that_takes_nothing() {
        let (tx, mut rx) = frames_only(8, SlowConsumerPolicy::Drop);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        rx.push_direct(Bytes::from_static(b"welcome"));
        for _ in 0..1000 {
            tx.request_ping();
            rx.queue_requested_ping(|| Bytes::from_static(b"PING"));
            assert!(rx.poll_flush(&mut cx, &mut Stuck).is_pending());
        }
        assert_eq!(rx.unsent.len(), 1, "only the welcome waits");
    }

    #[test]
    fn pushes_after_the_task_is_gone_are_refused() {
        // Whether or not a push created the queue before the task ended.
        for pushed_before in [false, true] {
            let (tx, rx) = frames_only(8, SlowConsumerPolicy::Drop);
            if pushed_before {
                assert_eq!(tx.push(Bytes::from_static(b"early")), Pushed::Queued);
            }
            drop(rx);
            assert_eq!(tx.push(Bytes::from_static(b"late")), Pushed::Closing);
        }
    }

    #[test]
    fn closing_before_any_push_refuses_the_pushes_after_it() {
        let (tx, mut rx) = frames_only(8, SlowConsumerPolicy::Close);
        rx.begin_close(
            CloseRequest {
                code: Some(1001),
                flush: true,
            },
            Bytes::from_static(b"CLOSE"),
        );
        assert_eq!(tx.push(Bytes::from_static(b"late")), Pushed::Closing);
        assert_eq!(tx.queued_bytes(), 0);
    }

    fn bytes_limited(bytes: usize, policy: SlowConsumerPolicy) -> (Outbox, OutboxReceiver) {
        let limits = QueueLimits {
            frames: 1024,
            bytes,
        };
        outbox(limits, policy, Arc::default())
    }

    #[test]
    fn the_byte_bound_drops_what_does_not_fit_and_frees_what_the_writer_takes() {
        let (tx, mut rx) = bytes_limited(100, SlowConsumerPolicy::Drop);
        assert_eq!(tx.push(Bytes::from(vec![0; 60])), Pushed::Queued);
        assert_eq!(tx.push(Bytes::from(vec![1; 40])), Pushed::Queued);
        assert_eq!(tx.queued_bytes(), 100);
        assert_eq!(tx.push(Bytes::from(vec![2; 1])), Pushed::Dropped);
        assert_eq!(tx.shared.stats.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(tx.queued_bytes(), 100, "a refused frame is not counted");
        assert_eq!(rx.try_next().map(|frame| frame.len()), Some(60));
        assert_eq!(tx.queued_bytes(), 40);
        assert_eq!(tx.push(Bytes::from(vec![3; 60])), Pushed::Queued);
        assert_eq!(tx.queued(), 2);
    }

    #[test]
    fn a_slow_consumer_closed_before_its_first_write_still_gets_the_101_first() {
        let (tx, mut rx) = frames_only(8, SlowConsumerPolicy::Close);
        rx.push_handshake_response(Bytes::from_static(b"HTTP/1.1 101\r\n\r\n"));
        rx.push_direct(Bytes::from_static(b"WELCOME"));
        tx.push(Bytes::from_static(b"frame"));
        rx.begin_close(
            CloseRequest {
                code: Some(1013),
                flush: false,
            },
            Bytes::from_static(b"CLOSE"),
        );
        let mut io = Recorder::taking(usize::MAX);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            rx.poll_finish(&mut cx, &mut io),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.data, b"HTTP/1.1 101\r\n\r\nCLOSE");
    }

    #[test]
    fn a_frame_larger_than_the_byte_bound_goes_through_an_empty_queue() {
        let (tx, rx) = bytes_limited(100, SlowConsumerPolicy::Close);
        assert_eq!(tx.push(Bytes::from(vec![0; 500])), Pushed::Queued);
        assert_eq!(tx.push(Bytes::from(vec![1; 1])), Pushed::Closing);
        assert_eq!(tx.shared.stats.closed_slow.load(Ordering::Relaxed), 1);
        assert_eq!(
            rx.close_request(),
            Some(CloseRequest {
                code: Some(1013),
                flush: false
            })
        );
    }

    #[test]
    fn a_write_batch_stops_at_its_byte_cap_and_the_rest_follows() {
        let (tx, mut rx) = frames_only(1024, SlowConsumerPolicy::Close);
        let frame = Bytes::from(vec![7; MAX_BATCH_BYTES / 4]);
        for _ in 0..10 {
            tx.push(frame.clone());
        }
        let mut io = Recorder::taking(usize::MAX);
        flush_idle(&mut rx, &mut io);
        assert_eq!(io.calls, 3, "4 + 4 + 2 frames");
        assert_eq!(io.data.len(), 10 * frame.len());
        assert_eq!(tx.queued_bytes(), 0);
    }
}
