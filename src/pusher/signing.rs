//! Pusher's HMAC-SHA256 signatures: a private channel's auth string, and (for the HTTP API)
//! a request's `auth_signature`. Compared in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// `hex(HMAC-SHA256(secret, text))`.
pub fn sign(secret: &str, text: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(text.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `signature` (hex) is `text`'s under `secret`, compared in constant time.
pub fn verify(secret: &str, text: &str, signature: &str) -> bool {
    let Ok(given) = hex::decode(signature) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(text.as_bytes());
    mac.verify_slice(&given).is_ok()
}

/// Whether `auth` (`KEY:SIGNATURE`) lets `socket_id` subscribe to `channel` (with
/// `channel_data`, for presence): the signature over `socket_id:channel[:channel_data]`.
pub fn channel_auth_is_valid(
    key: &str,
    secret: &str,
    auth: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> bool {
    let Some((given_key, signature)) = auth.split_once(':') else {
        return false;
    };
    if given_key != key {
        return false;
    }
    let text = match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    };
    verify(secret, &text, signature)
}

/// Whether `auth` (`KEY:SIGNATURE`) signs `socket_id` in as the user of `user_data`: the
/// signature over `socket_id::user::user_data`.
pub fn signin_is_valid(
    key: &str,
    secret: &str,
    auth: &str,
    socket_id: &str,
    user_data: &str,
) -> bool {
    let Some((given_key, signature)) = auth.split_once(':') else {
        return false;
    };
    given_key == key
        && verify(
            secret,
            &format!("{socket_id}::user::{user_data}"),
            signature,
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_auth_is_the_key_and_the_hmac_of_socket_id_and_channel() {
        // Pusher's documented example (pusher.com/docs/channels/library_auth_reference).
        let secret = "7ad3773142a6692b25b8";
        let signature = sign(secret, "1234.1234:private-foobar");
        assert_eq!(
            signature,
            "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let auth = format!("278d425bdf160c739803:{signature}");
        assert!(channel_auth_is_valid(
            "278d425bdf160c739803",
            secret,
            &auth,
            "1234.1234",
            "private-foobar",
            None
        ));
        assert!(!channel_auth_is_valid(
            "278d425bdf160c739803",
            secret,
            &auth,
            "1234.1235",
            "private-foobar",
            None
        ));
        assert!(!channel_auth_is_valid(
            "other",
            secret,
            &auth,
            "1234.1234",
            "private-foobar",
            None
        ));
        assert!(!channel_auth_is_valid(
            "278d425bdf160c739803",
            secret,
            "nocolon",
            "1234.1234",
            "private-foobar",
            None
        ));
    }
}
