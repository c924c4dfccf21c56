//! The incoming-message decoder: any bytes a client sends as a message must decode to a
//! command or an error, never panic; a decoded command must encode back into well-formed
//! server frames, carrying the client's `message` byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::protocol::{self, Body, Command, Metadata};

fuzz_target!(|data: &[u8]| {
    let decoded = protocol::decode(data);
    if let Ok(command) = decoded {
        // Whatever was accepted must encode into JSON that parses again.
        let (frame, message) = match &command {
            Command::Broadcast { message } => {
                (protocol::broadcast("client_x", message, 1), Some(message))
            }
            Command::RoomMessage { room, message } => (
                protocol::room_message(room, "client_x", message, 1),
                Some(message),
            ),
            Command::PrivateMessage { message, .. } => (
                protocol::private_message("client_x", message, 1),
                Some(message),
            ),
            Command::JoinRoom { room } | Command::LeaveRoom { room } => {
                (protocol::room_joined(room, 1), None)
            }
            Command::SetMetadata { metadata } => (
                protocol::metadata_updated(&Metadata::default().merged(metadata)),
                None,
            ),
        };
        let header = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        let json = &frame[header..];
        assert!(serde_json::from_slice::<serde_json::Value>(json).is_ok());
        // The relayed message is a slice of the client's bytes, written as it is.
        if let Some(Body::Raw(raw)) = message {
            let raw = raw.get().as_bytes();
            let payload = data.as_ptr_range();
            assert!(payload.start <= raw.as_ptr() && raw.as_ptr_range().end <= payload.end);
            assert!(json.ends_with(&[raw, br#","timestamp":1}"#].concat()));
        }
    };
});
