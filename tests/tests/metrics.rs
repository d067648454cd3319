//! The admin listener's `/metrics` as Prometheus reads it: `promtool check
//! metrics` passes on a server's real output, and every series the alert
//! rules and dashboards in deploy/ query is one the server exports.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::Http;
use serde_json::json;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_servers_metrics() {
    let Some(mut promtool) = promtool() else {
        return;
    };
    let (system, text) = served_metrics().await;
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
    system.shutdown().await;
}
