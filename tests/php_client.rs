//! The server API driven by a real PHP script with ext-curl (`examples/php/publish.php`), as a
//! PHP application would call it. `.ci/run` installs Debian's php-cli and php-curl; elsewhere
//! the test says it was skipped unless CI is set, where a missing PHP fails it.

mod common;

use common::{pair_in_room, start_server_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_php_script_with_curl_publishes_into_a_room() {
    let php_works = std::process::Command::new("php")
        .args(["-r", "exit(function_exists('curl_init') ? 0 : 1);"])
        .status()
        .is_ok_and(|status| status.success());
    if !php_works {
        assert!(
            std::env::var_os("CI").is_none(),
            "php-cli with php-curl is required in CI (.ci/run installs them)"
        );
        eprintln!("skipped: no php with ext-curl on this machine");
        return;
    }
    let server = start_server_with(|config| config.api_key = Some("php-key".into())).await;
    let (mut a, mut b) = pair_in_room(&server, "orders").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/php/publish.php");
    let base = format!("http://{}", server.addr);
    let output = php(&[
        script,
        &base,
        "php-key",
        "orders",
        r#"{"order":42,"status":"shipped"}"#,
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), r#"{"delivered":2}"#);
    for member in [&mut a, &mut b] {
        let got = member.recv().await;
        assert_eq!(got["type"], "room_message");
        assert_eq!(got["from"], "php");
        assert_eq!(
            got["message"],
            serde_json::json!({"order": 42, "status": "shipped"})
        );
    }
    // A wrong key: the script reports roomcast's error and exits 1.
    let output = php(&[script, &base, "wrong", "orders", "1"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("401: API key required"));
}

/// Runs `php ARGS` off the runtime's threads, so the server keeps serving meanwhile.
async fn php(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("php")
            .args(&args)
            .output()
            .expect("run php")
    })
    .await
    .unwrap()
}
