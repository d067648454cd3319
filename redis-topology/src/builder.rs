//! The topology builder: settings, their validation, and the config files they produce.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::tls::TlsFiles;
use crate::topology::Topology;
use crate::{network, server};

/// Set to a non-empty value to keep every topology's directory by default.
const KEEP_DIR_ENV: &str = "REDIS_TOPOLOGY_KEEP_DIR";

/// Settings for a local topology; [`start`](Self::start) launches it.
///
/// ```no_run
/// # async fn run() -> redis_topology::Result<()> {
/// use std::time::Duration;
///
/// let topology = redis_topology::Topology::builder()
///     .replicas(2)
///     .sentinels(3)
///     .down_after(Duration::from_millis(1000))
///     .start()
///     .await?;
/// println!("master at {}", topology.addr(topology.initial_master()));
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct TopologyBuilder {
    pub(crate) replicas: usize,
    pub(crate) sentinels: usize,
    quorum: Option<usize>,
    pub(crate) master_name: String,
    down_after: Duration,
    failover_timeout: Duration,
    user: Option<String>,
    password: Option<String>,
    pub(crate) sentinel_password: Option<String>,
    extra_config: Vec<String>,
    pub(crate) redis_server: PathBuf,
    pub(crate) redis_cli: PathBuf,
    pub(crate) start_timeout: Duration,
    pub(crate) keep_dir: bool,
    pub(crate) tls: bool,
    pub(crate) network_namespaces: bool,
}

impl std::fmt::Debug for TopologyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("TopologyBuilder")
            .field("replicas", &self.replicas)
            .field("sentinels", &self.sentinels)
            .field("quorum", &self.quorum)
            .field("master_name", &self.master_name)
            .field("down_after", &self.down_after)
            .field("failover_timeout", &self.failover_timeout)
            .field("user", &self.user)
            .field("password", &redacted(&self.password))
            .field("sentinel_password", &redacted(&self.sentinel_password))
            .field("extra_config", &self.extra_config)
            .field("redis_server", &self.redis_server)
            .field("redis_cli", &self.redis_cli)
            .field("start_timeout", &self.start_timeout)
            .field("keep_dir", &self.keep_dir)
            .field("tls", &self.tls)
            .field("network_namespaces", &self.network_namespaces)
            .finish()
    }
}

impl Default for TopologyBuilder {
    fn default() -> Self {
        Self {
            replicas: 2,
            sentinels: 3,
            quorum: None,
            master_name: "mymaster".to_owned(),
            down_after: Duration::from_millis(1500),
            failover_timeout: Duration::from_millis(5000),
            user: None,
            password: None,
            sentinel_password: None,
            extra_config: Vec::new(),
            redis_server: server::default_server_bin(),
            redis_cli: server::default_cli_bin(),
            start_timeout: Duration::from_secs(30),
            keep_dir: std::env::var_os(KEEP_DIR_ENV).is_some_and(|v| !v.is_empty()),
            tls: false,
            network_namespaces: false,
        }
    }
}

impl TopologyBuilder {
    /// How many replicas follow the master. Defaults to 2.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// How many sentinels watch the master. Defaults to 3.
    ///
    /// 0 starts no Sentinel at all: the "ordered pods" deployment, where
    /// clients find the master themselves and promotion is done by hand
    /// ([`Topology::promote`]).
    pub fn sentinels(mut self, sentinels: usize) -> Self {
        self.sentinels = sentinels;
        self
    }

    /// How many sentinels must agree that the master is down before a
    /// failover starts. Defaults to a majority of the sentinels.
    pub fn quorum(mut self, quorum: usize) -> Self {
        self.quorum = Some(quorum);
        self
    }

    /// The name the sentinels know the master by. Defaults to `mymaster`.
    pub fn master_name(mut self, name: impl Into<String>) -> Self {
        self.master_name = name.into();
        self
    }

    /// Sentinel's `down-after-milliseconds`: how long the master must be
    /// unreachable before it is considered down. Defaults to 1500 ms
    /// (Sentinel's own default is 30 s), which puts a failover about 3 s
    /// after the master dies.
    ///
    /// Values of 1000 ms and below race with Sentinel itself: it pings and
    /// reconnects at most once a second, and right after `+switch-master`
    /// it can flag the new master down before its first ping, starting a
    /// second, spurious failover.
    pub fn down_after(mut self, down_after: Duration) -> Self {
        self.down_after = down_after;
        self
    }

    /// Sentinel's `failover-timeout`. Defaults to 5000 ms (Sentinel's own
    /// default is 3 min), so a failed failover is retried quickly.
    pub fn failover_timeout(mut self, failover_timeout: Duration) -> Self {
        self.failover_timeout = failover_timeout;
        self
    }

    /// Protects the data nodes with `requirepass` (and replication with
    /// `masterauth`). Defaults to no password. Replaces an earlier
    /// [`acl_user`](Self::acl_user).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.user = None;
        self.password = Some(password.into());
        self
    }

    /// Creates the ACL user `user` with all permissions on the data nodes,
    /// turns the `default` user off, and has replicas and sentinels
    /// authenticate as `user`. Defaults to no ACL user.
    pub fn acl_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// Protects the sentinels with a password of their own (`requirepass`
    /// on each sentinel, `sentinel sentinel-pass` between them). Defaults to
    /// no password.
    pub fn sentinel_password(mut self, password: impl Into<String>) -> Self {
        self.sentinel_password = Some(password.into());
        self
    }

    /// Appends one line to every data node's `redis.conf` (for example
    /// `maxmemory 64mb`). Sentinels do not get it.
    pub fn extra_config(mut self, line: impl Into<String>) -> Self {
        self.extra_config.push(line.into());
        self
    }

    /// The server binary every node runs (`redis-server` or
    /// `valkey-server`; sentinels run it with `--sentinel`): a path, or a
    /// name looked up on `PATH`. Defaults to the environment variable
    /// `REDIS_SERVER_BIN` if set and not empty, else `redis-server`.
    pub fn redis_server(mut self, binary: impl Into<PathBuf>) -> Self {
        self.redis_server = binary.into();
        self
    }

    /// The command-line client matching the server (`redis-cli` or
    /// `valkey-cli`), for the commands [`Topology::redis_cli`] hands out:
    /// a path, or a name looked up on `PATH`. Defaults to the environment
    /// variable `REDIS_CLI_BIN` if set and not empty, else `redis-cli`.
    pub fn redis_cli(mut self, binary: impl Into<PathBuf>) -> Self {
        self.redis_cli = binary.into();
        self
    }

    /// How long each wait of [`start`](Self::start) and
    /// [`Topology::restart`] may take: a node answering, a replica coming
    /// online, a sentinel seeing everything. Defaults to 30 s.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Keeps the topology's directory (every node's config and log) when
    /// the topology is dropped; the processes are killed all the same.
    /// Defaults to false, or to true when the environment variable
    /// `REDIS_TOPOLOGY_KEEP_DIR` is set to a non-empty value, which is the
    /// way to read the logs of a failed test.
    pub fn keep_dir(mut self, keep: bool) -> Self {
        self.keep_dir = keep;
        self
    }

    /// Serves every node over TLS only (`port 0`, `tls-port`), replication
    /// and Sentinel's links included, with a certificate for `127.0.0.1`
    /// signed by a CA made for this topology; clients trust
    /// [`Topology::tls_root_cert`]. Needs `openssl` on `PATH`. Defaults to
    /// false.
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Runs every node in a Linux network namespace of its own, joined to
    /// the others and to this process by veth pairs and a bridge, with an
    /// address of its own in a private `/24` (so [`Topology::addr`] is no
    /// loopback address). This is what lets a test cut links
    /// ([`Topology::cut`], [`Topology::heal`]) as a partition does.
    /// Defaults to false.
    ///
    /// Needs root (or `CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and the `ip`
    /// command; without them [`start`](Self::start) returns
    /// [`Error::NetworkUnavailable`], on which a test should skip. Not
    /// available with [`tls`](Self::tls) (the certificates name 127.0.0.1).
    pub fn network_namespaces(mut self, enabled: bool) -> Self {
        self.network_namespaces = enabled;
        self
    }

    /// Starts the master, then the replicas, then the sentinels, and returns
    /// once every replica is online at the master and every sentinel sees
    /// the master, every replica and every other sentinel.
    ///
    /// On error, every process started so far is killed.
    pub async fn start(self) -> Result<Topology> {
        self.validate()?;
        Topology::start(self).await
    }

    pub(crate) fn quorum_or_majority(&self) -> usize {
        self.quorum.unwrap_or(self.sentinels / 2 + 1)
    }

    /// The credentials clients of the data nodes use.
    pub(crate) fn data_credentials(&self) -> (Option<&str>, Option<&str>) {
        (self.user.as_deref(), self.password.as_deref())
    }

    fn validate(&self) -> Result<()> {
        let invalid = |setting, reason: &str| {
            Err(Error::InvalidConfig {
                setting,
                reason: reason.to_owned(),
            })
        };
        if self.sentinels > 0 {
            let quorum = self.quorum_or_majority();
            if quorum == 0 || quorum > self.sentinels {
                return invalid("quorum", "must be between 1 and the number of sentinels");
            }
        }
        if self.down_after < Duration::from_millis(100) {
            return invalid("down_after", "must be at least 100 ms");
        }
        if self.failover_timeout < Duration::from_millis(100) {
            return invalid("failover_timeout", "must be at least 100 ms");
        }
        if self.network_namespaces && self.tls {
            return invalid("network_namespaces", "cannot be combined with tls");
        }
        if self.network_namespaces && self.replicas + 1 + self.sentinels > network::MAX_NODES {
            return invalid(
                "network_namespaces",
                "a topology's /24 holds at most 252 nodes",
            );
        }
        if self.start_timeout.is_zero() {
            return invalid("start_timeout", "must be more than zero");
        }
        if !is_config_word(&self.master_name) {
            return invalid(
                "master_name",
                "must be non-empty ASCII letters, digits, `.`, `_` or `-`",
            );
        }
        if self
            .user
            .as_deref()
            .is_some_and(|user| !is_config_word(user))
        {
            return invalid(
                "acl_user",
                "the user name must be non-empty ASCII letters, digits, `.`, `_` or `-`",
            );
        }
        for (setting, password) in [
            ("password", &self.password),
            ("sentinel_password", &self.sentinel_password),
        ] {
            if password.as_deref().is_some_and(|p| !is_password(p)) {
                return invalid(
                    setting,
                    "must be non-empty, without spaces, quotes or control characters",
                );
            }
        }
        if self
            .extra_config
            .iter()
            .any(|line| line.contains(['\n', '\r']))
        {
            return invalid("extra_config", "each entry must be a single line");
        }
        Ok(())
    }

    /// The `redis.conf` of a data node listening on `addr`; `master` is
    /// `None` for the master.
    pub(crate) fn data_config(
        &self,
        addr: SocketAddr,
        master: Option<SocketAddr>,
        tls: Option<&TlsFiles>,
    ) -> String {
        let mut conf = listen(addr, tls);
        conf.push_str(
            "daemonize no\n\
             logfile \"\"\n\
             save \"\"\n\
             appendonly no\n\
             repl-diskless-sync yes\n\
             repl-diskless-sync-delay 0\n",
        );
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => {
                let _ = write!(
                    conf,
                    "user default off\n\
                     user {user} on >{password} ~* &* +@all\n\
                     masteruser {user}\n\
                     masterauth {password}\n"
                );
            }
            (None, Some(password)) => {
                let _ = write!(conf, "requirepass {password}\nmasterauth {password}\n");
            }
            _ => {}
        }
        if let Some(master) = master {
            let _ = writeln!(conf, "replicaof {} {}", master.ip(), master.port());
        }
        for line in &self.extra_config {
            let _ = writeln!(conf, "{line}");
        }
        conf
    }

    /// The `sentinel.conf` of a sentinel listening on `addr` and watching
    /// the master on `master`.
    pub(crate) fn sentinel_config(
        &self,
        addr: SocketAddr,
        master: SocketAddr,
        tls: Option<&TlsFiles>,
    ) -> String {
        let name = &self.master_name;
        let mut conf = listen(addr, tls);
        let _ = write!(
            conf,
            "daemonize no\n\
             logfile \"\"\n\
             sentinel monitor {name} {master_ip} {master_port} {quorum}\n\
             sentinel down-after-milliseconds {name} {down_after}\n\
             sentinel failover-timeout {name} {failover_timeout}\n\
             sentinel parallel-syncs {name} 1\n",
            master_ip = master.ip(),
            master_port = master.port(),
            quorum = self.quorum_or_majority(),
            down_after = self.down_after.as_millis(),
            failover_timeout = self.failover_timeout.as_millis(),
        );
        if let Some(user) = &self.user {
            let _ = writeln!(conf, "sentinel auth-user {name} {user}");
        }
        if let Some(password) = &self.password {
            let _ = writeln!(conf, "sentinel auth-pass {name} {password}");
        }
        if let Some(password) = &self.sentinel_password {
            let _ = write!(
                conf,
                "requirepass {password}\nsentinel sentinel-pass {password}\n"
            );
        }
        conf
    }
}

/// The lines that make a node listen on `addr`, over TLS if `tls` is set.
/// A node in a network namespace of its own binds to its own address;
/// nobody else can reach that namespace, so protected mode is off.
fn listen(addr: SocketAddr, tls: Option<&TlsFiles>) -> String {
    let mut conf = match tls {
        Some(tls) => tls.config(addr.port()),
        None => format!("port {}\n", addr.port()),
    };
    let _ = writeln!(conf, "bind {}", addr.ip());
    if !addr.ip().is_loopback() {
        conf.push_str("protected-mode no\n");
    }
    conf
}

/// Safe to write unquoted in a config file and as a Sentinel master name.
fn is_config_word(word: &str) -> bool {
    !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Safe to write unquoted in a config file (ACL `>password` rules included).
fn is_password(password: &str) -> bool {
    !password.is_empty()
        && password
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn rejected_setting(builder: TopologyBuilder) -> &'static str {
        match builder.validate() {
            Err(Error::InvalidConfig { setting, .. }) => setting,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_with_a_majority_quorum() {
        let builder = TopologyBuilder::default();
        builder.validate().unwrap();
        assert_eq!(builder.quorum_or_majority(), 2);
        assert_eq!(builder.clone().sentinels(5).quorum_or_majority(), 3);
        assert_eq!(builder.sentinels(1).quorum_or_majority(), 1);
    }

    #[test]
    fn no_sentinels_needs_no_quorum() {
        TopologyBuilder::default().sentinels(0).validate().unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        let b = TopologyBuilder::default;
        assert_eq!(rejected_setting(b().quorum(4)), "quorum");
        assert_eq!(rejected_setting(b().quorum(0)), "quorum");
        assert_eq!(
            rejected_setting(b().master_name("my master")),
            "master_name"
        );
        assert_eq!(rejected_setting(b().acl_user("a b", "pw")), "acl_user");
        assert_eq!(rejected_setting(b().password("with space")), "password");
        assert_eq!(rejected_setting(b().password("")), "password");
        assert_eq!(
            rejected_setting(b().sentinel_password("quo\"te")),
            "sentinel_password"
        );
        assert_eq!(rejected_setting(b().extra_config("a\nb")), "extra_config");
        assert_eq!(
            rejected_setting(b().network_namespaces(true).tls(true)),
            "network_namespaces"
        );
        assert_eq!(
            rejected_setting(b().down_after(Duration::ZERO)),
            "down_after"
        );
        assert_eq!(
            rejected_setting(b().start_timeout(Duration::ZERO)),
            "start_timeout"
        );
    }

    #[test]
    fn replica_config_points_at_the_master_and_carries_credentials() {
        let conf = TopologyBuilder::default()
            .acl_user("app", "s3cret")
            .extra_config("maxmemory 64mb")
            .data_config(local(20001), Some(local(20000)), None);
        for line in [
            "port 20001",
            "replicaof 127.0.0.1 20000",
            "bind 127.0.0.1",
            "user default off",
            "user app on >s3cret ~* &* +@all",
            "masteruser app",
            "masterauth s3cret",
            "maxmemory 64mb",
        ] {
            assert!(
                conf.lines().any(|l| l == line),
                "missing {line:?} in\n{conf}"
            );
        }
    }

    #[test]
    fn sentinel_config_monitors_the_master_with_the_chosen_timings() {
        let conf = TopologyBuilder::default()
            .password("pw")
            .sentinel_password("spw")
            .down_after(Duration::from_millis(2500))
            .sentinel_config(local(20010), local(20000), None);
        for line in [
            "sentinel monitor mymaster 127.0.0.1 20000 2",
            "sentinel down-after-milliseconds mymaster 2500",
            "sentinel failover-timeout mymaster 5000",
            "sentinel auth-pass mymaster pw",
            "requirepass spw",
            "sentinel sentinel-pass spw",
        ] {
            assert!(
                conf.lines().any(|l| l == line),
                "missing {line:?} in\n{conf}"
            );
        }
        assert!(!conf.contains("auth-user"));
    }
}
