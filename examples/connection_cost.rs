//! Heap cost of one idle connection, part by part: the probe behind the breakdown in
//! PERFORMANCE.md ("Memory per connection").
//!
//! ```text
//! cargo run --release --example connection_cost
//! ```
//!
//! A counting global allocator wraps mimalloc (the server's allocator) and keeps two running
//! totals of live heap memory: the bytes *requested* (`Layout::size`, what the code asks for)
//! and the bytes mimalloc actually set aside for them (`mi_usable_size`: requests rounded up to
//! its size classes). Each part is created N times and kept alive; the change in the totals,
//! divided by N, is its cost. Only the heap is counted: not the kernel's socket buffers, not
//! thread stacks, not pages mimalloc holds but has not handed out (RSS counts those, so RSS per
//! connection is somewhat higher than the whole-connection row).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mimalloc::MiMalloc;
use roomcast::outbox::{outbox, OutboxStats, QueueLimits, SlowConsumerPolicy};
use tokio_util::sync::CancellationToken;

/// The connection task's future (guarded by a unit test in `ws::session`).
const TASK_STATE: usize = std::mem::size_of::<
    roomcast::ws::session::ConnectionTask<
        roomcast::poller::Socket,
        roomcast::ws::commands::Session,
    >,
>();

/// Instances of each part; large enough that one-off costs (a slab page, a table resize)
/// disappear in the average. Two sockets each: `main` raises the open-file limit first.
const N: usize = 5_000;

// The `mimalloc` crate exposes `usable_size` only with its `extended` feature, which the server
// does not need; the C function is in the linked library either way.
extern "C" {
    fn mi_usable_size(p: *const c_void) -> usize;
}

struct Counting;

static REQUESTED: AtomicIsize = AtomicIsize::new(0);
static USABLE: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);

fn usable(ptr: *mut u8) -> isize {
    // SAFETY: `ptr` is a live block from mimalloc (or null, which mimalloc accepts).
    unsafe { mi_usable_size(ptr as *const c_void) as isize }
}

// SAFETY: every call is passed straight to mimalloc; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = MiMalloc.alloc(layout);
        if !ptr.is_null() {
            REQUESTED.fetch_add(layout.size() as isize, Ordering::Relaxed);
            USABLE.fetch_add(usable(ptr), Ordering::Relaxed);
            BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = MiMalloc.alloc_zeroed(layout);
        if !ptr.is_null() {
            REQUESTED.fetch_add(layout.size() as isize, Ordering::Relaxed);
            USABLE.fetch_add(usable(ptr), Ordering::Relaxed);
            BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        REQUESTED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        USABLE.fetch_sub(usable(ptr), Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        MiMalloc.dealloc(ptr, layout);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old_usable = usable(ptr);
        let new = MiMalloc.realloc(ptr, layout, new_size);
        if !new.is_null() {
            REQUESTED.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
            USABLE.fetch_add(usable(new) - old_usable, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy)]
struct Snapshot {
    requested: isize,
    usable: isize,
    blocks: isize,
}

fn snapshot() -> Snapshot {
    Snapshot {
        requested: REQUESTED.load(Ordering::Relaxed),
        usable: USABLE.load(Ordering::Relaxed),
        blocks: BLOCKS.load(Ordering::Relaxed),
    }
}

#[derive(Clone)]
struct Row {
    part: &'static str,
    blocks: f64,
    requested: f64,
    usable: f64,
}

fn row(part: &'static str, before: Snapshot, after: Snapshot, count: usize) -> Row {
    let per = |a: isize, b: isize| (b - a) as f64 / count as f64;
    Row {
        part,
        blocks: per(before.blocks, after.blocks),
        requested: per(before.requested, after.requested),
        usable: per(before.usable, after.usable),
    }
}

/// Lets the runtime's worker poll what was just spawned and go idle before the next snapshot.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Outboxes with the server's defaults (--outbound-queue 1024, --outbound-queue-bytes 1 MiB).
/// `used`: one frame has gone through each, which creates its queue (the channel allocates
/// its first block of slots then, whatever the bound, and keeps it); otherwise only the
/// shared state exists, as for a connection that was sent nothing but its welcome.
async fn outboxes(used: bool) -> Row {
    let limits = QueueLimits {
        frames: 1024,
        bytes: 1024 * 1024,
    };
    let stats = Arc::new(OutboxStats::default());
    let mut kept = Vec::with_capacity(N);
    let before = snapshot();
    for _ in 0..N {
        let (tx, mut rx) = outbox(limits, SlowConsumerPolicy::Close, stats.clone());
        if used {
            tx.push(bytes::Bytes::from_static(b"frame"));
            rx.try_next();
        }
        kept.push((tx, rx));
    }
    let after = snapshot();
    if used {
        row("outbox, after a frame went through it", before, after, N)
    } else {
        row("outbox, nothing sent yet (shared state)", before, after, N)
    }
}

/// N connected socket pairs made with std (a std socket is a file descriptor, no heap), so
/// that only what registers the accepted ends is counted: the clients, and the accepted ends
/// (non-blocking).
type Pairs = (Vec<std::net::TcpStream>, Vec<std::net::TcpStream>);

fn socket_pairs() -> Pairs {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut clients = Vec::with_capacity(N);
    let mut accepted = Vec::with_capacity(N);
    for _ in 0..N {
        clients.push(std::net::TcpStream::connect(addr).unwrap());
        let (socket, _) = listener.accept().unwrap();
        socket.set_nonblocking(true).unwrap();
        accepted.push(socket);
    }
    (clients, accepted)
}

async fn tcp_streams() -> Row {
    let (_clients, accepted) = socket_pairs();
    let mut registered = Vec::with_capacity(N);
    let before = snapshot();
    for socket in accepted {
        registered.push(tokio::net::TcpStream::from_std(socket).unwrap());
    }
    let after = snapshot();
    row(
        "tokio TcpStream registered with the reactor",
        before,
        after,
        N,
    )
}

async fn poller_sockets() -> Row {
    // Registered with a roomcast poller, as the server's accepted sockets are.
    let (_clients, accepted) = socket_pairs();
    let (poller, _task) = roomcast::poller::Poller::new().unwrap();
    let mut registered = Vec::with_capacity(N);
    let before = snapshot();
    for socket in accepted {
        let socket = mio::net::TcpStream::from_std(socket);
        registered.push(poller.register(socket).unwrap());
    }
    let after = snapshot();
    row(
        "roomcast poller Socket (what the server uses)",
        before,
        after,
        N,
    )
}

async fn idle_tasks(part: &'static str, with_state: bool) -> Row {
    let mut handles = Vec::with_capacity(N);
    let before = snapshot();
    for _ in 0..N {
        handles.push(if with_state {
            // State held across the await lives in the task's allocation, as `Connection` does.
            tokio::spawn(async {
                let state = std::hint::black_box([0u8; TASK_STATE]);
                std::future::pending::<()>().await;
                std::hint::black_box(state);
            })
        } else {
            tokio::spawn(std::future::pending::<()>())
        });
    }
    settle().await;
    let after = snapshot();
    for handle in &handles {
        handle.abort();
    }
    // Wait until every task is gone, so that its memory is not freed during the next part.
    for handle in handles {
        let _ = handle.await;
    }
    row(part, before, after, N)
}

/// The whole thing: the real server in this process, N idle WebSocket connections to it from
/// blocking std sockets (which allocate nothing that stays), so what stays is the server's.
async fn server_connections() -> Row {
    let mut config = roomcast::Config::with_listen("127.0.0.1:0".parse().unwrap());
    config.workers = 1;
    let shutdown = CancellationToken::new();
    let server = roomcast::Server::bind(config, shutdown.clone()).unwrap();
    let addr = server.local_addr();
    let running = tokio::spawn(server.run());
    // Warm-up: one-off costs of the first connections (thread-local buffers, metric handles).
    let warm = tokio::task::spawn_blocking(move || open_idle(addr, 64))
        .await
        .unwrap();
    settle().await;
    let before = snapshot();
    let idle = tokio::task::spawn_blocking(move || open_idle(addr, N))
        .await
        .unwrap();
    settle().await;
    let after = snapshot();
    drop((warm, idle));
    shutdown.cancel();
    running.await.unwrap();
    row(
        "whole idle WebSocket connection (server side)",
        before,
        after,
        N,
    )
}

/// Opens `count` WebSocket connections by hand and reads each one's welcome.
fn open_idle(addr: SocketAddr, count: usize) -> Vec<std::net::TcpStream> {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut sockets = Vec::with_capacity(count);
    let mut buffer = [0u8; 4096];
    for _ in 0..count {
        let mut socket = std::net::TcpStream::connect(addr).unwrap();
        socket.write_all(request.as_bytes()).unwrap();
        // The 101 response and the welcome frame; read until the welcome's closing brace.
        let mut seen = Vec::new();
        while !(seen.starts_with(b"HTTP/1.1 101") && seen.ends_with(b"}")) {
            let n = socket.read(&mut buffer).unwrap();
            assert!(n > 0, "the server closed a connection: {:?}", seen);
            seen.extend_from_slice(&buffer[..n]);
        }
        sockets.push(socket);
    }
    sockets
}

fn main() {
    // 5,000 connections are 10,000 descriptors in this one process; the soft limit is often
    // 1,024. The roomcast binary raises it the same way.
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("could not raise the open-file limit: {error}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = runtime.block_on(async {
        let mut rows = Vec::new();
        rows.push(outboxes(false).await);
        settle().await;
        rows.push(outboxes(true).await);
        // Each part has dropped its instances; let the runtime finish freeing them (a socket's
        // registration is released on a later turn of the reactor) before the next one counts.
        settle().await;
        rows.push(tcp_streams().await);
        rows.push(poller_sockets().await);
        settle().await;
        rows.push(idle_tasks("tokio task, empty future", false).await);
        settle().await;
        rows.push(idle_tasks("tokio task, a ConnectionTask-sized future", true).await);
        settle().await;
        rows.push(server_connections().await);
        rows
    });
    // What the parts above do not explain: directory entry, client id, the rest of the session.
    // The server's idle connections were sent only their welcome: the unused outbox counts.
    let [unused_outbox, _, _, socket, _, task, whole] = &rows[..] else {
        unreachable!("seven rows above")
    };
    let parts = [unused_outbox, socket, task];
    let whole = whole.clone();
    rows.push(Row {
        part: "rest: whole minus outbox, poller socket, task",
        blocks: whole.blocks - parts.iter().map(|r| r.blocks).sum::<f64>(),
        requested: whole.requested - parts.iter().map(|r| r.requested).sum::<f64>(),
        usable: whole.usable - parts.iter().map(|r| r.usable).sum::<f64>(),
    });
    println!("live heap per instance, {N} instances each (mimalloc underneath)");
    println!(
        "| {:<46} | {:>6} | {:>15} | {:>21} |",
        "part", "blocks", "requested bytes", "mimalloc usable bytes"
    );
    println!("|{:-<48}|{:->8}|{:->17}|{:->23}|", "", "", "", "");
    for r in rows {
        println!(
            "| {:<46} | {:>6.2} | {:>15.0} | {:>21.0} |",
            r.part, r.blocks, r.requested, r.usable
        );
    }
}
