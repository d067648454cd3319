//! The `redis-topology` binary: runs until SIGINT, then leaves nothing
//! behind; and when it is SIGKILLed instead, the next topology reaps its nodes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis_topology::Topology;

const BINARY: &str = env!("CARGO_BIN_EXE_redis-topology");
const DEADLINE: Duration = Duration::from_secs(60);

fn pid(raw: u32) -> Pid {
    Pid::from_raw(i32::try_from(raw).unwrap())
}

/// Alive and not a zombie waiting to be reaped by init.
fn process_alive(raw: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{raw}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    kill(pid(raw), None).is_ok() && state != Some('Z')
}

fn wait_until(deadline: Instant, what: &str, mut done: impl FnMut() -> bool) {
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running binary and what it printed before "Ready.".
struct Running {
    child: KillOnDrop,
    pids: Vec<u32>,
    dir: PathBuf,
}

/// SIGKILLs the binary if a test fails while it runs; the next topology
/// then reaps its nodes.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str]) -> Running {
    let mut child = KillOnDrop(
        Command::new(BINARY)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Read stdout on a thread so that waiting for "Ready" has a deadline.
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
    let (mut pids, mut dir) = (Vec::new(), None);
    loop {
        let line = lines_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the binary prints Ready within the deadline");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [node, _addr, pid, _role]
                if node.starts_with("redis-") || node.starts_with("sentinel-") =>
            {
                pids.push(pid.parse::<u32>().unwrap())
            }
            ["Configs", "and", "logs:", path] => dir = Some(PathBuf::from(path)),
            ["Ready.", ..] => break,
            _ => {}
        }
    }
    let dir = dir.expect("the binary names its directory");
    assert!(pids.iter().all(|&p| process_alive(p)));
    assert!(dir.is_dir());
    Running { child, pids, dir }
}

#[test]
fn runs_a_topology_until_interrupted_then_cleans_up() {
    let Running {
        mut child,
        pids,
        dir,
    } = start(&["--replicas", "1", "--sentinels", "1"]);
    assert_eq!(pids.len(), 3, "master, replica and sentinel");

    kill(pid(child.0.id()), Signal::SIGINT).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut status = None;
    wait_until(deadline, "the binary to exit after SIGINT", || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}");
    for p in pids {
        assert!(!process_alive(p), "redis-server {p} outlived the binary");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
#[cfg(target_os = "linux")]
fn nodes_of_a_sigkilled_owner_are_reaped_by_the_next_topology() {
    let running = start(&["--replicas", "1", "--sentinels", "0"]);
    assert_eq!(running.pids.len(), 2);
    assert_reaped_after_sigkill(running);
}

#[test]
#[cfg(target_os = "linux")]
fn nodes_of_a_sigkilled_cluster_owner_are_reaped_by_the_next_topology() {
    let running = start(&["--cluster", "--shards", "3", "--replicas", "1"]);
    assert_eq!(running.pids.len(), 6, "3 masters and 3 replicas");
    assert_reaped_after_sigkill(running);
}

/// SIGKILLs the binary, then checks the next topology started kills the
/// nodes it left and removes their directory.
#[cfg(target_os = "linux")]
fn assert_reaped_after_sigkill(running: Running) {
    let Running {
        mut child,
        pids,
        dir,
    } = running;
    kill(pid(child.0.id()), Signal::SIGKILL).unwrap();
    child.0.wait().unwrap();
    assert!(
        pids.iter().all(|&p| process_alive(p)),
        "SIGKILL runs no destructor: the nodes live on"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _next = runtime
        .block_on(Topology::builder().replicas(0).sentinels(0).start())
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    wait_until(deadline, "the orphaned nodes to die", || {
        pids.iter().all(|&p| !process_alive(p))
    });
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn bad_arguments_exit_with_usage_and_status_2() {
    let output = Command::new(BINARY)
        .args(["--replicas", "two"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("--replicas takes a whole number"),
        "{stderr}"
    );
    assert!(stderr.contains("Usage: redis-topology"), "{stderr}");

    for (args, message) in [
        (
            &["--cluster", "--sentinels", "1"][..],
            "--sentinels cannot be combined with --cluster",
        ),
        (&["--shards", "4"][..], "--shards needs --cluster"),
    ] {
        let output = Command::new(BINARY).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(message), "{stderr}");
    }
}
