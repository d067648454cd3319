use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::NodeId;

/// Why starting, querying or changing a topology failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Redis server binary could not be found.
    #[error(
        "`{binary}` was not found on PATH; install Redis >= 6.2 \
         (Debian/Ubuntu: `apt-get install redis-server redis-sentinel`, macOS: `brew install redis`)",
        binary = .binary.display()
    )]
    RedisServerNotFound {
        /// The binary that was looked for.
        binary: PathBuf,
    },

    /// The Redis server binary is older than this crate supports.
    #[error("`{binary}` is Redis {found}, but Redis >= 6.2 is required", binary = .binary.display())]
    UnsupportedVersion {
        /// The binary that was asked for its version.
        binary: PathBuf,
        /// The version it reported, or what it printed if no version was found.
        found: String,
    },

    /// The builder was given settings that cannot make a working topology.
    #[error("invalid topology setting `{setting}`: {reason}")]
    InvalidConfig {
        /// The builder setting at fault.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A file or directory of the topology could not be written or read.
    #[error("could not access {path}", path = .path.display())]
    Io {
        /// The path being accessed.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// A node's process could not be started.
    #[error("could not start {node}")]
    Spawn {
        /// The node being started.
        node: NodeId,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// A node's process exited while it was expected to run.
    #[error("{node} exited unexpectedly ({status}); last lines of its log:\n{log_tail}")]
    Exited {
        /// The node that exited.
        node: NodeId,
        /// Its exit status, as the OS reported it.
        status: String,
        /// The end of the node's log.
        log_tail: String,
    },

    /// No free loopback port was found for a new node.
    #[error("no free loopback port found for {node}")]
    NoFreePort {
        /// The node that needed a port.
        node: NodeId,
    },

    /// Another process took the node's port first (on every try, for a new
    /// node; while it was down, for a restarted one).
    #[error("{node} could not listen on port {port}: another process holds it")]
    PortTaken {
        /// The node that could not start.
        node: NodeId,
        /// The port it wanted.
        port: u16,
    },

    /// The certificates of a TLS topology could not be made.
    #[error("could not create TLS certificates: {reason}")]
    Tls {
        /// What went wrong.
        reason: String,
    },

    /// A wait did not reach its goal before its deadline.
    #[error(
        "timed out after {waited:?} waiting for {what} ({reason}); last lines of {node}'s log {log}:\n{log_tail}",
        log = .log.display()
    )]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it waited.
        waited: Duration,
        /// The node that kept the goal from being reached on the last attempt.
        node: NodeId,
        /// Why the last attempt did not reach the goal.
        reason: String,
        /// That node's log file.
        log: PathBuf,
        /// The end of that node's log.
        log_tail: String,
    },

    /// The operation needs a running node, but the node was killed or never started.
    #[error("{node} is not running")]
    NotRunning {
        /// The node in question.
        node: NodeId,
    },

    /// The operation needs a stopped node, but the node is running.
    #[error("{node} is already running")]
    AlreadyRunning {
        /// The node in question.
        node: NodeId,
    },

    /// The operation needs a running sentinel, and none is.
    #[error("no sentinel is running")]
    NoRunningSentinel,

    /// The operation needs a node of the other kind (a sentinel where a data node was given, or the reverse).
    #[error("{node} cannot do this: {reason}")]
    WrongKind {
        /// The node in question.
        node: NodeId,
        /// What the operation needed.
        reason: &'static str,
    },

    /// A signal could not be delivered to a node's process.
    #[error("could not send {signal} to {node}")]
    Signal {
        /// The node the signal was meant for.
        node: NodeId,
        /// The signal's name.
        signal: &'static str,
        /// The OS error.
        #[source]
        source: nix::Error,
    },

    /// Network namespaces cannot be made on this machine: no privileges
    /// (root, or `CAP_SYS_ADMIN` and `CAP_NET_ADMIN`), no `ip` command, or no
    /// free subnet. Tests that need them skip on this error rather than fail.
    #[error("network namespaces are unavailable: {reason}")]
    NetworkUnavailable {
        /// What failed.
        reason: String,
    },

    /// A network fault was asked of a topology started without
    /// [`TopologyBuilder::network_namespaces`](crate::TopologyBuilder::network_namespaces).
    #[error(
        "this topology runs without network namespaces; start it with `network_namespaces(true)`"
    )]
    NoNetworkNamespaces,

    /// An `ip` command that sets up or changes a topology's network failed.
    #[error("`{command}` failed: {output}")]
    Network {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        output: String,
    },

    /// A `redis-cli --cluster` command (creating a cluster) failed.
    #[error("`{command}` failed ({status}); the end of its output:\n{output}")]
    ClusterCommand {
        /// The command line.
        command: String,
        /// Its exit status, or why it has none.
        status: String,
        /// The last lines it printed (stdout, then stderr).
        output: String,
    },

    /// A cluster operation cannot be done with the cluster as a node sees it
    /// (an unassigned slot, a replica where a master is needed, ...).
    #[error("the cluster as {node} sees it: {reason}")]
    ClusterState {
        /// The node whose view was read.
        node: NodeId,
        /// What is wrong.
        reason: String,
    },

    /// A command sent to a node failed.
    #[error("command on {node} failed")]
    Redis {
        /// The node the command was sent to.
        node: NodeId,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
