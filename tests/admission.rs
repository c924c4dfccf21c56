//! What is decided before the upgrade: tokens, Origin, connection caps, the client address
//! behind trusted proxies. Each option is shown working and refusing.

mod common;

use common::{connect_with, start_server_with};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "test-secret-that-is-long-enough";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn auth_server() -> common::TestServer {
    start_server_with(|config| config.jwt_secret = Some(SECRET.into())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_in_the_query_string_is_accepted_and_its_sub_is_the_user_id() {
    let server = auth_server().await;
    let t = token(json!({"sub": "user-7", "exp": now() + 60}));
    let client = connect_with(&server, &format!("/?token={t}"), &[])
        .await
        .unwrap();
    assert_eq!(client.welcome["user_id"], "user-7");
    assert!(client.id.starts_with("client_"), "client_id is kept");
    let keys: Vec<_> = client
        .welcome
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, ["type", "client_id", "user_id", "timestamp"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_welcome_has_no_user_id() {
    let server = start_server_with(|_| {}).await;
    let client = connect_with(&server, "/", &[]).await.unwrap();
    assert!(client.welcome.get("user_id").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_is_refused_with_401() {
    let server = auth_server().await;
    assert_eq!(connect_with(&server, "/", &[]).await.err(), Some(401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_with_401() {
    let server = auth_server().await;
    let t = token(json!({"sub": "u", "exp": now() - 10}));
    assert_eq!(
        connect_with(&server, &format!("/?token={t}"), &[])
            .await
            .err(),
        Some(401)
    );
}

/// The status of an upgrade with `claims` signed by the right key.
async fn upgrade_status(server: &common::TestServer, claims: serde_json::Value) -> u16 {
    match connect_with(server, &format!("/?token={}", token(claims)), &[]).await {
        Ok(_) => 101,
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_not_valid_for_another_hour_is_refused_with_401() {
    let server = auth_server().await;
    let status = upgrade_status(&server, json!({"sub": "u", "nbf": now() + 3600})).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fractional_nbf_and_exp_are_checked_like_whole_seconds() {
    let server = auth_server().await;
    let early = json!({"sub": "u", "nbf": now() as f64 + 3600.5});
    assert_eq!(upgrade_status(&server, early).await, 401);
    let expired = json!({"sub": "u", "exp": now() as f64 - 60.5});
    assert_eq!(upgrade_status(&server, expired).await, 401);
    let valid = json!({"sub": "u", "nbf": now() as f64 - 0.5, "exp": now() as f64 + 60.5});
    assert_eq!(upgrade_status(&server, valid).await, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_nbf_is_within_the_leeway_is_accepted() {
    let server = auth_server().await;
    // The default --jwt-leeway is 5 s: a signer whose clock is 2 s ahead is tolerated.
    let status = upgrade_status(&server, json!({"sub": "u", "nbf": now() + 2})).await;
    assert_eq!(status, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_naming_an_audience_is_accepted_when_no_audience_is_configured() {
    let server = auth_server().await;
    let status = upgrade_status(&server, json!({"sub": "u", "aud": "someone"})).await;
    assert_eq!(status, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_audience_must_be_named_by_the_token() {
    let server = start_server_with(|config| {
        config.jwt_secret = Some(SECRET.into());
        config.jwt_audience = Some("roomcast".into());
    })
    .await;
    assert_eq!(upgrade_status(&server, json!({"sub": "u"})).await, 401);
    let other = json!({"sub": "u", "aud": "billing"});
    assert_eq!(upgrade_status(&server, other).await, 401);
    let listed = json!({"sub": "u", "aud": ["billing", "roomcast"]});
    assert_eq!(upgrade_status(&server, listed).await, 101);
    let single = json!({"sub": "u", "aud": "roomcast"});
    assert_eq!(upgrade_status(&server, single).await, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_issuer_must_match_the_token() {
    let server = start_server_with(|config| {
        config.jwt_secret = Some(SECRET.into());
        config.jwt_issuer = Some("https://app.example.com".into());
    })
    .await;
    assert_eq!(upgrade_status(&server, json!({"sub": "u"})).await, 401);
    let other = json!({"sub": "u", "iss": "https://evil.example.com"});
    assert_eq!(upgrade_status(&server, other).await, 401);
    let right = json!({"sub": "u", "iss": "https://app.example.com"});
    assert_eq!(upgrade_status(&server, right).await, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_with_another_key_is_refused_with_401() {
    let server = auth_server().await;
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "admin"}),
        &EncodingKey::from_secret(b"not the secret"),
    )
    .unwrap();
    assert_eq!(
        connect_with(&server, &format!("/?token={forged}"), &[])
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        connect_with(&server, "/?token=garbage", &[]).await.err(),
        Some(401)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_an_authorization_header_is_accepted() {
    let server = auth_server().await;
    let bearer = format!("Bearer {}", token(json!({"sub": "hdr"})));
    let client = connect_with(&server, "/", &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(client.welcome["user_id"], "hdr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_configured_cookie_is_accepted() {
    let server = start_server_with(|config| {
        config.jwt_secret = Some(SECRET.into());
        config.token_cookie = Some("rc_token".into());
    })
    .await;
    let cookie = format!(
        "theme=dark; rc_token={}",
        token(json!({"sub": "cookie-user"}))
    );
    let client = connect_with(&server, "/", &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(client.welcome["user_id"], "cookie-user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_es256_public_key_verifies_tokens_signed_by_its_private_key() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = std::env::temp_dir().join(format!("roomcast-es256-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let public_pem = dir.join("public.pem");
    std::fs::write(&public_pem, key.public_key_pem()).unwrap();
    let server = start_server_with(|config| {
        config.jwt_public_key = Some(public_pem.to_string_lossy().into_owned());
    })
    .await;
    let signed = encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "ec-user", "exp": now() + 60}),
        &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let client = connect_with(&server, &format!("/?token={signed}"), &[])
        .await
        .unwrap();
    assert_eq!(client.welcome["user_id"], "ec-user");
    // An HS256 token cannot pass for an ES256 one.
    let hs = token(json!({"sub": "x"}));
    assert_eq!(
        connect_with(&server, &format!("/?token={hs}"), &[])
            .await
            .err(),
        Some(401)
    );
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rs256_public_key_verifies_tokens_signed_by_its_private_key() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let public_pem = fixtures.join("rs256-public.pem");
    let server = start_server_with(|config| {
        config.jwt_public_key = Some(public_pem.to_string_lossy().into_owned());
    })
    .await;
    let private_pem = std::fs::read(fixtures.join("rs256-private.pem")).unwrap();
    let signed = encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "rsa-user", "exp": now() + 60}),
        &EncodingKey::from_rsa_pem(&private_pem).unwrap(),
    )
    .unwrap();
    let client = connect_with(&server, &format!("/?token={signed}"), &[])
        .await
        .unwrap();
    assert_eq!(client.welcome["user_id"], "rsa-user");
    // Tampering with the claims breaks the signature.
    let mut parts: Vec<&str> = signed.split('.').collect();
    let forged_claims = {
        use base64::Engine;
        let claims = json!({"sub": "admin", "exp": now() + 60}).to_string();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims)
    };
    parts[1] = &forged_claims;
    assert_eq!(
        connect_with(&server, &format!("/?token={}", parts.join(".")), &[])
            .await
            .err(),
        Some(401)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_message_to_a_user_id_reaches_every_connection_of_that_user() {
    let server = auth_server().await;
    let ann = token(json!({"sub": "ann"}));
    let bob = token(json!({"sub": "bob"}));
    let mut phone = connect_with(&server, &format!("/?token={ann}"), &[])
        .await
        .unwrap();
    let mut laptop = connect_with(&server, &format!("/?token={ann}"), &[])
        .await
        .unwrap();
    let mut sender = connect_with(&server, &format!("/?token={bob}"), &[])
        .await
        .unwrap();
    sender
        .send(json!({"type": "private_message", "to": "ann", "message": "hi ann"}))
        .await;
    for device in [&mut phone, &mut laptop] {
        let got = device.recv().await;
        assert_eq!(got["type"], "private_message");
        assert_eq!(got["from"], sender.id.as_str());
        assert_eq!(got["message"], "hi ann");
    }
    sender.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rooms_claim_limits_which_rooms_a_client_may_join() {
    let server = auth_server().await;
    let t = token(json!({"sub": "u", "rooms": ["lobby", "team-1:*"]}));
    let mut client = connect_with(&server, &format!("/?token={t}"), &[])
        .await
        .unwrap();
    client.join("lobby").await;
    client.join("team-1:general").await;
    client
        .send(json!({"type": "join_room", "room": "team-2:general"}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["message"], "Not allowed to join this room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_not_in_the_allowed_list_is_refused_with_403() {
    let server = start_server_with(|config| {
        config.allowed_origins = Some(vec![
            "https://app.example.com".into(),
            "https://*.example.org".into(),
        ]);
    })
    .await;
    for allowed in ["https://app.example.com", "https://chat.example.org"] {
        assert!(connect_with(&server, "/", &[("origin", allowed)])
            .await
            .is_ok());
    }
    for refused in [
        "https://evil.test",
        "http://app.example.com",
        "https://example.org",
    ] {
        assert_eq!(
            connect_with(&server, "/", &[("origin", refused)])
                .await
                .err(),
            Some(403),
            "{refused}"
        );
    }
    // Clients that are not browsers send no Origin and are not subject to it.
    assert!(connect_with(&server, "/", &[]).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_ip_cap_are_refused_with_429_until_one_closes() {
    let server = start_server_with(|config| config.max_connections_per_ip = 2).await;
    let first = connect_with(&server, "/", &[]).await.unwrap();
    let _second = connect_with(&server, "/", &[]).await.unwrap();
    assert_eq!(connect_with(&server, "/", &[]).await.err(), Some(429));
    first.close().await;
    let deadline = std::time::Instant::now() + common::EXPECT;
    loop {
        match connect_with(&server, "/", &[]).await {
            Ok(_) => break,
            Err(429) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(status) => panic!("place not given back: {status}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_global_cap_are_refused_with_503() {
    let server = start_server_with(|config| config.max_connections = 2).await;
    let _a = connect_with(&server, "/", &[]).await.unwrap();
    let _b = connect_with(&server, "/", &[]).await.unwrap();
    assert_eq!(connect_with(&server, "/", &[]).await.err(), Some(503));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    // Trusted: each forwarded client has its own per-IP count.
    let server = start_server_with(|config| {
        config.max_connections_per_ip = 1;
        config.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let _a = connect_with(&server, "/", &[("x-forwarded-for", "203.0.113.1")])
        .await
        .unwrap();
    let _b = connect_with(&server, "/", &[("x-forwarded-for", "203.0.113.2")])
        .await
        .unwrap();
    assert_eq!(
        connect_with(&server, "/", &[("x-forwarded-for", "203.0.113.1")])
            .await
            .err(),
        Some(429)
    );
    // Not trusted: the header is ignored and every connection counts for 127.0.0.1.
    let server = start_server_with(|config| config.max_connections_per_ip = 1).await;
    let _c = connect_with(&server, "/", &[("x-forwarded-for", "203.0.113.1")])
        .await
        .unwrap();
    assert_eq!(
        connect_with(&server, "/", &[("x-forwarded-for", "203.0.113.9")])
            .await
            .err(),
        Some(429)
    );
}

/// Opens a TCP connection, sends `preamble` then a WebSocket upgrade request, and returns the
/// HTTP status of the answer.
async fn upgrade_after(server: &common::TestServer, preamble: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut request = preamble.to_vec();
    request.extend_from_slice(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    stream.write_all(&request).await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(common::EXPECT, stream.read_exact(&mut head))
        .await
        .expect("an answer in time")
        .expect("a status line");
    let status = std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap();
    if status == 101 {
        // Keep the connection (and its place under the caps) until the test ends.
        std::mem::forget(stream);
    }
    status
}

fn proxy_v2(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]); // v2 PROXY, TCP over IPv4, 12 bytes
    header.extend_from_slice(&source);
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&port.to_be_bytes());
    header.extend_from_slice(&80u16.to_be_bytes());
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_header_from_a_trusted_proxy_gives_the_client_address() {
    let server = start_server_with(|config| {
        config.max_connections_per_ip = 1;
        config.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 40000 80\r\n").into_bytes();
    assert_eq!(upgrade_after(&server, &v1("198.51.100.1")).await, 101);
    assert_eq!(upgrade_after(&server, &v1("198.51.100.2")).await, 101);
    // The same client address again is over its cap: the header really set the address.
    assert_eq!(upgrade_after(&server, &v1("198.51.100.1")).await, 429);
    // Version 2 (binary) too.
    assert_eq!(
        upgrade_after(&server, &proxy_v2([198, 51, 100, 3], 1234)).await,
        101
    );
    assert_eq!(
        upgrade_after(&server, &proxy_v2([198, 51, 100, 3], 1235)).await,
        429
    );
    // A trusted proxy may also connect without a header.
    assert_eq!(upgrade_after(&server, b"").await, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_header_from_an_untrusted_peer_is_not_believed() {
    let server = start_server_with(|config| config.max_connections_per_ip = 1).await;
    let header = b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 80\r\n";
    // Not a load balancer: the header is just bytes before the request, which HTTP refuses.
    assert_eq!(upgrade_after(&server, header).await, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_pick_its_address_with_its_own_forwarded_header_line() {
    // Behind a proxy that appends its own X-Forwarded-For line (HAProxy's option forwardfor),
    // the client's own line comes first and must not be believed.
    let server = start_server_with(|config| {
        config.max_connections_per_ip = 1;
        config.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let mut kept = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..3 {
        let spoofed = format!("7.7.7.{i}");
        // tungstenite sends one line per header name, so build the request by hand.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let request = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             X-Forwarded-For: {spoofed}\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        statuses.push(std::str::from_utf8(&head[9..12]).unwrap().to_owned());
        kept.push(stream);
    }
    assert_eq!(statuses, ["101", "429", "429"], "all three are 5.6.7.8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_hop_with_a_port_is_read_and_nothing_left_of_it_is_skipped_to() {
    let server = start_server_with(|config| {
        config.max_connections_per_ip = 1;
        config.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let _first = connect_with(
        &server,
        "/",
        &[("x-forwarded-for", "8.8.8.1, 9.9.9.9:5555")],
    )
    .await
    .unwrap();
    assert_eq!(
        connect_with(
            &server,
            "/",
            &[("x-forwarded-for", "8.8.8.2, 9.9.9.9:5555")]
        )
        .await
        .err(),
        Some(429),
        "both are 9.9.9.9"
    );
}
