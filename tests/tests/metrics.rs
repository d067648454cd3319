//! The admin listeners' `/metrics` as Prometheus reads it: `promtool check
//! metrics` passes on a server's and an offloader's real output, and the
//! alert rules and dashboards in deploy/monitoring query only families
//! they export.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::Http;
use log_buffer::{FileSink, Offloader};
use redis_failover::FailoverClient;
use redis_topology::Topology;
use serde_json::json;
use server::OffloaderAdmin;
use server::dev::{DevOptions, DevSystem};

/// A dev system that has answered requests (a success, an error) and shipped
/// an audit record, so that every family has series; and its `/metrics`.
async fn served_metrics() -> (DevSystem, String) {
    let options = DevOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..DevOptions::default()
    };
    let system = DevSystem::start(options).await.expect("dev system");
    let http = Http::new(system.local_addr());
    let admin = Http::new(system.admin_addr().expect("an admin listener"));
    let user1 = http.login("user1", &system.password).await;
    let created = user1
        .json("POST", "/data?key=k", &json!({"value": "v"}))
        .await;
    assert!(created.status.is_success(), "{created:?}");
    assert_eq!(user1.get("/data/missing").await.status, 404);
    // The offloader's per-tenant series appear once it has shipped the
    // write's audit record.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = String::from_utf8(admin.get("/metrics").await.body.to_vec()).unwrap();
        if text.contains("log_offloader_sent_lines_total{tenant_id=\"tenant1\"}") {
            return (system, text);
        }
        assert!(Instant::now() < deadline, "nothing shipped: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `promtool`, if installed (.ci/run installs Debian's `prometheus` for it).
fn promtool() -> Option<Command> {
    let found = Command::new("promtool").arg("--version").output();
    match found {
        Ok(output) if output.status.success() => Some(Command::new("promtool")),
        _ => {
            eprintln!("promtool not found: skipped (Debian: apt-get install prometheus)");
            None
        }
    }
}

/// Fails the test with promtool's complaints about `text`.
fn check_with_promtool(mut promtool: Command, text: &str) {
    let mut child = promtool
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let problems = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "promtool check metrics: {problems}\non:\n{text}"
    );
    let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    eprintln!("promtool check metrics: no problem in {families} families{problems}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_servers_metrics() {
    let Some(promtool) = promtool() else {
        return;
    };
    let (system, text) = served_metrics().await;
    check_with_promtool(promtool, &text);
    system.shutdown().await;
}

/// Families exported only in some configurations or after some events,
/// which the dev system of these tests does not reach: each with why.
const CONDITIONAL: [(&str, &str); 4] = [
    (
        "redis_failover_replicas_online",
        "only with redis_wait_replicas",
    ),
    (
        "redis_failover_replicas_waited_for",
        "only with redis_wait_replicas",
    ),
    (
        "redis_failover_durable_writes_blocked",
        "only with redis_wait_replicas",
    ),
    (
        "log_offloader_dead_lettered_total",
        "only once an entry is dead-lettered",
    ),
];

/// The families named in `text` (`# TYPE` lines) and their series' names.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap();
            names.insert(family.to_owned());
            let suffixes: &[&str] = match kind {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["_sum", "_count"],
                _ => &[],
            };
            names.extend(suffixes.iter().map(|suffix| format!("{family}{suffix}")));
        }
    }
    names
}

/// Names of the service's series in a rules file or dashboard.
fn queried(text: &str) -> BTreeSet<String> {
    let prefixes = ["http_", "redis_failover_", "log_buffer_", "log_offloader_"];
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| c.is_ascii_lowercase()) {
        rest = &rest[start..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let word = &rest[..end];
        if prefixes.iter().any(|p| word.starts_with(p)) {
            names.insert(word.to_owned());
        }
        rest = &rest[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboards_query_only_exported_families() {
    let (system, server_text) = served_metrics().await;
    let (offloader, offloader_text) = offloader_metrics().await;
    let mut known = exported(&server_text);
    known.extend(exported(&offloader_text));
    known.extend(CONDITIONAL.iter().map(|(name, _)| (*name).to_owned()));
    let monitoring = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/monitoring");
    let mut files = vec![format!("{monitoring}/alerts.yml")];
    for entry in std::fs::read_dir(format!("{monitoring}/dashboards")).unwrap() {
        files.push(entry.unwrap().path().display().to_string());
    }
    let mut used = 0;
    for file in &files {
        let names = queried(&std::fs::read_to_string(file).unwrap());
        let unknown: Vec<&String> = names.iter().filter(|n| !known.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} queries {unknown:?}, not exported"
        );
        used += names.len();
    }
    assert!(used > 20, "too few names found in {files:?}: {used}");
    offloader.shutdown(Duration::from_secs(5)).await;
    system.shutdown().await;
}

/// A running offloader, with its admin listener, that has shipped an audit
/// record of `acme`; and its `/metrics`.
async fn offloader_metrics() -> (Shipping, String) {
    let topology = Topology::builder()
        .replicas(0)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let client = FailoverClient::candidates([topology.addr(topology.initial_master()).into()])
        .build()
        .unwrap();
    let _: String = client
        .query(
            redis::cmd("XADD")
                .arg("tenant:{acme}:audit")
                .arg("*")
                .arg("ts")
                .arg(now_ns().to_string())
                .arg("action")
                .arg("create_key"),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::new(dir.path().join("shipped.ndjson"));
    let offloader = Offloader::builder(client.clone(), sink)
        .poll_interval(Duration::from_millis(20))
        .discovery_interval(Duration::from_millis(100))
        .start()
        .unwrap();
    let admin = OffloaderAdmin::bind("127.0.0.1:0".parse().unwrap(), client, offloader)
        .await
        .unwrap();
    let http = Http::new(admin.local_addr());
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = String::from_utf8(http.get("/metrics").await.body.to_vec()).unwrap();
        if text.contains("log_offloader_sent_lines_total{tenant_id=\"acme\"} 1") {
            break text;
        }
        assert!(Instant::now() < deadline, "nothing shipped: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let shipping = Shipping {
        admin,
        _dir: dir,
        _topology: topology,
    };
    (shipping, text)
}

/// What [`offloader_metrics`] runs, stopped by [`Shipping::shutdown`].
struct Shipping {
    admin: OffloaderAdmin,
    _dir: tempfile::TempDir,
    _topology: Topology,
}

impl Shipping {
    async fn shutdown(self, grace: Duration) {
        self.admin.shutdown(grace).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offloader_serves_its_figures_to_prometheus() {
    let (offloader, text) = offloader_metrics().await;
    let http = Http::new(offloader.admin.local_addr());
    assert_eq!(http.get("/healthz").await.status, 200);
    assert_eq!(http.get("/elsewhere").await.status, 404);
    assert!(text.contains("redis_failover_master_known 1"), "{text}");
    assert!(
        !text.contains("http_"),
        "an offloader answers no requests: {text}"
    );
    if let Some(promtool) = promtool() {
        check_with_promtool(promtool, &text);
    }
    offloader.shutdown(Duration::from_secs(5)).await;
}

fn now_ns() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    u64::try_from(since_epoch.unwrap().as_nanos()).unwrap()
}
