//! The incoming-message decoder: any bytes a client sends as a message must decode to a
//! command or an error, never panic; a decoded command must encode back into well-formed
//! server frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::protocol::{self, Command};

fuzz_target!(|data: &[u8]| {
    let mut buffer = data.to_vec();
    let decoded = protocol::decode(&mut buffer);
    if let Ok(command) = decoded {
        // Whatever was accepted must encode into JSON that parses again.
        let frame = match &command {
            Command::Broadcast { message } => protocol::broadcast("client_x", message, 1),
            Command::RoomMessage { room, message } => {
                protocol::room_message(room, "client_x", message, 1)
            }
            Command::PrivateMessage { message, .. } => {
                protocol::private_message("client_x", message, 1)
            }
            Command::JoinRoom { room } | Command::LeaveRoom { room } => {
                protocol::room_joined(room, 1)
            }
            Command::SetMetadata { metadata } => protocol::metadata_updated(metadata),
        };
        let header = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        assert!(serde_json::from_slice::<serde_json::Value>(&frame[header..]).is_ok());
    };
});
