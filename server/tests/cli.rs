//! The `server` binary: `dev` serves until SIGINT (shipping a read's audit
//! record whatever `RUST_LOG` says) and then leaves no Redis
//! behind; `serve` acknowledges a write once the replicas it is told to
//! wait for have it; invalid settings exit with status 2 naming the
//! setting; the admin subcommands manage users with the password from stdin.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis_topology::Topology;

const BINARY: &str = env!("CARGO_BIN_EXE_server");
const DEADLINE: Duration = Duration::from_secs(60);

/// SIGKILLs the binary if a test fails while it runs (the next topology
/// started on the machine then reaps its Redis processes).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    kill(Pid::from_raw(pid), None).is_ok() && state != Some('Z')
}

/// One HTTP/1.1 exchange on a connection of its own; the whole answer.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n{headers}\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

fn get(addr: SocketAddr, path: &str) -> String {
    http(addr, "GET", path, "", "")
}

/// Waits until `child` exits, failing the test at `deadline`.
fn exit_status(child: &mut KillOnDrop, deadline: Instant) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dev_serves_until_sigint_and_leaves_nothing_behind() {
    let mut child = KillOnDrop(
        Command::new(BINARY)
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            // Audit records ship whatever the filter of the process's logs.
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, lines_rx) = mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let (mut addr, mut logs, mut master_pid, mut password) = (None, None, None, None);
    let mut admin = None;
    while master_pid.is_none() {
        let line = lines_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("dev mode prints its address, password, log file and master");
        if let Some(url) = line.strip_prefix("server listening on http://") {
            addr = Some(url.parse::<SocketAddr>().unwrap());
        } else if let Some(value) = line.strip_prefix("password: ") {
            password = Some(value.trim().to_owned());
        } else if let Some(url) = line.strip_prefix("admin:    http://") {
            admin = url
                .split_whitespace()
                .next()
                .map(|a| a.parse::<SocketAddr>().unwrap());
        } else if let Some(path) = line.strip_prefix("logs: ") {
            logs = Some(PathBuf::from(path.trim()));
        } else if let Some((_, pid)) = line.split_once("(pid ") {
            master_pid = pid.split(')').next().and_then(|p| p.parse::<i32>().ok());
        }
    }
    let (addr, logs, master_pid) = (addr.unwrap(), logs.unwrap(), master_pid.unwrap());
    let password = password.unwrap();
    assert_eq!(password.len(), 16);
    assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200"));
    let metrics = get(
        admin.expect("dev mode prints its admin address"),
        "/metrics",
    );
    assert!(metrics.contains("http_open_connections"), "{metrics}");
    assert!(get(addr, "/metrics").starts_with("HTTP/1.1 404"));
    let ready = get(addr, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(alive(master_pid));
    read_is_audited(addr, &password, &logs, deadline);

    kill(Pid::from_raw(child.0.id() as i32), Signal::SIGINT).unwrap();
    let status = exit_status(&mut child, deadline);
    assert!(status.success(), "{status}");
    assert!(!alive(master_pid), "the master outlived dev mode");
    let topology_dir = logs.parent().unwrap();
    assert!(
        !topology_dir.exists(),
        "{} was left behind",
        topology_dir.display()
    );
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}

/// A write and a read of user1's reach the shipped logs as `create_key`
/// and `get_key` records.
fn read_is_audited(addr: SocketAddr, password: &str, logs: &std::path::Path, deadline: Instant) {
    let form = "content-type: application/x-www-form-urlencoded\r\n";
    let login = http(
        addr,
        "POST",
        "/token",
        form,
        &format!("username=user1&password={password}"),
    );
    let body = login.split("\r\n\r\n").nth(1).unwrap_or_default();
    let token: serde_json::Value = serde_json::from_str(body).expect(&login);
    let auth = format!(
        "authorization: Bearer {}\r\n",
        token["access_token"].as_str().unwrap()
    );
    let json = format!("{auth}content-type: application/json\r\n");
    let created = http(addr, "POST", "/data?key=audited", &json, r#"{"value": 1}"#);
    assert!(created.starts_with("HTTP/1.1 201"), "{created}");
    let read = http(addr, "GET", "/data/audited", &auth, "");
    assert!(read.starts_with("HTTP/1.1 200"), "{read}");
    let shipped = |action: &str| {
        std::fs::read_to_string(logs)
            .unwrap_or_default()
            .lines()
            .any(|line| line.contains(action) && line.contains("audited"))
    };
    // Two streams (the write's record is in the audit stream, the read's
    // in the log stream), each read at its own pace: either may ship first.
    for action in ["get_key", "create_key"] {
        while !shipped(action) {
            assert!(
                Instant::now() < deadline,
                "the {action} audit record never shipped"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn run(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(BINARY)
        .args(args)
        .env_remove("SERVER_CONFIG")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn invalid_settings_exit_with_status_2_naming_the_setting() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "redis_sentinels"),
        (
            &[
                ("SERVER_REDIS_NODES", "r:6379"),
                ("SERVER_JWT_SECRET", "short"),
            ],
            "jwt_secret",
        ),
        (
            &[
                ("SERVER_REDIS_NODES", "r:6379"),
                ("SERVER_LISTEN", "everywhere"),
            ],
            "listen",
        ),
    ];
    for (env, setting) in cases {
        let output = run(&["serve"], env, "");
        assert_eq!(output.status.code(), Some(2), "{env:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("`{setting}`")),
            "{env:?}: {stderr}"
        );
    }
    let missing_loki = run(&["offload"], &[("SERVER_REDIS_NODES", "r:6379")], "");
    assert_eq!(missing_loki.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing_loki.stderr).contains("loki_url"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_subcommands_manage_users_with_the_password_from_stdin() {
    let topology = Topology::builder()
        .replicas(0)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let master = topology.addr(topology.initial_master()).to_string();
    let env = [("SERVER_REDIS_NODES", master.as_str())];
    let ok = |output: &Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    let added = run(
        &[
            "user",
            "add",
            "alice",
            "--tenant",
            "acme",
            "--email",
            "a@acme.example",
        ],
        &env,
        "s3cret pass\n",
    );
    assert!(ok(&added).contains("created user alice in tenant acme"));
    let empty = run(&["user", "add", "bob", "--tenant", "acme"], &env, "\n");
    assert_eq!(empty.status.code(), Some(2));
    let taken = run(&["user", "add", "alice", "--tenant", "other"], &env, "pw\n");
    assert_eq!(taken.status.code(), Some(1));

    assert!(ok(&run(&["user", "disable", "alice"], &env, "")).contains("disabled alice"));
    let listed = ok(&run(&["user", "list", "--tenant", "acme"], &env, ""));
    assert_eq!(listed.trim(), "alice\tdisabled\tuser\ta@acme.example");
    ok(&run(&["user", "enable", "alice"], &env, ""));
    assert!(ok(&run(&["user", "admin", "alice", "true"], &env, "")).contains("alice is an admin"));

    // The password from stdin is the one that logs in.
    let client = redis_failover::FailoverClient::candidates([topology
        .addr(topology.initial_master())
        .into()])
    .build()
    .unwrap();
    let store = tenant_kv::TenantKv::builder(client).build().unwrap();
    let user = store
        .users()
        .authenticate("alice", "s3cret pass")
        .await
        .unwrap();
    assert_eq!(user.tenant.as_str(), "acme");
    assert!(user.admin);
    let usage = ok(&run(&["tenant", "usage", "acme"], &env, ""));
    assert_eq!(usage, "keys\t0\nbytes\t0\n");

    // Quotas: overridden for one tenant, checked before any is stored.
    let set = ok(&run(
        &[
            "tenant",
            "limits",
            "set",
            "acme",
            "max_keys=10",
            "requests_per_second=unlimited",
        ],
        &env,
        "",
    ));
    assert_eq!(set, "max_keys = 10\nrequests_per_second = unlimited\n");
    let refused = run(
        &[
            "tenant",
            "limits",
            "set",
            "acme",
            "max_api_keys=3",
            "request_burst=0",
        ],
        &env,
        "",
    );
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let got = ok(&run(&["tenant", "limits", "get", "acme"], &env, ""));
    assert!(got.contains("max_keys\t10\toverride\n"), "{got}");
    assert!(got.contains("max_api_keys\t100\tdefault\n"), "{got}");
    ok(&run(
        &["tenant", "limits", "set", "acme", "max_keys=default"],
        &env,
        "",
    ));
    let got = ok(&run(&["tenant", "limits", "get", "acme"], &env, ""));
    assert!(got.contains("max_keys\tunlimited\tdefault\n"), "{got}");
    assert!(store.quota_overrides(&user.tenant).await.unwrap().len() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_acknowledges_a_write_once_both_replicas_have_it() {
    let topology = Topology::builder()
        .replicas(2)
        .sentinels(3)
        .start()
        .await
        .unwrap();
    let sentinels: Vec<String> = topology
        .sentinel_addrs()
        .iter()
        .map(SocketAddr::to_string)
        .collect();
    let sentinels = sentinels.join(",");
    let env = [
        ("SERVER_REDIS_SENTINELS", sentinels.as_str()),
        ("SERVER_REDIS_MASTER_NAME", topology.master_name()),
        ("SERVER_REDIS_WAIT_REPLICAS", "2"),
        ("SERVER_REDIS_WAIT_REPLICAS_MIN", "1"),
        ("SERVER_REDIS_DEMOTE_STALE_MASTER", "true"),
        ("SERVER_JWT_SECRET", "a secret of at least thirty-two bytes"),
        ("SERVER_LISTEN", "127.0.0.1:0"),
        ("SERVER_ADMIN_LISTEN", "127.0.0.1:0"),
    ];
    let added = run(&["user", "add", "alice", "--tenant", "acme"], &env, "pw\n");
    assert!(added.status.success(), "{added:?}");

    let mut child = KillOnDrop(
        Command::new(BINARY)
            .arg("serve")
            .env_remove("SERVER_CONFIG")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (addr_tx, addr_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some((_, addr)) = line.split_once("local_addr=") {
                let addr = addr.split_whitespace().next().unwrap_or_default();
                let _ = addr_tx.send(addr.parse::<SocketAddr>().unwrap());
            }
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let addr = addr_rx
        .recv_timeout(DEADLINE)
        .expect("serve logs the address it listens on");

    let form = "application/x-www-form-urlencoded";
    let issued = http(
        addr,
        "POST",
        "/token",
        &format!("content-type: {form}\r\n"),
        "username=alice&password=pw",
    );
    let (_, body) = issued.split_once("\r\n\r\n").unwrap();
    let token: serde_json::Value = serde_json::from_str(body).expect(&issued);
    let token = token["access_token"].as_str().expect(&issued).to_owned();
    let put = http(
        addr,
        "PUT",
        "/data/greeting",
        &format!(
            "authorization: Bearer {token}\r\nif-none-match: *\r\n\
             content-type: application/json\r\n"
        ),
        r#"{"value":"hello"}"#,
    );
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    // Acknowledged after WAIT 2: both replicas have it already.
    let master = topology.initial_master();
    let stats: String = topology
        .query(master, redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap();
    assert!(stats.contains("cmdstat_wait:"), "{stats}");
    for replica in topology.data_nodes().into_iter().filter(|n| *n != master) {
        let exists: u32 = topology
            .query(
                replica,
                redis::cmd("EXISTS").arg("tenant:{acme}:data:greeting"),
            )
            .await
            .unwrap();
        assert_eq!(exists, 1, "{replica} lacks the acknowledged write");
    }
    // Readiness says where durable writes stand.
    let ready = get(addr, "/readyz");
    let (_, body) = ready.split_once("\r\n\r\n").unwrap();
    let ready: serde_json::Value = serde_json::from_str(body).expect(body);
    assert_eq!(ready["writes"]["state"], "ok", "{ready}");
    assert_eq!(ready["writes"]["replicas_asked"], 2, "{ready}");
    assert_eq!(ready["writes"]["replicas_waited_for"], 2, "{ready}");

    kill(Pid::from_raw(child.0.id() as i32), Signal::SIGTERM).unwrap();
    let status = exit_status(&mut child, deadline);
    assert!(status.success(), "{status}");
}
