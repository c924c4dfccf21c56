//! Configuration layers: the `--config` TOML file under flags and environment variables, and
//! clear errors for unknown keys and bad values.

use std::ffi::OsString;

use roomcast::config::{load, LoadError};

fn file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("roomcast-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn args(list: &[&str]) -> Vec<OsString> {
    std::iter::once("roomcast")
        .chain(list.iter().copied())
        .map(OsString::from)
        .collect()
}

#[test]
fn the_file_sets_options_by_their_flag_names() {
    let path = file(
        "sets.toml",
        r#"
        listen = "127.0.0.1:9100"
        max-connections = 1234
        allowed-origins = ["https://a.example", "https://*.b.example"]
        ping-interval = "15s"
        slow-consumer = "drop"
        "#,
    );
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:9100");
    assert_eq!(config.max_connections, 1234);
    assert_eq!(
        config.allowed_origins.unwrap(),
        ["https://a.example", "https://*.b.example"]
    );
    assert_eq!(config.ping_interval, std::time::Duration::from_secs(15));
    assert_eq!(
        config.slow_consumer,
        roomcast::outbox::SlowConsumerPolicy::Drop
    );
}

#[test]
fn flags_override_the_file() {
    let path = file("flags.toml", "max-connections = 10\nworkers = 1\n");
    let config = load(args(&[
        "--max-connections",
        "20",
        "--config",
        path.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(config.max_connections, 20, "the flag wins");
    assert_eq!(config.workers, 1, "the file still sets what no flag sets");
}

#[test]
fn options_the_file_leaves_out_keep_their_defaults() {
    let path = file("defaults.toml", "max-connections = 10\n");
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(config.max_message_size, 64 * 1024);
    assert_eq!(config.outbound_queue, 1024);
}

#[test]
fn an_unknown_key_is_an_error_naming_it() {
    let path = file("unknown.toml", "max-conections = 10\n");
    let error = load(args(&["--config", path.to_str().unwrap()])).unwrap_err();
    assert!(matches!(error, LoadError::Config(_)), "{error}");
    assert!(
        error.to_string().contains("unknown key `max-conections`"),
        "{error}"
    );
}

#[test]
fn a_bad_value_is_an_error_naming_the_option() {
    let path = file("bad.toml", "workers = \"many\"\n");
    let error = load(args(&["--config", path.to_str().unwrap()])).unwrap_err();
    assert!(error.to_string().contains("--workers"), "{error}");
    let path = file("zero.toml", "workers = 0\n");
    let error = load(args(&["--config", path.to_str().unwrap()])).unwrap_err();
    assert!(
        error.to_string().contains("--workers must be at least 1"),
        "{error}"
    );
}

#[test]
fn an_outbound_byte_bound_too_small_for_the_largest_messages_is_refused() {
    // 1 MiB messages with the default 1 MiB queue: two in a row would close a fast reader.
    let error = load(args(&["--max-message-size", "1048576"])).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("--outbound-queue-bytes must be at least 4 x --max-message-size"),
        "{error}"
    );
    let config = load(args(&[
        "--max-message-size",
        "1048576",
        "--outbound-queue-bytes",
        "4194304",
    ]))
    .unwrap();
    assert_eq!(config.outbound_queue_bytes, 4 * 1024 * 1024);
}

#[test]
fn a_file_that_is_not_toml_is_an_error_naming_the_file() {
    let path = file("broken.toml", "listen = \n");
    let error = load(args(&["--config", path.to_str().unwrap()])).unwrap_err();
    assert!(error.to_string().contains("broken.toml"), "{error}");
}

#[test]
fn the_effective_configuration_prints_as_toml_with_the_secret_redacted() {
    let path = file(
        "print.toml",
        "jwt-secret = \"hunter2\"\nmax-connections = 7\n",
    );
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    let text = config.to_toml();
    assert!(text.contains("max-connections = 7"), "{text}");
    assert!(text.contains("jwt-secret = \"<redacted>\""), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("ping-interval = \"30s\""), "{text}");
}

fn check_config(path: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_roomcast"));
    command.arg("check-config").arg(path);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run roomcast check-config")
}

#[test]
fn check_config_prints_the_effective_configuration_with_the_environment_over_the_file() {
    let path = file("check.toml", "max-connections = 10\nworkers = 3\n");
    let output = check_config(&path, &[("ROOMCAST_MAX_CONNECTIONS", "99")]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("max-connections = 99"),
        "the environment wins: {text}"
    );
    assert!(
        text.contains("workers = 3"),
        "the file sets the rest: {text}"
    );
}

#[test]
fn check_config_exits_2_with_the_reason_for_a_bad_file() {
    let path = file("check-bad.toml", "listen = \"not an address\"\n");
    let output = check_config(&path, &[]);
    assert_eq!(output.status.code(), Some(2));
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.contains("--listen"), "{error}");
    let path = file(
        "check-tls.toml",
        "tls-cert = \"/nope/cert.pem\"\ntls-key = \"/nope/key.pem\"\n",
    );
    let output = check_config(&path, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8(output.stderr)
        .unwrap()
        .contains("/nope/cert.pem"));
}

#[test]
fn size_limits_and_the_drain_timeout_have_sane_bounds() {
    let error = load(args(&["--max-message-size", "4294967296"])).unwrap_err();
    assert!(error.to_string().contains("at most 1 GiB"), "{error}");
    let error = load(args(&["--drain-timeout", "0s"])).unwrap_err();
    assert!(error.to_string().contains("--drain-timeout"), "{error}");
}

#[test]
fn the_socket_send_buffer_is_bounded_by_default_and_0_leaves_autotuning() {
    assert_eq!(load(args(&[])).unwrap().socket_send_buffer, 128 * 1024);
    let path = file("sndbuf.toml", "socket-send-buffer = 0\n");
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(config.socket_send_buffer, 0, "0: the kernel's autotuning");
    let config = load(args(&["--socket-send-buffer", "65536"])).unwrap();
    assert_eq!(config.socket_send_buffer, 65536);
    let error = load(args(&["--socket-send-buffer", "1000"])).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("--socket-send-buffer must be 0 (kernel autotuning) or at least 4096"),
        "{error}"
    );
    let error = load(args(&["--socket-send-buffer", "4294967296"])).unwrap_err();
    assert!(error.to_string().contains("at most 1 GiB"), "{error}");
}

#[test]
fn a_list_in_the_file_is_read_as_a_list() {
    let path = file(
        "lists.toml",
        r#"
        allowed-origins = ["https://a.example", "https://b.example"]
        trusted-proxies = ["10.0.0.0/8", "192.168.1.1"]
        "#,
    );
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(
        config.allowed_origins.unwrap(),
        ["https://a.example", "https://b.example"]
    );
    assert_eq!(config.trusted_proxies, ["10.0.0.0/8", "192.168.1.1"]);
    // The flag's comma-separated form is a list too.
    let path = file(
        "comma.toml",
        "allowed-origins = \"https://a.example,https://b.example\"\n",
    );
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(
        config.allowed_origins.unwrap(),
        ["https://a.example", "https://b.example"]
    );
}

#[test]
fn file_values_parse_like_their_flags() {
    let path = file(
        "typed.toml",
        r#"
        client-broadcast = false
        log-format = "json"
        log-connections = true
        jwt-leeway = "1m"
        rate-limit = 2.5
        rate-burst-bytes = 65536
        "#,
    );
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert!(!config.client_broadcast);
    assert_eq!(config.log_format, roomcast::telemetry::LogFormat::Json);
    assert!(config.log_connections);
    assert_eq!(config.jwt_leeway, std::time::Duration::from_secs(60));
    assert_eq!(config.rate_limit, 2.5);
    assert_eq!(config.rate_burst_bytes, Some(65536));
    let path = file("int-rate.toml", "rate-limit = 50\n");
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(config.rate_limit, 50.0, "an integer for a float, as a flag");
}

#[test]
fn a_file_value_of_the_wrong_type_is_refused_naming_the_key() {
    for (name, text, key) in [
        ("list-for-scalar.toml", "workers = [4]\n", "`workers`"),
        ("table-for-scalar.toml", "[listen]\nport = 1\n", "`listen`"),
        (
            "number-in-list.toml",
            "trusted-proxies = [10]\n",
            "`trusted-proxies`",
        ),
        (
            "bool-as-text.toml",
            "client-broadcast = \"no\"\n",
            "`client-broadcast`",
        ),
    ] {
        let path = file(name, text);
        let error = load(args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(matches!(error, LoadError::Config(_)), "{error}");
        let error = error.to_string();
        assert!(error.contains(key), "{name}: {error}");
        assert!(error.contains(name), "{name}: {error}");
    }
}

#[test]
fn an_environment_variable_beats_the_file() {
    // In a child process: the variable would be seen by every test of this one.
    let path = file(
        "env-over-file.toml",
        "ping-interval = \"15s\"\nallowed-origins = [\"https://file.example\"]\nworkers = 3\n",
    );
    let output = check_config(
        &path,
        &[
            ("ROOMCAST_PING_INTERVAL", "20s"),
            ("ROOMCAST_ALLOWED_ORIGINS", "https://env.example"),
        ],
    );
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("ping-interval = \"20s\""), "{text}");
    assert!(
        text.contains("allowed-origins = [\"https://env.example\"]"),
        "{text}"
    );
    assert!(
        text.contains("workers = 3"),
        "the file sets the rest: {text}"
    );
}

#[test]
fn a_flag_beats_the_environment_and_the_file() {
    // Set for this whole test process: no other test reads --max-room-name-length.
    std::env::set_var("ROOMCAST_MAX_ROOM_NAME_LENGTH", "200");
    let path = file("flag-over-env.toml", "max-room-name-length = 100\n");
    let config = load(args(&[
        "--config",
        path.to_str().unwrap(),
        "--max-room-name-length",
        "300",
    ]))
    .unwrap();
    assert_eq!(config.max_room_name_length, 300, "the flag wins");
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(config.max_room_name_length, 200, "then the environment");
}

#[test]
fn config_is_not_a_key_of_the_file() {
    let path = file("nested.toml", "config = \"other.toml\"\n");
    let error = load(args(&["--config", path.to_str().unwrap()])).unwrap_err();
    assert!(
        error.to_string().contains("unknown key `config`"),
        "{error}"
    );
}

#[test]
fn options_that_go_together_may_come_from_different_layers() {
    let path = file("tls-key.toml", "tls-key = \"/etc/key.pem\"\n");
    let config = load(args(&[
        "--tls-cert",
        "/etc/cert.pem",
        "--config",
        path.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(config.tls_cert.as_deref(), Some("/etc/cert.pem"));
    assert_eq!(config.tls_key.as_deref(), Some("/etc/key.pem"));
    let error = load(args(&["--config", path.to_str().unwrap()])).unwrap_err();
    assert!(
        error.to_string().contains("--tls-cert and --tls-key"),
        "{error}"
    );
    let path = file("jwt-secret.toml", "jwt-secret = \"s\"\n");
    let error = load(args(&[
        "--jwt-public-key",
        "/etc/jwt.pem",
        "--config",
        path.to_str().unwrap(),
    ]))
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("--jwt-secret and --jwt-public-key cannot both be set"),
        "{error}"
    );
}

#[test]
fn a_webhook_url_without_a_secret_is_refused() {
    let error = load(args(&["--webhook-url", "https://app.example/hooks"])).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("--webhook-url needs --webhook-secret"),
        "{error}"
    );
    let path = file("webhook-secret.toml", "webhook-secret = \"s\"\n");
    let config = load(args(&[
        "--webhook-url",
        "https://app.example/hooks",
        "--config",
        path.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(config.webhook_secret.as_deref(), Some("s"));
    assert_eq!(config.webhook_queue, 10_000);
    assert_eq!(config.webhook_batch, 100);
    assert_eq!(config.webhook_retries, 7);
    assert_eq!(config.webhook_timeout, std::time::Duration::from_secs(5));
    assert_eq!(
        config.webhook_retry_backoff,
        std::time::Duration::from_millis(500)
    );
    for bad in [
        ["--webhook-queue", "0"],
        ["--webhook-queue", "18446744073709551615"],
        ["--webhook-batch", "0"],
        ["--webhook-retry-backoff", "0s"],
    ] {
        let mut all = bad.to_vec();
        all.extend(["--webhook-url", "https://app.example/hooks"]);
        all.extend(["--webhook-secret", "s"]);
        let error = load(args(&all)).unwrap_err();
        assert!(error.to_string().contains(bad[0]), "{bad:?}: {error}");
    }
    assert!(
        !config.to_toml().contains("= \"s\""),
        "the secret is redacted: {}",
        config.to_toml()
    );
}

#[test]
fn check_config_refuses_a_webhook_url_that_is_not_http() {
    let path = file(
        "check-webhook.toml",
        "webhook-url = \"ftp://app.example/hooks\"\nwebhook-secret = \"s\"\n",
    );
    let output = check_config(&path, &[]);
    assert_eq!(output.status.code(), Some(2));
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.contains("--webhook-url"), "{error}");
    assert!(error.contains("http or https"), "{error}");
}

#[test]
fn the_proxies_are_read_from_the_file_with_their_timeout() {
    let path = file(
        "proxies.toml",
        r#"
        connect-proxy = "http://127.0.0.1:8000/roomcast/connect"
        join-proxy = "https://app.example/roomcast/join"
        publish-proxy = "http://app:8000/roomcast/publish"
        proxy-timeout = "750ms"
        "#,
    );
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(
        config.connect_proxy.as_deref(),
        Some("http://127.0.0.1:8000/roomcast/connect")
    );
    assert_eq!(
        config.join_proxy.as_deref(),
        Some("https://app.example/roomcast/join")
    );
    assert_eq!(
        config.publish_proxy.as_deref(),
        Some("http://app:8000/roomcast/publish")
    );
    assert_eq!(config.proxy_timeout, std::time::Duration::from_millis(750));
    let path = file("bad-proxy.toml", "publish-proxy = \"app:8000/publish\"\n");
    let error = load(args(&["--config", path.to_str().unwrap()]))
        .unwrap_err()
        .to_string();
    assert!(error.contains("--publish-proxy"), "{error}");
}

#[test]
fn redis_cluster_takes_a_list_of_masters_from_a_flag_or_the_file_and_selects_its_broker() {
    let config = load(args(&[
        "--redis-cluster",
        "redis://127.0.0.1:7001,redis://127.0.0.1:7002",
    ]))
    .unwrap();
    assert_eq!(
        config.redis_cluster,
        ["redis://127.0.0.1:7001", "redis://127.0.0.1:7002"]
    );
    assert_eq!(config.broker(), roomcast::broker::BrokerKind::RedisCluster);
    let path = file(
        "cluster.toml",
        "redis-cluster = [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]\n",
    );
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(config.redis_cluster.len(), 2);
    assert_eq!(config.broker(), roomcast::broker::BrokerKind::RedisCluster);
}

#[test]
fn redis_and_redis_cluster_together_are_refused() {
    let path = file("both.toml", "redis = \"redis://127.0.0.1:6379\"\n");
    let error = load(args(&[
        "--config",
        path.to_str().unwrap(),
        "--redis-cluster",
        "redis://127.0.0.1:7001",
    ]))
    .unwrap_err();
    assert!(
        error.to_string().contains("--redis and --redis-cluster"),
        "{error}"
    );
}

#[test]
fn a_redis_prefix_with_braces_is_refused_as_it_would_move_keys_between_cluster_slots() {
    let error = load(args(&["--redis-prefix", "app{1}"])).unwrap_err();
    assert!(error.to_string().contains("--redis-prefix"), "{error}");
}

#[test]
fn history_needs_both_a_size_and_a_ttl_and_works_with_redis_too() {
    let config = load(args(&["--history-size", "50", "--history-ttl", "2m"])).unwrap();
    let history = config.history().expect("on");
    assert_eq!((history.size, history.ttl.as_secs()), (50, 120));
    assert_eq!(history.max_recovery, 1000, "the default cap");
    assert!(
        load(args(&[])).unwrap().history().is_none(),
        "off by default"
    );
    let error = load(args(&["--history-size", "50"])).unwrap_err();
    assert!(error.to_string().contains("--history-ttl"), "{error}");
    let clustered = load(args(&[
        "--history-size",
        "50",
        "--history-ttl",
        "2m",
        "--redis",
        "redis://127.0.0.1:6379/",
    ]))
    .unwrap();
    assert!(clustered.history().is_some(), "kept in Redis");
}

#[test]
fn history_rooms_tables_in_the_file_give_patterns_their_own_history() {
    let path = file(
        "history-rooms.toml",
        r#"
        history-size = 100
        history-ttl = "5m"

        [[history-rooms]]
        pattern = "audit:*"
        size = 1000
        ttl = "1h"

        [[history-rooms]]
        pattern = "typing"
        size = 0
        ttl = "0s"
        "#,
    );
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    let policy = config.history_policy().unwrap();
    let audit = policy.for_room("audit:payments").unwrap();
    assert_eq!((audit.size, audit.ttl.as_secs()), (1000, 3600));
    assert!(policy.for_room("typing").is_none());
    assert_eq!(policy.for_room("lobby").unwrap().size, 100);
    let bad = file(
        "history-rooms-bad.toml",
        "history-size = 1\nhistory-ttl = \"1m\"\n[[history-rooms]]\npattern = \"x\"\nsize = 1\nttl = \"soon\"\n",
    );
    let error = load(args(&["--config", bad.to_str().unwrap()])).unwrap_err();
    assert!(error.to_string().contains("history-rooms"), "{error}");
}

#[test]
fn the_echo_and_relay_paths_must_be_paths_and_differ() {
    let error = load(args(&["--relay-path", "relay"])).unwrap_err();
    assert!(error.to_string().contains("must start with /"), "{error}");
    let error = load(args(&["--relay-path", "/ws", "--echo-path", "/ws"])).unwrap_err();
    assert!(error.to_string().contains("must differ"), "{error}");
    let config = load(args(&["--relay-path", "/relay", "--echo-path", "/echo"])).unwrap();
    assert_eq!(config.relay_path.as_deref(), Some("/relay"));
}

#[test]
fn pusher_apps_tables_in_the_file_add_apps_with_their_options_and_the_secret_stays_redacted() {
    let path = file(
        "pusher-apps.toml",
        r#"
        pusher-app = ["1:flag-key:flag-secret"]

        [[pusher-apps]]
        id = "2"
        key = "quiet-key"
        secret = "table-secret"
        client-events = false
        max-connections = 500
        "#,
    );
    let config = load(args(&["--config", path.to_str().unwrap()])).unwrap();
    assert_eq!(config.pusher_apps.len(), 1);
    let table = &config.pusher_apps[0];
    assert_eq!((table.id.as_str(), table.key.as_str()), ("2", "quiet-key"));
    assert!(!table.client_events);
    assert_eq!(table.max_connections, Some(500));
    let printed = config.to_toml();
    assert!(!printed.contains("table-secret"), "{printed}");
    let twice = file(
        "pusher-apps-twice.toml",
        "pusher-app = [\"2:k:s\"]\n[[pusher-apps]]\nid = \"2\"\nkey = \"other\"\nsecret = \"s\"\n",
    );
    let error = load(args(&["--config", twice.to_str().unwrap()])).unwrap_err();
    assert!(error.to_string().contains("given twice"), "{error}");
    let unknown = file(
        "pusher-apps-unknown.toml",
        "[[pusher-apps]]\nid = \"3\"\nkey = \"k\"\nsecret = \"s\"\nwebhooks = true\n",
    );
    assert!(load(args(&["--config", unknown.to_str().unwrap()])).is_err());
}

#[test]
fn a_pusher_apps_webhook_url_must_be_http_and_is_taken_across_nodes_too() {
    let table = |url: &str| {
        format!(
            "[[pusher-apps]]\nid = \"9\"\nkey = \"k\"\nsecret = \"s\"\nwebhook-url = \"{url}\"\n"
        )
    };
    let good = file(
        "pusher-hooks.toml",
        &table("http://app.internal/pusher/webhooks"),
    );
    let config = load(args(&["--config", good.to_str().unwrap()])).unwrap();
    assert!(config.pusher_apps[0].webhook_url.is_some());
    assert!(
        !config.to_toml().contains("app.internal"),
        "the URL is redacted"
    );
    let bad = file("pusher-hooks-bad.toml", &table("ftp://app.internal/x"));
    let error = load(args(&["--config", bad.to_str().unwrap()])).unwrap_err();
    assert!(error.to_string().contains("webhook-url"), "{error}");
    let clustered = load(args(&[
        "--config",
        good.to_str().unwrap(),
        "--redis",
        "redis://127.0.0.1:6379",
    ]))
    .unwrap();
    assert!(clustered.pusher_apps[0].webhook_url.is_some());
}
