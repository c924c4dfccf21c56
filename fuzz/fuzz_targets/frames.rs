//! The frame path: any byte stream, cut into reads at any points, must give the same events
//! or the same error as the whole stream in one read, never panic, and never hold more than a
//! frame's worth of bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::ws::frame::{Event, FrameReader};

/// Messages, pings and how it ended (a close code, an error, or neither).
type Outcome = (Vec<Vec<u8>>, Vec<Vec<u8>>, String);

fn run(stream: &[u8], cuts: &[usize]) -> Outcome {
    let mut reader = FrameReader::new(4096, 16384);
    let (mut messages, mut pings) = (Vec::new(), Vec::new());
    let mut start = 0;
    for end in cuts.iter().copied().chain([stream.len()]) {
        let end = end.clamp(start, stream.len());
        let mut piece = stream[start..end].to_vec();
        start = end;
        let fed = reader.feed(&mut piece, &mut |event| match event {
            Event::Message { payload, .. } => messages.push(payload.to_vec()),
            Event::Ping(payload) => pings.push(payload.to_vec()),
        });
        match fed {
            Ok(None) => {}
            Ok(Some(close)) => return (messages, pings, format!("close {:?}", close.code)),
            Err(error) => return (messages, pings, format!("error {error}")),
        }
        assert!(
            reader.buffered() <= 4096 + 14,
            "held {} bytes",
            reader.buffered()
        );
    }
    (messages, pings, String::new())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // The first byte picks how the stream is cut into reads.
    let step = usize::from(data[0]).max(1);
    let stream = &data[1..];
    let cuts: Vec<usize> = (step..stream.len()).step_by(step).collect();
    let whole = run(stream, &[]);
    let pieces = run(stream, &cuts);
    assert_eq!(
        whole, pieces,
        "cutting the stream into reads changed the outcome"
    );
});
