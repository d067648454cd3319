//! Reaping the nodes of topologies whose owner died without dropping them.
//!
//! Dropping a [`Topology`](crate::Topology) kills its nodes, but a process
//! killed by SIGKILL (a test runner's timeout, the OOM killer) runs no
//! destructor, and its `redis-server`s live on. So each topology directory
//! records its owner's pid and each node's pid and port; starting a topology
//! first sweeps the temporary directory for topologies whose owner is gone
//! and SIGKILLs their nodes.
//!
//! A recorded pid is killed only if that process still exists and its
//! command line names the recorded port: `redis-server` shows its listening
//! address there, and only one process can listen on a port, so a recycled
//! pid is never mistaken for an orphan. The sweep is best effort and only
//! runs where `/proc` exists.

use std::fs;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// The owner's pid, in the topology directory.
pub(crate) const OWNER_FILE: &str = "owner.pid";
/// `<pid> <port>` of a node, in the node's directory.
pub(crate) const NODE_FILE: &str = "node.pid";
/// Present when the directory is to be kept after the topology ends.
pub(crate) const KEEP_FILE: &str = "keep";
/// The prefix of every topology directory's name.
pub(crate) const DIR_PREFIX: &str = "redis-topology-";

/// Kills the nodes of every topology under `temp_dir` whose owner process
/// is gone, and removes their directories unless they are to be kept.
pub(crate) fn sweep(temp_dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(temp_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_topology = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(DIR_PREFIX));
        if !is_topology {
            continue;
        }
        // A directory whose owner file is not written yet belongs to a
        // topology being started: leave it alone.
        match read_pid(&dir.join(OWNER_FILE)) {
            Some(owner) if !process_exists(owner) => {}
            _ => continue,
        }
        for node in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Some((pid, port)) = read_node(&node.path().join(NODE_FILE)) {
                kill_if_listening_on(pid, port);
            }
        }
        if dir.join(KEEP_FILE).exists() {
            let _ = fs::remove_file(dir.join(OWNER_FILE));
        } else {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_node(path: &Path) -> Option<(i32, u16)> {
    let text = fs::read_to_string(path).ok()?;
    let (pid, port) = text.trim().split_once(' ')?;
    Some((pid.parse().ok()?, port.parse().ok()?))
}

/// Whether a process exists (EPERM: it does, owned by someone else).
fn process_exists(pid: i32) -> bool {
    !matches!(signal::kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn kill_if_listening_on(pid: i32, port: u16) {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    let port = port.to_string();
    let listens_on_port = cmdline
        .split(|c: char| c == '\0' || c.is_whitespace())
        .any(|word| word.rsplit_once(':').is_some_and(|(_, p)| p == port));
    if cmdline.contains("redis-server") && listens_on_port {
        let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_of_live_owners_and_other_directories_are_left_alone() {
        let temp = tempfile::tempdir().unwrap();
        let live = temp.path().join(format!("{DIR_PREFIX}live"));
        let other = temp.path().join("unrelated");
        for dir in [&live, &other] {
            fs::create_dir(dir).unwrap();
            fs::write(dir.join(OWNER_FILE), std::process::id().to_string()).unwrap();
        }
        // An owner pid that cannot exist (above the kernel's pid_max).
        fs::write(other.join(OWNER_FILE), "2000000000").unwrap();
        sweep(temp.path());
        assert!(live.exists());
        assert!(other.exists());
    }

    #[test]
    fn a_dead_owners_directory_is_removed_unless_kept() {
        let temp = tempfile::tempdir().unwrap();
        let dead = temp.path().join(format!("{DIR_PREFIX}dead"));
        let kept = temp.path().join(format!("{DIR_PREFIX}kept"));
        for dir in [&dead, &kept] {
            fs::create_dir_all(dir.join("redis-0")).unwrap();
            fs::write(dir.join(OWNER_FILE), "2000000000").unwrap();
            // This test process is alive but listens on no such port: spared.
            let node = format!("{} 1", std::process::id());
            fs::write(dir.join("redis-0").join(NODE_FILE), node).unwrap();
        }
        fs::write(kept.join(KEEP_FILE), "").unwrap();
        sweep(temp.path());
        assert!(!dead.exists());
        assert!(kept.join("redis-0").join(NODE_FILE).exists());
        assert!(
            !kept.join(OWNER_FILE).exists(),
            "a swept kept directory is not swept again"
        );
    }
}
