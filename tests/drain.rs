//! Readiness and graceful drain: /readyz, --shutdown-delay, close 1001 to every client, and the
//! real binary exiting 0 on SIGTERM within its drain timeout.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{start_server_with, Client, TestServer};

async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    common::status(&common::http_get(addr, path).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_200_while_serving() {
    let server = start_server_with(|_| {}).await;
    assert_eq!(http_status(server.addr, "/readyz").await, 200);
    assert_eq!(http_status(server.addr, "/healthz").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_shutdown_delay_readyz_is_503_and_clients_are_still_served() {
    let server: TestServer = start_server_with(|config| {
        config.shutdown_delay = Duration::from_secs(2);
    })
    .await;
    let mut a = Client::connect(&server).await;
    server.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(http_status(server.addr, "/readyz").await, 503);
    // Still serving: a new client connects and the old one is answered.
    let mut b = Client::connect(&server).await;
    a.join("still").await;
    b.join("still").await;
    // Then every client is told to go elsewhere.
    for client in [&mut a, &mut b] {
        let frame = client.recv_close(Duration::from_secs(5)).await;
        assert_eq!(common::code(&frame), 1001);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_drains_with_1001_and_exits_0_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--drain-timeout",
            "3s",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the roomcast binary");
    // The log line names the bound address. A thread reads the log so the pipe never fills.
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let addr = loop {
        let line = lines_rx
            .recv_timeout(common::EXPECT)
            .expect("the server logs where it listens");
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let url = format!("ws://{addr}/");
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut client = Client {
        ws,
        id: String::new(),
        welcome: serde_json::Value::Null,
    };
    assert_eq!(client.recv().await["type"], "welcome");

    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let frame = client.recv_close(Duration::from_secs(5)).await;
    assert_eq!(common::code(&frame), 1001);
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exited within the drain timeout: {:?}",
        signalled.elapsed()
    );
}
