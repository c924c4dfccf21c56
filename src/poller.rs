//! Readiness of accepted TCP connections from one epoll instance per listener, instead of
//! tokio's reactor: what [`Socket`], the server side of every plain or TLS connection, reads
//! and writes through.
//!
//! Why not tokio's `TcpStream`: its reactor keeps a cache-padded `ScheduledIo` per socket
//! (252 bytes measured, with separate reader and writer wakers) and deregisters each socket
//! with an `epoll_ctl(EPOLL_CTL_DEL)` before closing it. A connection here has one task that
//! both reads and writes, so one waker serves it: its [`Slot`] is a readiness word and that
//! waker (64 bytes), and closing the socket is all it takes to leave the epoll set (Linux
//! drops a closed file from every epoll instance), one system call fewer per connection.
//!
//! How readiness flows, as in tokio: each socket is registered edge-triggered for reading
//! (and for writing once a write finds its send buffer full). [`Poller::run`], a task per listener, waits for the epoll instance itself to turn
//! readable (it is registered with tokio's reactor: epoll in epoll), collects its events, and
//! for each one bumps the slot's event count, sets the readiness bits and wakes the task.
//! A read or write that finds the socket drained (`EAGAIN`, or a short read) clears the bit,
//! unless an event came in meanwhile (the count moved), so no edge is lost between the
//! system call and the clearing.

use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::warn;

const READABLE: usize = 0b0001;
const WRITABLE: usize = 0b0010;
const READ_CLOSED: usize = 0b0100;
const WRITE_CLOSED: usize = 0b1000;
/// The event count lives above the readiness bits.
const EVENT: usize = 0b1_0000;
const BITS: usize = EVENT - 1;

/// Events taken from the epoll instance per turn of [`Poller::run`].
const EVENTS_PER_TURN: usize = 1024;

/// One registered socket's readiness and its task's waker.
struct Slot {
    /// Readiness bits, and the count of events seen above them.
    readiness: AtomicUsize,
    waker: AtomicWaker,
    /// Its token: where it is in the poller's slab.
    key: usize,
    /// Registered for writability too: only once a write found the send buffer full (see
    /// [`Poller::register`]).
    write_interest: AtomicBool,
}

impl Slot {
    /// Ready when any of `mask` is set; else registers the task's waker (and checks again, so
    /// an event between the first look and the registration is not missed). The readiness
    /// word seen is what [`Slot::clear`] takes.
    fn poll_ready(&self, cx: &mut Context<'_>, mask: usize) -> Poll<usize> {
        let seen = self.readiness.load(Ordering::Acquire);
        if seen & mask != 0 {
            return Poll::Ready(seen);
        }
        self.waker.register(cx.waker());
        let seen = self.readiness.load(Ordering::Acquire);
        if seen & mask != 0 {
            Poll::Ready(seen)
        } else {
            Poll::Pending
        }
    }

    /// Clears `bits` unless an event arrived since `seen` was read.
    fn clear(&self, seen: usize, bits: usize) {
        let mut current = self.readiness.load(Ordering::Acquire);
        while current & !BITS == seen & !BITS {
            match self.readiness.compare_exchange_weak(
                current,
                current & !bits,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// An event: count it, set its bits, and wake the task if it set one that was clear. A
    /// task only waits for a bit it saw clear after registering its waker, so an event that
    /// sets nothing new has no one to wake: the task is busy with the socket (and the count
    /// it sees moved keeps it from clearing what the event reported) or waits on something
    /// else. The initial event of every new socket is such a one.
    fn set(&self, bits: usize) {
        let previous = self
            .readiness
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                Some(current.wrapping_add(EVENT) | bits)
            })
            .unwrap_or_else(|current| current);
        if bits & !previous & BITS != 0 {
            self.waker.wake();
        }
    }
}

/// What the sockets and the poller's task share.
struct Shared {
    registry: mio::Registry,
    /// Registered sockets by token.
    slots: Mutex<Slab<Arc<Slot>>>,
}

impl Shared {
    fn slots(&self) -> MutexGuard<'_, Slab<Arc<Slot>>> {
        // A panic elsewhere while holding the lock left a slab that is still consistent.
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One listener's epoll instance: registers the sockets it accepts ([`Poller::register`]) and
/// delivers their readiness ([`Poller::run`], spawned once).
#[derive(Clone)]
pub struct Poller {
    shared: Arc<Shared>,
}

/// The epoll instance itself, owned by the poller's task.
pub struct PollerTask {
    poll: AsyncFd<mio::Poll>,
    shared: Arc<Shared>,
}

impl Poller {
    /// A new epoll instance, registered with the current tokio runtime's reactor.
    pub fn new() -> io::Result<(Poller, PollerTask)> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the `Poll` owns its epoll descriptor for as long as it lives, and the
        // `AsyncFd` owns the `Poll`.
        let poll = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE)? };
        let shared = Arc::new(Shared {
            registry,
            slots: Mutex::new(Slab::new()),
        });
        Ok((
            Poller {
                shared: shared.clone(),
            },
            PollerTask { poll, shared },
        ))
    }

    /// Takes an accepted, non-blocking socket into the epoll set. For reading only: a socket
    /// is writable until its send buffer fills, which most never do, and an edge-triggered
    /// registration for writing reports every new socket's writability at once (an event and
    /// a wake-up per connection for nothing). A write that finds the buffer full asks for
    /// writability then ([`Socket::want_writable`]).
    pub fn register(&self, mut stream: mio::net::TcpStream) -> io::Result<Socket> {
        // Ready until a system call says otherwise: a client's request is usually there by
        // the time it is accepted, and the first read should not wait for the first event.
        // In the slab before it is registered, so that its first event finds it.
        let slot = {
            let mut slots = self.shared.slots();
            let entry = slots.vacant_entry();
            let slot = Arc::new(Slot {
                readiness: AtomicUsize::new(READABLE | WRITABLE),
                waker: AtomicWaker::new(),
                key: entry.key(),
                write_interest: AtomicBool::new(false),
            });
            entry.insert(slot.clone());
            slot
        };
        let key = slot.key;
        if let Err(error) =
            self.shared
                .registry
                .register(&mut stream, Token(key), Interest::READABLE)
        {
            self.shared.slots().remove(key);
            return Err(error);
        }
        Ok(Socket {
            stream,
            slot,
            shared: self.shared.clone(),
        })
    }

    /// Registered sockets (open connections and handshakes of this listener).
    pub fn registered(&self) -> usize {
        self.shared.slots().len()
    }
}

impl PollerTask {
    /// Delivers readiness until `done` is cancelled and no socket is left registered (the
    /// server cancels it when it stops: connections its drain left open keep being served
    /// until they end). A failing epoll instance is logged and retried after a pause, since
    /// its connections cannot be served without it.
    pub async fn run(mut self, done: CancellationToken) {
        let mut events = Events::with_capacity(EVENTS_PER_TURN);
        loop {
            if done.is_cancelled() && self.shared.slots().is_empty() {
                return;
            }
            let ready = tokio::select! {
                ready = self.poll.readable_mut() => ready,
                // Looks again whether the last socket went.
                _ = done.cancelled(), if !done.is_cancelled() => continue,
                _ = tokio::time::sleep(Duration::from_millis(100)), if done.is_cancelled() => continue,
            };
            let mut guard = match ready {
                Ok(guard) => guard,
                Err(error) => {
                    warn!(%error, "connection poller failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match guard
                .get_inner_mut()
                .poll(&mut events, Some(Duration::ZERO))
            {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    warn!(%error, "connection poller failed");
                    drop(guard);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
            let mut taken = 0;
            {
                let slots = self.shared.slots();
                for event in events.iter() {
                    taken += 1;
                    // A socket closed since the instance queued its event.
                    let Some(slot) = slots.get(event.token().0) else {
                        continue;
                    };
                    let mut bits = 0;
                    if event.is_readable() {
                        bits |= READABLE;
                    }
                    if event.is_writable() {
                        bits |= WRITABLE;
                    }
                    if event.is_read_closed() {
                        bits |= READ_CLOSED;
                    }
                    if event.is_write_closed() {
                        bits |= WRITE_CLOSED;
                    }
                    if event.is_error() {
                        // The next read or write reports it.
                        bits |= READABLE | WRITABLE;
                    }
                    slot.set(bits);
                }
            }
            if taken < EVENTS_PER_TURN {
                // Drained: the next event turns the instance readable again.
                guard.clear_ready();
            } else {
                // More may be queued: take them after the tasks just woken had a turn.
                drop(guard);
                tokio::task::yield_now().await;
            }
        }
    }
}

/// The server side of one accepted TCP connection, registered with its listener's
/// [`Poller`]. Reads and writes for one task at a time (the connection's, or its handshake's):
/// the slot has one waker.
pub struct Socket {
    stream: mio::net::TcpStream,
    slot: Arc<Slot>,
    shared: Arc<Shared>,
}

impl Socket {
    /// Reads without consuming: what is queued, up to `buf.len()` bytes (for the PROXY
    /// header, which only a trusted peer's connection may start with).
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        // Never cleared by a short peek: the bytes are still there.
        std::future::poll_fn(|cx| self.poll_io(cx, READABLE, READ_CLOSED, 0, |s| s.peek(buf))).await
    }

    /// One non-blocking read or write, clearing `readiness` when the socket is drained:
    /// `EAGAIN`, or less than `wanted` bytes moved (a stream socket gives all it has).
    fn poll_io(
        &self,
        cx: &mut Context<'_>,
        readiness: usize,
        closed: usize,
        wanted: usize,
        mut io: impl FnMut(&mio::net::TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            let seen = ready!(self.slot.poll_ready(cx, readiness | closed));
            match io(&self.stream) {
                Ok(n) => {
                    if n > 0 && n < wanted {
                        self.drained(seen, readiness)?;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.drained(seen, readiness)?;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl Socket {
    /// The socket has nothing more to read, or no room to write: clears the bit (unless an
    /// event came since `seen`), and for writing makes sure an event will tell when there
    /// is room again.
    fn drained(&self, seen: usize, readiness: usize) -> io::Result<()> {
        self.slot.clear(seen, readiness);
        if readiness == WRITABLE {
            self.want_writable()?;
        }
        Ok(())
    }

    /// Adds writability to the socket's registration, once: the first time a write found its
    /// send buffer full. `epoll_ctl(MOD)` reports the current state at once, so space freed
    /// since the failed write still comes as an event.
    fn want_writable(&self) -> io::Result<()> {
        if self.slot.write_interest.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let fd = self.stream.as_raw_fd();
        self.shared.registry.reregister(
            &mut mio::unix::SourceFd(&fd),
            Token(self.slot.key),
            Interest::READABLE | Interest::WRITABLE,
        )
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // Out of the slab; the stream's close, after this, takes it out of the epoll set.
        self.shared.slots().try_remove(self.slot.key);
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let fd = self.stream.as_raw_fd();
        let unfilled = buf.remaining();
        // SAFETY: read(2) writes at most `unfilled` bytes into the buffer's unfilled part,
        // which is valid for writes of that length; uninitialised bytes are never read.
        let n = ready!(
            self.poll_io(cx, READABLE, READ_CLOSED, unfilled, |_| unsafe {
                let dst = buf.unfilled_mut().as_mut_ptr().cast::<libc::c_void>();
                let n = libc::read(fd, dst, unfilled);
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
        )?;
        // SAFETY: read(2) initialised the first `n` unfilled bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(cx, WRITABLE, WRITE_CLOSED, buf.len(), |mut stream| {
            stream.write(buf)
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let wanted = bufs.iter().map(|buf| buf.len()).sum();
        self.poll_io(cx, WRITABLE, WRITE_CLOSED, wanted, |mut stream| {
            stream.write_vectored(bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::CountingWaker;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A poller with its task running, and one registered server socket with its client.
    async fn pair() -> (Poller, Socket, tokio::net::TcpStream) {
        let (poller, task) = Poller::new().unwrap();
        tokio::spawn(task.run(CancellationToken::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let socket = poller
            .register(mio::net::TcpStream::from_std(accepted))
            .unwrap();
        (poller, socket, client)
    }

    #[tokio::test]
    async fn a_waiting_read_is_woken_by_the_data_that_arrives() {
        let (_poller, mut socket, mut client) = pair().await;
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 5];
            socket.read_exact(&mut buf).await.unwrap();
            (buf, socket)
        });
        // The read found nothing and waits on the poller.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!read.is_finished());
        client.write_all(b"hello").await.unwrap();
        let (buf, _socket) = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[tokio::test]
    async fn writes_and_vectored_writes_reach_the_peer_and_reads_see_its_close() {
        let (_poller, mut socket, mut client) = pair().await;
        socket.write_all(b"one ").await.unwrap();
        let written = socket
            .write_vectored(&[IoSlice::new(b"two "), IoSlice::new(b"three")])
            .await
            .unwrap();
        assert_eq!(written, 9);
        socket.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"one two three");
        drop(client);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest))
            .await
            .expect("EOF seen")
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn a_write_to_a_full_socket_waits_until_the_peer_reads() {
        let (_poller, mut socket, mut client) = pair().await;
        socket2::SockRef::from(&socket)
            .set_send_buffer_size(4096)
            .unwrap();
        // Far more than the two socket buffers hold: the write must wait for the reader.
        let payload = vec![7u8; 2 << 20];
        let expected = payload.len();
        let writer = tokio::spawn(async move {
            socket.write_all(&payload).await.unwrap();
            socket.shutdown().await.unwrap();
            socket
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "the write waits for the peer");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("all delivered")
            .unwrap();
        assert_eq!(got.len(), expected);
        writer.await.unwrap();
    }

    #[test]
    fn an_event_wakes_the_task_only_when_it_sets_a_bit_that_was_clear() {
        let slot = Slot {
            readiness: AtomicUsize::new(0),
            waker: AtomicWaker::new(),
            key: 0,
            write_interest: AtomicBool::new(false),
        };
        let wakes = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(slot.poll_ready(&mut cx, READABLE).is_pending());
        slot.set(READABLE);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the bit it waited for");
        let Poll::Ready(seen) = slot.poll_ready(&mut cx, READABLE) else {
            panic!("readable")
        };
        // More data while the task still has the bit: no wake, but the count moved, so
        // the task's clear after a drained read does not hide the new data.
        slot.set(READABLE);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        slot.clear(seen, READABLE);
        assert!(slot.poll_ready(&mut cx, READABLE).is_ready());
    }

    #[tokio::test]
    async fn a_dropped_socket_leaves_the_poller() {
        let (poller, socket, _client) = pair().await;
        assert_eq!(poller.registered(), 1);
        drop(socket);
        assert_eq!(poller.registered(), 0);
    }
}
