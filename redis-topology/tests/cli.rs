//! The `redis-topology` binary: runs until SIGINT, then leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BINARY: &str = env!("CARGO_BIN_EXE_redis-topology");

fn pid(raw: u32) -> Pid {
    Pid::from_raw(i32::try_from(raw).unwrap())
}

fn process_exists(raw: u32) -> bool {
    kill(pid(raw), None).is_ok()
}

#[test]
fn runs_a_topology_until_interrupted_then_cleans_up() {
    let mut child = Command::new(BINARY)
        .args(["--replicas", "1", "--sentinels", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Read stdout on a thread so that waiting for "Ready" has a deadline.
    let (lines_tx, lines_rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut pids, mut dir) = (Vec::new(), None);
    loop {
        let line = lines_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the binary prints Ready within 60 s");
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
    assert_eq!(pids.len(), 3, "master, replica and sentinel");
    assert!(pids.iter().all(|&p| process_exists(p)));
    assert!(dir.is_dir());

    kill(pid(child.id()), Signal::SIGINT).unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the binary did not exit after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    for p in pids {
        assert!(!process_exists(p), "redis-server {p} outlived the binary");
    }
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
}
