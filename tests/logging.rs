//! The binary's per-connection log lines: `info` only under `--log-connections`, and `debug`
//! otherwise (the metrics count connections either way).

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::Client;

/// Runs the binary at `RUST_LOG=info` with `args`, opens and closes one connection, stops the
/// binary with SIGTERM and returns every line it logged.
async fn lines_logged_around_one_connection(args: &[&str]) -> Vec<String> {
    let child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the roomcast binary");
    // Killed if the test fails before it stops the binary itself.
    let mut child = KillOnDrop(Some(child));
    let stdout = child.0.as_mut().unwrap().stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let line = lines_rx
            .recv_timeout(common::EXPECT)
            .expect("the server logs where it listens");
        let addr = line
            .split("addr=")
            .nth(1)
            .map(|rest| rest.split_whitespace().next().unwrap().to_owned());
        lines.push(line);
        if let Some(addr) = addr {
            break addr;
        }
    };
    // It reads the welcome.
    let client = Client::connect_url(&format!("ws://{addr}/")).await;
    client.close().await;
    // The close is logged when the connection's task ends, right after the close handshake.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut child = child.0.take().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    // The reader thread ends at EOF, once the process is gone.
    lines.extend(lines_rx.iter());
    lines
}

/// The binary's process, killed when dropped unless taken out.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn connections_are_logged_at_info_under_log_connections() {
    let lines = lines_logged_around_one_connection(&["--log-connections"]).await;
    let opened = lines.iter().find(|line| line.contains("connection opened"));
    let opened = opened.unwrap_or_else(|| panic!("no opening line in {lines:#?}"));
    assert!(opened.contains("INFO"), "{opened}");
    assert!(opened.contains("client_id=client_"), "{opened}");
    let closed = lines.iter().find(|line| line.contains("connection closed"));
    let closed = closed.unwrap_or_else(|| panic!("no closing line in {lines:#?}"));
    assert!(closed.contains("INFO"), "{closed}");
    assert!(closed.contains("reason=client closed"), "{closed}");
    assert!(closed.contains("duration_ms="), "{closed}");
}

#[tokio::test]
async fn connections_are_not_logged_at_info_by_default() {
    let lines = lines_logged_around_one_connection(&[]).await;
    assert!(
        lines.iter().any(|line| line.contains("addr=")),
        "the startup line is there: {lines:#?}"
    );
    assert!(
        !lines
            .iter()
            .any(|line| line.contains("connection opened") || line.contains("connection closed")),
        "no per-connection line at info: {lines:#?}"
    );
}
