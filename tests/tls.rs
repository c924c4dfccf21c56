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

/// A TLS stream reports frames written once they are in its own buffer; the outbox must flush
/// it before going idle, or the tail of a burst waits for the next frame (a ping, 30 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_of_a_burst_reaches_a_slow_wss_reader_without_another_frame() {
    use roomcast::outbox::{outbox, QueueLimits, SlowConsumerPolicy};
    use std::task::Poll;
    use tokio::io::AsyncReadExt;

    let cert = self_signed("tail");
    let acceptor = roomcast::tls::acceptor(
        cert.dir.join("cert.pem").to_str().unwrap(),
        cert.dir.join("key.pem").to_str().unwrap(),
    )
    .unwrap();
    // A small pipe stands in for a socket that fills up.
    let (server_io, client_io) = tokio::io::duplex(16 * 1024);
    let (server_tls, client_tls) = tokio::join!(
        acceptor.accept(server_io),
        connector(cert.der.clone()).connect(ServerName::try_from("localhost").unwrap(), client_io)
    );
    let (mut server_tls, mut client_tls) = (server_tls.unwrap(), client_tls.unwrap());
    let (tx, mut rx) = outbox(
        QueueLimits::frames(1024),
        SlowConsumerPolicy::Close,
        Arc::default(),
    );
    let (frames, frame_len) = (10usize, 8 * 1024);
    for i in 0..frames {
        tx.push(bytes::Bytes::from(vec![b'a' + i as u8; frame_len]));
    }
    // Driven as the connection task drives it: flush until idle, then wait to be woken.
    let writer = tokio::spawn(async move {
        let _keep_the_queue_open = tx;
        std::future::poll_fn(|cx| match rx.poll_flush(cx, &mut server_tls) {
            Poll::Ready(Ok(())) | Poll::Pending => Poll::<()>::Pending,
            Poll::Ready(other) => panic!("{:?}", other.map(|_| ())),
        })
        .await
    });
    // A slow reader: 1 KiB a millisecond.
    let (mut got, mut buf) = (0usize, [0u8; 1024]);
    while got < frames * frame_len {
        match tokio::time::timeout(std::time::Duration::from_secs(2), client_tls.read(&mut buf))
            .await
        {
            Ok(Ok(n)) if n > 0 => got += n,
            _ => break,
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    writer.abort();
    std::fs::remove_dir_all(&cert.dir).ok();
    assert_eq!(got, frames * frame_len, "bytes left in the TLS buffer");
}
