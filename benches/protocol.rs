//! Wire-format benchmarks: what one client message costs to decode, and what one server frame
//! costs to encode.
//!
//! # What is measured, and why
//!
//! * `decode/<type>/{roomcast,serde_json_value}`: [`roomcast::protocol::decode`] (serde_json
//!   reading the top-level object, each field kept as a slice of the payload, then dispatching on
//!   `type` and validating the fields) against the naive baseline,
//!   `serde_json::from_slice::<serde_json::Value>` of the same bytes.
//!   Every connection's reader runs `decode` once per incoming message, so this is the per-message
//!   CPU cost of the read side. One input per client message type of `shared/PROTOCOL.md`, a
//!   1 KiB room message, and two bad inputs (truncated JSON, unknown `type`).
//!   Each iteration parses a fresh copy of the input buffer (`iter_batched_ref`: the copy is
//!   made outside the timed region); `decode` no longer rewrites its input (the simd-json decoder
//!   it replaced parsed in place), but the harness is kept so the two stay comparable against a
//!   saved criterion baseline. Both sides drop their
//!   result inside the timed region, as the server does. The baseline only builds a `Value` and
//!   does *not* dispatch or validate, so it does less work than `decode`: the ratio is, if
//!   anything, flattering to the baseline. Throughput is the input size in bytes.
//!
//! * `encode_room_message/<size>/{roomcast,serde_json_value}`: building one `room_message` frame
//!   with [`roomcast::protocol::room_message`] (JSON written straight into one buffer that also
//!   holds the WebSocket header, returned as a shareable `Bytes`) against the naive way, a
//!   `serde_json::json!` value turned into a `String` (no WebSocket header at all). Bodies of
//!   20 B, 1 KiB and 16 KiB. Throughput is the size of roomcast's finished frame in bytes, for
//!   both sides, so the two lines are directly comparable.
//!
//!   Per recipient: roomcast encodes a fan-out frame *once* and every recipient gets a clone of
//!   the `Bytes` (a reference-count increment, see the `hub` bench); a server that serializes per
//!   recipient pays the `serde_json_value` figure here once per recipient. The
//!   `bytes_clone_per_recipient` line measures what roomcast pays per recipient for the frame
//!   itself, for scale.
//!
//! Both sides run on mimalloc, the global allocator of the server binary.
//!
//! Run: `cargo bench --bench protocol` (add `-- --quick` for a fast, rougher pass).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use roomcast::protocol::{self, Body};

// The allocator of the server binary (`src/main.rs`), so allocation costs match production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A fixed timestamp, so every encoded frame has the same size.
const NOW: u64 = 1_700_000_000;

/// Chat text of exactly `len` bytes (ASCII, no characters that need escaping).
fn text(len: usize) -> String {
    const SENTENCE: &str = "The quick brown fox jumps over the lazy dog. ";
    SENTENCE.chars().cycle().take(len).collect()
}

/// One realistic client message per type, plus bad inputs.
fn decode_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let room_message_1k = format!(
        r#"{{"type":"room_message","room":"lobby","message":"{}"}}"#,
        text(1024)
    );
    vec![
        (
            "broadcast",
            br#"{"type":"broadcast","message":"Hello everyone, how is it going?"}"#.to_vec(),
        ),
        ("join_room", br#"{"type":"join_room","room":"lobby"}"#.to_vec()),
        (
            "leave_room",
            br#"{"type":"leave_room","room":"lobby"}"#.to_vec(),
        ),
        (
            "room_message",
            br#"{"type":"room_message","room":"lobby","message":"Hello room, anyone here?"}"#
                .to_vec(),
        ),
        ("room_message_1KiB", room_message_1k.into_bytes()),
        (
            "private_message",
            br#"{"type":"private_message","to":"client_65f1c2a9b3e4d","message":"Hi there, got a minute?"}"#
                .to_vec(),
        ),
        (
            "set_metadata",
            br##"{"type":"set_metadata","metadata":{"name":"alice","status":"online","color":"#ff8800","tags":["admin","beta"],"age":31}}"##
                .to_vec(),
        ),
        (
            "invalid_json",
            br#"{"type":"room_message","room":"lobby","message":"unterminated"#.to_vec(),
        ),
        (
            "unknown_type",
            br#"{"type":"dance","room":"lobby"}"#.to_vec(),
        ),
    ]
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, input) in decode_inputs() {
        // Sanity: the valid inputs decode, the bad ones are refused.
        let bad = name == "invalid_json" || name == "unknown_type";
        assert_eq!(protocol::decode(&input).is_err(), bad, "{name}");
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_with_input(BenchmarkId::new(name, "roomcast"), &input, |b, input| {
            b.iter_batched_ref(
                || input.clone(),
                |buf| {
                    // The result borrows `buf`: inspect and drop it here.
                    let _ = black_box(protocol::decode(buf));
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_with_input(
            BenchmarkId::new(name, "serde_json_value"),
            &input,
            |b, input| {
                b.iter_batched_ref(
                    || input.clone(),
                    |buf| {
                        let _ = black_box(serde_json::from_slice::<serde_json::Value>(buf));
                    },
                    BatchSize::SmallInput,
                )
            },
        );
    }
    group.finish();
}

fn encode_room_message(c: &mut Criterion) {
    let room = "lobby";
    let from = "client_65f1c2a9b3e4d";
    let mut group = c.benchmark_group("encode_room_message");
    for (label, len) in [("20B", 20), ("1KiB", 1024), ("16KiB", 16 * 1024)] {
        let message = text(len);
        let body = Body::Text(message.as_str().into());
        let frame_len = protocol::room_message(room, from, &body, NOW).len();
        group.throughput(Throughput::Bytes(frame_len as u64));

        group.bench_function(BenchmarkId::new(label, "roomcast"), |b| {
            b.iter(|| protocol::room_message(black_box(room), black_box(from), &body, NOW))
        });
        group.bench_function(BenchmarkId::new(label, "serde_json_value"), |b| {
            b.iter(|| {
                serde_json::json!({
                    "type": "room_message",
                    "room": black_box(room),
                    "from": black_box(from),
                    "message": black_box(message.as_str()),
                    "timestamp": NOW,
                })
                .to_string()
            })
        });
    }
    // What roomcast pays per recipient for the frame itself, whatever its size: one atomic
    // reference-count increment (and the matching decrement when the clone is dropped).
    let frame = protocol::room_message(room, from, &Body::Text(text(1024).into()), NOW);
    group.throughput(Throughput::Elements(1));
    group.bench_function("bytes_clone_per_recipient", |b| {
        b.iter(|| black_box(&frame).clone())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short defaults so the whole suite runs in a few minutes; the command line overrides them.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = decode, encode_room_message
}
criterion_main!(benches);
