//! A real `redis-server` for the cluster tests, on a free loopback port, with no persistence,
//! killed when dropped. `.ci/run` installs Debian's redis-server; elsewhere a test without it
//! says it was skipped, unless CI is set, where a missing Redis fails it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RedisServer {
    child: Child,
    pub addr: SocketAddr,
}

impl RedisServer {
    /// Starts redis-server, or `None` (the test should return) when it is not installed and
    /// this is not CI.
    pub async fn start() -> Option<RedisServer> {
        if !Self::installed() {
            return None;
        }
        Some(Self::start_on(free_port()).await)
    }

    /// Whether redis-server is here; panics in CI, where it must be.
    fn installed() -> bool {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !installed {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is required in CI (.ci/run installs it)"
            );
            eprintln!("skipped: no redis-server on this machine");
        }
        installed
    }

    /// Starts redis-server on `port` (again, after a [`RedisServer::kill`]: empty).
    pub async fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &[]).await
    }

    /// Starts redis-server on `port` with `extra` arguments, and waits until it answers.
    async fn start_with(port: u16, extra: &[&std::ffi::OsStr]) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = RedisServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let started = Instant::now();
        while server.command(&["PING"]).await.as_deref() != Some("+PONG") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server answers within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Stops the process without closing anything (SIGSTOP): its connections stay open and
    /// silent, as across a network partition.
    pub fn pause(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: as in `pause`.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// Kills the server (SIGKILL): everything it held is gone.
    pub fn kill(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends one command and returns the first line of the answer (RESP, e.g. `:2` or `+PONG`),
    /// or `None` when the server does not answer.
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(self.addr).await.ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut answer))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&answer[..n]).into_owned();
        Some(
            text.split("\r\n")
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_owned(),
        )
    }

    /// How many connections subscribe to `channel` (`PUBSUB NUMSUB`).
    pub async fn subscribers(&self, channel: &str) -> usize {
        let answer = self
            .command(&["PUBSUB", "NUMSUB", channel])
            .await
            .unwrap_or_default();
        // *2 / $len / channel / :N
        answer
            .lines()
            .last()
            .and_then(|line| line.strip_prefix(':'))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `channel` has `count` subscribers (the nodes subscribe asynchronously).
    pub async fn wait_for_subscribers(&self, channel: &str, count: usize) {
        let started = Instant::now();
        loop {
            let now = self.subscribers(channel).await;
            if now == count {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{channel} has {now} subscribers, not {count}, after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters (no replicas) on free loopback ports, each a
/// [`RedisServer`] started with `--cluster-enabled yes`, joined by `redis-cli --cluster create`
/// (Debian's redis-tools, which redis-server depends on); killed when dropped.
pub struct RedisCluster {
    pub masters: Vec<RedisServer>,
    config_dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts the cluster, or `None` (the test should return) where redis-server is missing
    /// and this is not CI.
    pub async fn start() -> Option<RedisCluster> {
        if !RedisServer::installed() {
            return None;
        }
        let config_dir = std::env::temp_dir().join(format!(
            "roomcast-test-cluster-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&config_dir).expect("a directory for the cluster's files");
        let mut masters = Vec::new();
        for _ in 0..3 {
            let port = free_cluster_port();
            let config = config_dir.join(format!("nodes-{port}.conf"));
            let extra = [
                "--cluster-enabled".as_ref(),
                "yes".as_ref(),
                "--cluster-config-file".as_ref(),
                config.as_os_str(),
            ];
            masters.push(RedisServer::start_with(port, &extra).await);
        }
        let addresses: Vec<String> = masters.iter().map(|m| m.addr.to_string()).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create");
        let cluster = RedisCluster {
            masters,
            config_dir,
        };
        let started = Instant::now();
        for master in &cluster.masters {
            while !master
                .command(&["CLUSTER", "INFO"])
                .await
                .is_some_and(|info| info.contains("cluster_state:ok"))
            {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the cluster is ok"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Some(cluster)
    }

    /// The masters' URLs, for `--redis-cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.masters.iter().map(RedisServer::url).collect()
    }

    /// How many connections subscribe to the shard channel `channel`, over all masters
    /// (`PUBSUB SHARDNUMSUB`), and how many to a plain channel of that name (`PUBSUB NUMSUB`).
    pub async fn subscribers(&self, channel: &str) -> (usize, usize) {
        let mut counts = (0, 0);
        for master in &self.masters {
            let count = |answer: Option<String>| {
                answer
                    .unwrap_or_default()
                    .lines()
                    .last()
                    .and_then(|line| line.strip_prefix(':'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0)
            };
            counts.0 += count(master.command(&["PUBSUB", "SHARDNUMSUB", channel]).await);
            counts.1 += count(master.command(&["PUBSUB", "NUMSUB", channel]).await);
        }
        counts
    }

    /// Waits until the shard channel `channel` has `count` subscribers.
    pub async fn wait_for_subscribers(&self, channel: &str, count: usize) {
        let started = Instant::now();
        loop {
            let (now, _) = self.subscribers(channel).await;
            if now == count {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{channel} has {now} shard subscribers, not {count}, after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one command about one key to the master that owns its slot (the others answer
    /// `-MOVED`).
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        let mut answer = None;
        for master in &self.masters {
            answer = master.command(args).await;
            if !answer.as_deref().is_some_and(|a| a.starts_with("-MOVED")) {
                return answer;
            }
        }
        answer
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(Instant::now().elapsed().as_nanos() as u64);
    hasher.finish()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.masters.clear();
        let _ = std::fs::remove_dir_all(&self.config_dir);
    }
}

/// A free port for a cluster node: Redis also binds its cluster bus at the port + 10,000, and
/// refuses to start above 55,535, where that would not fit (ephemeral ports go to 60,999).
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
