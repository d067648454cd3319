//! One `redis-server` process: its identity, files and lifecycle.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Whether a node stores data (master or replica) or is a Sentinel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKind {
    /// A Redis server holding data: the master or one of its replicas.
    Data,
    /// A Redis Sentinel (`redis-server --sentinel`).
    Sentinel,
}

/// Names one node of a [`Topology`](crate::Topology).
///
/// Data nodes are numbered from 0 in start order (`redis-0` is the initial
/// master), sentinels likewise (`sentinel-0`, ...). The name stays with the
/// node for the topology's lifetime, whatever role it plays after failovers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    kind: NodeKind,
    index: usize,
}

impl NodeId {
    pub(crate) fn data(index: usize) -> Self {
        Self {
            kind: NodeKind::Data,
            index,
        }
    }

    pub(crate) fn sentinel(index: usize) -> Self {
        Self {
            kind: NodeKind::Sentinel,
            index,
        }
    }

    /// Whether this is a data node or a sentinel.
    pub fn kind(self) -> NodeKind {
        self.kind
    }

    /// The node's number among the nodes of its kind, from 0.
    pub fn index(self) -> usize {
        self.index
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            NodeKind::Data => write!(f, "redis-{}", self.index),
            NodeKind::Sentinel => write!(f, "sentinel-{}", self.index),
        }
    }
}

/// What the log says when `redis-server` lost the race for its port.
const PORT_TAKEN: &str = "Address already in use";

/// How a process that is not running ended, as far as start-up cares.
pub(crate) enum Exit {
    /// Another process bound the port first: try another port.
    PortTaken,
    /// Anything else: a real failure.
    Failed(Error),
}

/// A node's files and, while it runs, its process.
#[derive(Debug)]
pub(crate) struct NodeProcess {
    pub(crate) id: NodeId,
    addr: SocketAddr,
    /// What the command line starts with before the binary: empty, or
    /// `ip netns exec <namespace>` (which execs, so the pid stays the node's).
    launcher: Vec<OsString>,
    binary: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    /// Where the current run's output starts in `log`.
    log_start: u64,
    child: Option<Child>,
    paused: bool,
}

impl NodeProcess {
    /// Writes `config` (which must make it listen on `addr`) into a
    /// directory of the node's own under `root` and starts `redis-server` on
    /// it, behind `launcher` if that is not empty.
    pub(crate) fn spawn(
        id: NodeId,
        root: &Path,
        binary: &Path,
        (addr, launcher): (SocketAddr, Vec<OsString>),
        config: &str,
    ) -> Result<Self> {
        let dir = root.join(id.to_string());
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let conf = dir.join(match id.kind {
            NodeKind::Data => "redis.conf",
            NodeKind::Sentinel => "sentinel.conf",
        });
        let config = format!("dir {}\n{config}", dir.display());
        fs::write(&conf, config).map_err(|source| Error::Io {
            path: conf.clone(),
            source,
        })?;
        let mut node = Self {
            id,
            addr,
            launcher,
            binary: binary.to_path_buf(),
            conf,
            log: dir.join("redis.log"),
            log_start: 0,
            child: None,
            paused: false,
        };
        node.start()?;
        Ok(node)
    }

    /// Starts the process again from its (possibly rewritten) config file.
    pub(crate) fn start(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| Error::Io {
                path: self.log.clone(),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| Error::Io {
            path: self.log.clone(),
            source,
        })?;
        self.log_start = log.metadata().map_or(0, |m| m.len());
        let binary_args: &[&str] = match self.id.kind {
            NodeKind::Data => &[],
            NodeKind::Sentinel => &["--sentinel"],
        };
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        let child = command
            .arg(&self.conf)
            .args(binary_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| Error::Spawn {
                node: self.id,
                source,
            })?;
        let record = self.conf.with_file_name(crate::orphans::NODE_FILE);
        let pid_and_port = format!("{} {}", child.id(), self.addr.port());
        self.child = Some(child);
        self.paused = false;
        // Lets a later topology reap this node if our process dies unannounced.
        fs::write(&record, pid_and_port).map_err(|source| Error::Io {
            path: record,
            source,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether the process is alive (paused counts as alive). Reaps it if it
    /// has exited, so a crashed node reads as stopped.
    pub(crate) fn is_running(&mut self) -> bool {
        self.exit_status().is_none() && self.child.is_some()
    }

    /// Reaps the process if it has exited and says how it ended.
    pub(crate) fn check_exit(&mut self) -> Option<Exit> {
        let status = self.exit_status()?;
        // Only this run's output counts: an earlier run may have lost a race too.
        let this_run = fs::read(&self.log)
            .map(|bytes| {
                bytes
                    .get(self.log_start as usize..)
                    .unwrap_or_default()
                    .to_vec()
            })
            .unwrap_or_default();
        let log_tail = self.log_tail(20);
        Some(if String::from_utf8_lossy(&this_run).contains(PORT_TAKEN) {
            Exit::PortTaken
        } else {
            Exit::Failed(Error::Exited {
                node: self.id,
                status,
                log_tail,
            })
        })
    }

    fn exit_status(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status.to_string())
            }
            Ok(None) => None,
            Err(error) => {
                self.child = None;
                Some(format!("unknown: {error}"))
            }
        }
    }

    /// SIGKILLs the process and reaps it. Killing a stopped node is a no-op.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a SIGSTOPped process too; errors mean it is already gone.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Sends SIGSTOP (`pause = true`) or SIGCONT to the process.
    pub(crate) fn set_paused(&mut self, pause: bool) -> Result<()> {
        let pid = self.pid().ok_or(Error::NotRunning { node: self.id })?;
        let (sig, name) = if pause {
            (Signal::SIGSTOP, "SIGSTOP")
        } else {
            (Signal::SIGCONT, "SIGCONT")
        };
        let pid = Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"));
        signal::kill(pid, sig).map_err(|source| Error::Signal {
            node: self.id,
            signal: name,
            source,
        })?;
        self.paused = pause;
        Ok(())
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the node's log (stdout and stderr).
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        read_tail(&self.log, lines)
            .unwrap_or_else(|error| format!("(log {} unreadable: {error})", self.log.display()))
    }
}

impl Drop for NodeProcess {
    /// A node is never left running by whoever drops it, on any error path.
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the last `lines` lines of a file, looking at no more than its last 64 KiB.
fn read_tail(path: &Path, lines: usize) -> std::io::Result<String> {
    const WINDOW: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_pod_naming() {
        assert_eq!(NodeId::data(0).to_string(), "redis-0");
        assert_eq!(NodeId::sentinel(2).to_string(), "sentinel-2");
    }

    #[test]
    fn tail_returns_only_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text: String = (1..=100).map(|n| format!("line {n}\n")).collect();
        fs::write(&path, text).unwrap();
        assert_eq!(read_tail(&path, 2).unwrap(), "line 99\nline 100");
        assert_eq!(read_tail(&path, 500).unwrap().lines().count(), 100);
    }
}
