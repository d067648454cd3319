//! Reaping the nodes of topologies whose owner died without dropping them.
//!
//! Dropping a [`Topology`](crate::Topology) kills its nodes, but a process
//! killed by SIGKILL (a test runner's timeout, the OOM killer) runs no
//! destructor, and its `redis-server`s live on. So the owner of each
//! topology directory holds an exclusive lock on a file in it for its whole
//! life (the kernel releases it however the owner dies), and each node's
//! directory records its pid and port. Starting a topology first sweeps the
//! temporary directory: a topology directory whose lock can be taken is
//! abandoned, and its nodes are SIGKILLed.
//!
//! A recorded pid is killed only while its process is a `redis-server`
//! whose command line shows the recorded port (`redis-server` puts its
//! listening address there), so a pid recycled by another program is left
//! alone. A directory is removed only once all its nodes are gone; until
//! then the next sweep tries again. The sweep needs `/proc`, so it runs on
//! Linux only.
//!
//! Network namespaces and the machine-side veth of a namespaced topology
//! carry their owner's pid in their names (see `network`); a topology that
//! uses namespaces first removes those whose owner is dead, killing what
//! still runs inside.

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// Locked by the owner for its whole life, in the topology directory.
const OWNER_LOCK: &str = "owner.lock";
/// `<pid> <port>` of a node, in the node's directory.
pub(crate) const NODE_FILE: &str = "node.pid";
/// Present when the directory is to be kept after the topology ends.
pub(crate) const KEEP_FILE: &str = "keep";
/// The prefix of every topology directory's name.
pub(crate) const DIR_PREFIX: &str = "redis-topology-";
/// How long a sweep waits for a killed node to disappear.
const DEATH_WAIT: Duration = Duration::from_secs(1);

/// Takes the owner lock of a new topology directory; the lock lasts as long
/// as the returned file is open.
pub(crate) fn hold_owner_lock(dir: &Path) -> io::Result<File> {
    // Locked before it gets its name: a sweep never sees it unlocked.
    let staging = dir.join(".owner.lock.new");
    let file = File::create(&staging)?;
    file.lock()?;
    fs::rename(&staging, dir.join(OWNER_LOCK))?;
    Ok(file)
}

/// Kills the nodes of every abandoned topology under `temp_dir` and removes
/// their directories once the nodes are gone (unless they are to be kept).
pub(crate) fn sweep(temp_dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(temp_dir) else {
        return;
    };
    for entry in entries.flatten() {
        // `file_type` does not follow links: a link is never swept.
        let is_topology_dir = entry.file_type().is_ok_and(|t| t.is_dir())
            && entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(DIR_PREFIX));
        if !is_topology_dir {
            continue;
        }
        let dir = entry.path();
        let Ok(lock) = File::open(dir.join(OWNER_LOCK)) else {
            continue;
        };
        // Held by a live owner, or by another sweep of the same directory.
        if lock.try_lock().is_err() {
            continue;
        }
        let nodes: Vec<(i32, u16)> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|node| read_node(&node.path().join(NODE_FILE)))
            .collect();
        for &(pid, port) in &nodes {
            if is_node(pid, port) {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + DEATH_WAIT;
        while nodes.iter().any(|&(pid, port)| is_node(pid, port)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if nodes.iter().any(|&(pid, port)| is_node(pid, port)) {
            continue;
        }
        if dir.join(KEEP_FILE).exists() {
            // Keep the logs, but do not look at this directory again.
            let _ = fs::remove_file(dir.join(OWNER_LOCK));
        } else {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Removes the network namespaces and machine-side veths whose owner
/// process is dead, killing any process left inside those namespaces.
pub(crate) fn sweep_namespaces(ip: &Path) {
    let list = |args: &[&str]| {
        Command::new(ip)
            .args(args)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
    };
    let orphaned = |owner: Option<i32>| owner.is_some_and(|pid| !is_alive(pid));
    for line in list(&["netns", "list"]).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if orphaned(netns_owner(name)) {
            for pid in list(&["netns", "pids", name]).split_whitespace() {
                if let Ok(pid) = pid.parse() {
                    let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            let _ = Command::new(ip).args(["netns", "del", name]).output();
        }
    }
    // `12: rt1234-0@if11: <BROADCAST,...`
    for line in list(&["-o", "link", "show"]).lines() {
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else {
            continue;
        };
        if orphaned(link_owner(name)) {
            let _ = Command::new(ip).args(["link", "del", name]).output();
        }
    }
}

/// The owner's pid in `rt-<pid>-<n>-<rest>`.
fn netns_owner(name: &str) -> Option<i32> {
    let mut parts = name
        .strip_prefix(crate::network::NETNS_STEM)?
        .splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    parts.next().map(|_| pid)
}

/// The owner's pid in `rt<pid>-<n>`.
fn link_owner(name: &str) -> Option<i32> {
    let (pid, n) = name
        .strip_prefix(crate::network::LINK_STEM)?
        .split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Whether `pid` runs and is no zombie.
fn is_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !is_zombie(&stat))
}

fn is_zombie(stat: &str) -> bool {
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'))
}

fn read_node(path: &Path) -> Option<(i32, u16)> {
    let text = fs::read_to_string(path).ok()?;
    let (pid, port) = text.trim().split_once(' ')?;
    Some((pid.parse().ok()?, port.parse().ok()?))
}

/// Whether `pid` is a live (not zombie) `redis-server` or `valkey-server`
/// showing `port`.
fn is_node(pid: i32, port: u16) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = is_zombie(&stat);
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    let port = port.to_string();
    let shows_port = cmdline
        .split(|c: char| c == '\0' || c.is_whitespace())
        .any(|word| word.rsplit_once(':').is_some_and(|(_, p)| p == port));
    let server = cmdline.contains("redis-server") || cmdline.contains("valkey-server");
    !zombie && server && shows_port
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn topology_dir(root: &Path, name: &str) -> std::path::PathBuf {
        let dir = root.join(format!("{DIR_PREFIX}{name}"));
        fs::create_dir_all(dir.join("redis-0")).unwrap();
        // A record naming this test process, which is no redis-server.
        let record = format!("{} 1", std::process::id());
        fs::write(dir.join("redis-0").join(NODE_FILE), record).unwrap();
        dir
    }

    #[test]
    fn a_live_owners_directory_is_left_alone() {
        let temp = tempfile::tempdir().unwrap();
        let live = topology_dir(temp.path(), "live");
        let _owner = hold_owner_lock(&live).unwrap();
        sweep(temp.path());
        assert!(live.join(OWNER_LOCK).exists());
    }

    #[test]
    fn a_dead_owners_directory_is_removed_unless_kept_and_other_processes_are_spared() {
        let temp = tempfile::tempdir().unwrap();
        let dead = topology_dir(temp.path(), "dead");
        let kept = topology_dir(temp.path(), "kept");
        let unrelated = temp.path().join("unrelated");
        fs::create_dir(&unrelated).unwrap();
        for dir in [&dead, &kept, &unrelated] {
            // The lock files exist, but nobody holds them any more.
            drop(hold_owner_lock(dir).unwrap());
        }
        fs::write(kept.join(KEEP_FILE), "").unwrap();
        sweep(temp.path());
        assert!(!dead.exists());
        assert!(kept.join("redis-0").join(NODE_FILE).exists());
        assert!(!kept.join(OWNER_LOCK).exists(), "not swept again");
        assert!(
            unrelated.join(OWNER_LOCK).exists(),
            "not a topology directory"
        );
        assert!(!is_node(i32::try_from(std::process::id()).unwrap(), 1));
    }

    #[test]
    fn owners_are_read_from_namespace_and_link_names() {
        assert_eq!(netns_owner("rt-1234-7-redis-0"), Some(1234));
        assert_eq!(netns_owner("rt-1234-7-hub"), Some(1234));
        assert_eq!(netns_owner("rt-1234-hub"), None);
        assert_eq!(netns_owner("rt1234-7"), None);
        assert_eq!(link_owner("rt1234-7"), Some(1234));
        assert_eq!(link_owner("rt-1234-7-hub"), None);
        assert_eq!(link_owner("rtx-7"), None);
        assert!(is_alive(i32::try_from(std::process::id()).unwrap()));
    }
}
