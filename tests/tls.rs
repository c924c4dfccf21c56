//! wss:// with a certificate from `--tls-cert` / `--tls-key`: a self-signed certificate made
//! for the test with rcgen, trusted by the test client alone.

mod common;

use std::sync::Arc;

use common::start_server_with;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

struct Certificate {
    dir: std::path::PathBuf,
    der: CertificateDer<'static>,
}

fn self_signed(name: &str) -> Certificate {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("roomcast-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    Certificate {
        dir,
        der: certified.cert.der().clone(),
    }
}

fn connector(trusted: CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_speaks_the_protocol_over_wss() {
    let cert = self_signed("ok");
    let (cert_path, key_path) = (cert.dir.join("cert.pem"), cert.dir.join("key.pem"));
    let server = start_server_with(|config| {
        config.tls_cert = Some(cert_path.to_string_lossy().into_owned());
        config.tls_key = Some(key_path.to_string_lossy().into_owned());
    })
    .await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls = connector(cert.der.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the configured certificate");
    let url = format!("wss://localhost:{}/", server.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    let next = |text: Message| -> Value { serde_json::from_str(text.to_text().unwrap()).unwrap() };
    let welcome = next(ws.next().await.unwrap().unwrap());
    assert_eq!(welcome["type"], "welcome");
    ws.send(Message::Text(
        json!({"type": "join_room", "room": "secure"}).to_string(),
    ))
    .await
    .unwrap();
    let joined = next(ws.next().await.unwrap().unwrap());
    assert_eq!(
        joined,
        json!({"type": "room_joined", "room": "secure", "members": 1})
    );
    std::fs::remove_dir_all(&cert.dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_ws_client_gets_no_upgrade_from_a_tls_listener() {
    let cert = self_signed("plain");
    let (cert_path, key_path) = (cert.dir.join("cert.pem"), cert.dir.join("key.pem"));
    let server = start_server_with(|config| {
        config.tls_cert = Some(cert_path.to_string_lossy().into_owned());
        config.tls_key = Some(key_path.to_string_lossy().into_owned());
    })
    .await;
    let attempt = tokio::time::timeout(
        common::EXPECT,
        tokio_tungstenite::connect_async(server.url()),
    )
    .await
    .expect("refused promptly");
    assert!(
        attempt.is_err(),
        "plain HTTP must not be upgraded on a wss:// listener"
    );
    std::fs::remove_dir_all(&cert.dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_certificate_file_is_a_clear_startup_error() {
    let mut config = roomcast::Config::with_listen("127.0.0.1:0".parse().unwrap());
    config.tls_cert = Some("/nonexistent/cert.pem".into());
    config.tls_key = Some("/nonexistent/key.pem".into());
    let error = roomcast::Server::bind(config, Default::default())
        .err()
        .expect("bind fails");
    assert!(
        error
            .to_string()
            .contains("--tls-cert /nonexistent/cert.pem"),
        "{error}"
    );
}
