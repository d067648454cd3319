//! Tracking the replicas that may serve reads: who they are, whether they
//! follow the current master, how stale they are, how fast they answer.
//!
//! One background task probes the master and every replica with `INFO
//! replication` each `replica_probe_interval` and publishes a [`ReadSet`]
//! snapshot that reads pick from without waiting on anything.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::addr::NodeAddr;
use crate::builder::Mode;
use crate::events::Event;
use crate::node::Connector;
use crate::shared::{Connection, Master, Shared};

/// What reads may pick from, as of the latest probe.
#[derive(Default)]
pub(crate) struct ReadSet {
    /// The master the replicas were checked against (0: none known).
    pub(crate) master_generation: u64,
    pub(crate) master_latency: Option<Duration>,
    /// Replicas the master reported online and lagging at most
    /// `min_replicas.max_lag`, with when that was measured.
    pub(crate) healthy_replicas: Option<(usize, Instant)>,
    pub(crate) replicas: Vec<ReadReplica>,
}

/// One replica as of the latest probe.
#[derive(Clone)]
pub(crate) struct ReadReplica {
    pub(crate) node: NodeAddr,
    pub(crate) connection: Option<Arc<Connection>>,
    /// Why it does not follow the current master, if it does not.
    pub(crate) problem: Option<String>,
    /// It has every write the master had acknowledged at this moment.
    pub(crate) caught_up_at: Option<Instant>,
    pub(crate) latency: Option<Duration>,
}

/// Why a replica may not serve reads; displayed only when someone asks, as
/// reads check it on every call.
#[derive(Debug)]
pub(crate) enum Unusable<'a> {
    /// What the latest probe found wrong.
    Problem(&'a str),
    NoConnection,
    NeverCaughtUp,
    TooStale {
        staleness: Duration,
        max_staleness: Duration,
    },
}

impl std::fmt::Display for Unusable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Problem(problem) => f.write_str(problem),
            Self::NoConnection => f.write_str("no working connection"),
            Self::NeverCaughtUp => f.write_str("it has not reached any recent master offset"),
            Self::TooStale {
                staleness,
                max_staleness,
            } => write!(
                f,
                "{staleness:?} behind the master, more than the {max_staleness:?} allowed"
            ),
        }
    }
}

impl ReadReplica {
    /// Why it may not serve a read now; `None` if it may.
    pub(crate) fn unusable(&self, now: Instant, max_staleness: Duration) -> Option<Unusable<'_>> {
        if let Some(problem) = &self.problem {
            return Some(Unusable::Problem(problem));
        }
        if self
            .connection
            .as_ref()
            .is_none_or(|c| c.failed.load(Ordering::Acquire))
        {
            return Some(Unusable::NoConnection);
        }
        too_stale(self.caught_up_at, now, max_staleness)
    }
}

/// Why a replica that caught up at `caught_up_at` is too stale to serve
/// now; `None` if it is within `max_staleness`.
fn too_stale(
    caught_up_at: Option<Instant>,
    now: Instant,
    max_staleness: Duration,
) -> Option<Unusable<'static>> {
    let Some(caught_up_at) = caught_up_at else {
        return Some(Unusable::NeverCaughtUp);
    };
    let staleness = now.saturating_duration_since(caught_up_at);
    (staleness > max_staleness).then_some(Unusable::TooStale {
        staleness,
        max_staleness,
    })
}

/// `INFO replication`, the fields this crate reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReplicationInfo {
    pub(crate) is_master: bool,
    pub(crate) replid: String,
    /// `master_repl_offset` on a master, `slave_repl_offset` on a replica.
    pub(crate) offset: u64,
    /// On a replica: `master_link_status:up`.
    pub(crate) link_up: bool,
    /// On a master: its replicas.
    pub(crate) replicas: Vec<ListedReplica>,
}

/// A replica as its master's `INFO replication` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListedReplica {
    pub(crate) ip: String,
    pub(crate) port: u16,
    pub(crate) online: bool,
    /// Seconds since its last acknowledgement.
    pub(crate) lag: u64,
}

impl ReplicationInfo {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut info = Self::default();
        let mut role = None;
        let mut offset = None;
        for line in text.lines() {
            let Some((name, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            match name {
                "role" => role = Some(value == "master"),
                "master_replid" => info.replid = value.to_owned(),
                "master_link_status" => info.link_up = value == "up",
                "master_repl_offset" | "slave_repl_offset" => {
                    let parsed = value
                        .parse()
                        .map_err(|e| format!("INFO replication {name}: {e}"))?;
                    // A replica reports both; its own applied offset wins.
                    if name == "slave_repl_offset" || offset.is_none() {
                        offset = Some(parsed);
                    }
                }
                _ if name.starts_with("slave") && value.starts_with("ip=") => {
                    let fields: HashMap<&str, &str> =
                        value.split(',').filter_map(|f| f.split_once('=')).collect();
                    let port = fields.get("port").and_then(|p| p.parse().ok());
                    if let (Some(ip), Some(port)) = (fields.get("ip"), port) {
                        let online = fields.get("state") == Some(&"online");
                        let lag = fields
                            .get("lag")
                            .and_then(|l| l.parse().ok())
                            .unwrap_or(u64::MAX);
                        info.replicas.push(ListedReplica {
                            ip: (*ip).to_owned(),
                            port,
                            online,
                            lag,
                        });
                    }
                }
                _ => {}
            }
        }
        info.is_master = role.ok_or("INFO replication has no role")?;
        info.offset = offset.ok_or("INFO replication has no replication offset")?;
        Ok(info)
    }

    /// Replicas online with an acknowledgement at most `max_lag` old.
    pub(crate) fn healthy_replicas(&self, max_lag: Duration) -> usize {
        self.replicas
            .iter()
            .filter(|r| r.online && r.lag <= max_lag.as_secs())
            .count()
    }
}

/// The master's replication offset over time, to turn a replica's offset
/// into a time: a replica at offset `r` has every write the master had
/// acknowledged when its offset was last at or below `r`.
#[derive(Debug, Default)]
pub(crate) struct OffsetHistory {
    replid: String,
    /// `(sent at, offset)`, oldest first. The time is taken before the
    /// probe is sent, so every write acknowledged before it is within the
    /// offset the master answers.
    samples: VecDeque<(Instant, u64)>,
}

impl OffsetHistory {
    /// Records a sample, forgetting samples older than `keep` (but one) and
    /// every sample of another replication history.
    pub(crate) fn record(&mut self, at: Instant, replid: &str, offset: u64, keep: Duration) {
        if self.replid != replid {
            self.replid = replid.to_owned();
            self.samples.clear();
        }
        self.samples.push_back((at, offset));
        while self.samples.len() > 1
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| at.saturating_duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
    }

    /// The latest moment a replica of history `replid` at `offset` is
    /// known to have caught up to.
    pub(crate) fn caught_up_at(&self, replid: &str, offset: u64) -> Option<Instant> {
        if replid != self.replid {
            return None;
        }
        self.samples
            .iter()
            .rev()
            .find(|(_, master)| *master <= offset)
            .map(|(at, _)| *at)
    }
}

/// What a replica probe found, with the connection it used.
type Probed = (
    Option<Arc<Connection>>,
    Result<(ReplicationInfo, Duration), String>,
);

/// What the tracker remembers of one replica between probes.
struct Tracked {
    connection: Option<Arc<Connection>>,
    /// Why it does not follow the current master, at the latest probe.
    problem: Option<String>,
    caught_up_at: Option<Instant>,
    latency: Option<Duration>,
    /// Whether it was usable at the previous round, for events.
    usable: bool,
    pending: Option<JoinHandle<Probed>>,
}

impl Tracked {
    fn new() -> Self {
        Self {
            connection: None,
            problem: Some("not probed yet".to_owned()),
            caught_up_at: None,
            latency: None,
            usable: false,
            pending: None,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(pending) = &self.pending {
            pending.abort();
        }
    }
}

/// Probes one replica, connecting first unless `connection` still works.
async fn probe_replica(
    connector: Connector,
    node: NodeAddr,
    connection: Option<Arc<Connection>>,
) -> Probed {
    let connection = match connection {
        Some(connection) => connection,
        None => match connector.connect(&node).await {
            Ok(multiplexed) => Connection::new(multiplexed),
            Err(error) => return (None, Err(error.to_string())),
        },
    };
    let result = probe(&mut connection.multiplexed.clone()).await;
    if result
        .as_ref()
        .is_err_and(|e| e.is_io_error() || e.is_timeout())
    {
        connection.failed.store(true, Ordering::Release);
    }
    (Some(connection), result.map_err(|e| e.to_string()))
}

/// Weight of the newest sample in the latency average.
const LATENCY_WEIGHT: f64 = 0.3;

fn average(previous: Option<Duration>, sample: Duration) -> Duration {
    match previous {
        None => sample,
        Some(old) => old.mul_f64(1.0 - LATENCY_WEIGHT) + sample.mul_f64(LATENCY_WEIGHT),
    }
}

/// `INFO replication` on `connection`, with its round trip.
async fn probe(
    connection: &mut MultiplexedConnection,
) -> Result<(ReplicationInfo, Duration), redis::RedisError> {
    let sent = Instant::now();
    let text: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(connection)
        .await?;
    let took = sent.elapsed();
    let info = ReplicationInfo::parse(&text)
        .map_err(|e| redis::RedisError::from((redis::ErrorKind::Parse, "bad reply", e)))?;
    Ok((info, took))
}

impl Shared {
    /// Healthy replicas of `master` by `max_lag`, from the latest probe if
    /// it is recent and of this master, else asked now.
    pub(crate) async fn healthy_replicas(
        &self,
        master: &Master,
        max_lag: Duration,
    ) -> Result<usize, redis::RedisError> {
        let recent = self.settings.replica_probe_interval.saturating_mul(2);
        let set = self.read_set.load_full();
        if set.master_generation == master.generation
            && let Some((count, at)) = set.healthy_replicas
            && at.elapsed() <= recent
        {
            return Ok(count);
        }
        Ok(self
            .replication_info(master)
            .await?
            .healthy_replicas(max_lag))
    }

    /// `master`'s `INFO replication`, asked now.
    pub(crate) async fn replication_info(
        &self,
        master: &Master,
    ) -> Result<ReplicationInfo, redis::RedisError> {
        let mut connection = master.connection.load().multiplexed.clone();
        Ok(probe(&mut connection).await?.0)
    }

    /// The nodes that may be replicas now: with Sentinel, those it lists
    /// and does not think down; with candidates, every candidate but the
    /// master, and what the master lists that no candidate resolves to.
    async fn replica_members(
        &self,
        master: Option<&Master>,
        master_info: Option<&ReplicationInfo>,
        previous: Vec<NodeAddr>,
    ) -> Vec<NodeAddr> {
        match &self.settings.mode {
            Mode::Sentinel { master_name, .. } => {
                let command = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(master_name)
                    .to_owned();
                let sentinels = crate::shared::lock(&self.sentinels).clone();
                for sentinel in &sentinels {
                    let Ok(listed) = self
                        .ask_sentinel::<Vec<HashMap<String, String>>>(sentinel, &command)
                        .await
                    else {
                        continue;
                    };
                    return listed
                        .iter()
                        .filter(|fields| {
                            let flags = fields.get("flags").map_or("", String::as_str);
                            !flags
                                .split(',')
                                .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
                        })
                        .filter_map(|fields| {
                            let port = fields.get("port")?.parse().ok()?;
                            NodeAddr::new(fields.get("ip")?.clone(), port).ok()
                        })
                        .collect();
                }
                previous
            }
            Mode::Candidates { nodes } => {
                let mut members: Vec<NodeAddr> = nodes
                    .iter()
                    .filter(|n| master.is_none_or(|m| m.node != **n))
                    .cloned()
                    .collect();
                let Some(info) = master_info.filter(|i| !i.replicas.is_empty()) else {
                    return members;
                };
                let mut known: Vec<SocketAddr> = Vec::new();
                for node in nodes {
                    known.extend(self.data.resolve(node).await.unwrap_or_default());
                }
                for replica in &info.replicas {
                    let listed: Option<SocketAddr> =
                        format!("{}:{}", replica.ip, replica.port).parse().ok();
                    if listed.is_some_and(|l| !known.contains(&l))
                        && let Ok(node) = NodeAddr::new(replica.ip.clone(), replica.port)
                    {
                        members.push(node);
                    }
                }
                members
            }
        }
    }

    /// One round of probes; publishes the new read set.
    async fn probe_replicas(
        &self,
        history: &mut OffsetHistory,
        tracked: &mut HashMap<NodeAddr, Tracked>,
        master_latency: &mut Option<Duration>,
    ) {
        let master = self.master.load_full();
        let sent = Instant::now();
        let master_info = match &master {
            Some(master) => {
                let mut connection = master.connection.load().multiplexed.clone();
                match probe(&mut connection).await {
                    Ok((info, took)) if info.is_master => {
                        *master_latency = Some(average(*master_latency, took));
                        let keep =
                            self.settings.max_staleness + self.settings.replica_probe_interval;
                        history.record(sent, &info.replid, info.offset, keep);
                        Some(info)
                    }
                    Ok(_) | Err(_) => None,
                }
            }
            None => None,
        };
        let previous: Vec<NodeAddr> = tracked.keys().cloned().collect();
        let members = self
            .replica_members(master.as_deref(), master_info.as_ref(), previous)
            .await;
        tracked.retain(|node, entry| {
            let listed = members.contains(node);
            if !listed && entry.usable {
                self.emit(Event::ReplicaUnusable {
                    node: node.clone(),
                    reason: "no longer listed as a replica".to_owned(),
                });
            }
            listed
        });
        // Each replica is probed by a task of its own: one that hangs (or
        // takes a connect timeout) must not hold up the others' samples.
        for node in &members {
            let entry = tracked.entry(node.clone()).or_insert_with(Tracked::new);
            if entry.pending.is_none() {
                let connection = entry
                    .connection
                    .clone()
                    .filter(|c| !c.failed.load(Ordering::Acquire));
                let (connector, node) = (self.data.clone(), node.clone());
                entry.pending = Some(tokio::spawn(probe_replica(connector, node, connection)));
            }
        }
        let deadline = tokio::time::Instant::from_std(sent) + self.settings.replica_probe_interval;
        let mut replicas = Vec::new();
        for node in &members {
            let entry = tracked.get_mut(node).expect("tracked above");
            if let Some(pending) = &mut entry.pending
                && let Ok(joined) = tokio::time::timeout_at(deadline, pending).await
            {
                // A probe still running is judged at a later round; until
                // then the replica ages from its last sample.
                entry.pending = None;
                let (connection, result) =
                    joined.unwrap_or_else(|error| (None, Err(error.to_string())));
                entry.connection = connection;
                entry.problem = match (&result, &master_info) {
                    (Err(error), _) => Some(format!("probe failed: {error}")),
                    (Ok((info, _)), _) if info.is_master => Some("it is a master".to_owned()),
                    (Ok((info, _)), _) if !info.link_up => {
                        Some("its link to the master is down".to_owned())
                    }
                    // Without the master's sample, what the replica had
                    // stands: its staleness only grows until one comes.
                    (Ok(_), None) => entry.problem.take(),
                    (Ok((info, _)), Some(master)) if info.replid != master.replid => {
                        Some("it does not replicate the current master".to_owned())
                    }
                    (Ok((info, took)), Some(_)) => {
                        entry.latency = Some(average(entry.latency, *took));
                        let caught_up = history.caught_up_at(&info.replid, info.offset);
                        entry.caught_up_at = entry.caught_up_at.max(caught_up);
                        None
                    }
                };
                if entry.problem.is_some() {
                    entry.caught_up_at = None;
                }
            }
            let replica = ReadReplica {
                node: node.clone(),
                connection: entry.connection.clone(),
                problem: entry.problem.clone(),
                caught_up_at: entry.caught_up_at,
                latency: entry.latency,
            };
            let reason = replica.unusable(Instant::now(), self.settings.max_staleness);
            match (&reason, entry.usable) {
                (None, false) => self.emit(Event::ReplicaUsable { node: node.clone() }),
                (Some(reason), true) => self.emit(Event::ReplicaUnusable {
                    node: node.clone(),
                    reason: reason.to_string(),
                }),
                _ => {}
            }
            entry.usable = reason.is_none();
            replicas.push(replica);
        }
        let healthy = match (&master_info, self.settings.min_replicas) {
            (Some(info), Some(min)) => Some((info.healthy_replicas(min.max_lag), sent)),
            _ => None,
        };
        self.read_set.store(Arc::new(ReadSet {
            master_generation: master.as_ref().map_or(0, |m| m.generation),
            master_latency: *master_latency,
            healthy_replicas: healthy,
            replicas,
        }));
    }
}

/// Probes the master and its replicas every `replica_probe_interval`, and
/// at once when a new master is installed, until the client is dropped.
pub(crate) async fn replica_loop(shared: Arc<Shared>, mut stop: watch::Receiver<()>) {
    let mut installed = shared.subscribe_installed();
    let mut interval = tokio::time::interval(shared.settings.replica_probe_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut history = OffsetHistory::default();
    let mut tracked = HashMap::new();
    let mut master_latency = None;
    let mut generation = 0;
    loop {
        tokio::select! {
            _ = crate::tasks::stopped(&mut stop) => return,
            _ = interval.tick() => {}
            _ = installed.changed() => {}
        }
        let now = *installed.borrow_and_update();
        if now != generation {
            generation = now;
            master_latency = None;
        }
        let round = shared.probe_replicas(&mut history, &mut tracked, &mut master_latency);
        tokio::select! {
            _ = crate::tasks::stopped(&mut stop) => return,
            _ = round => shared.probe_rounds.send_modify(|rounds| *rounds += 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MASTER: &str = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
        slave0:ip=10.0.0.2,port=6379,state=online,offset=1200,lag=0\r\n\
        slave1:ip=10.0.0.3,port=6379,state=wait_bgsave,offset=0,lag=3\r\n\
        master_failover_state:no-failover\r\nmaster_replid:aaa\r\n\
        master_replid2:0000\r\nmaster_repl_offset:1234\r\nsecond_repl_offset:-1\r\n";

    const REPLICA: &str = "# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\n\
        master_port:6379\r\nmaster_link_status:up\r\nmaster_last_io_seconds_ago:0\r\n\
        slave_read_repl_offset:1234\r\nslave_repl_offset:1200\r\nconnected_slaves:0\r\n\
        master_replid:aaa\r\nmaster_repl_offset:1234\r\n";

    #[test]
    fn info_replication_is_read_on_masters_and_replicas() {
        let master = ReplicationInfo::parse(MASTER).unwrap();
        assert!(master.is_master);
        assert_eq!((master.replid.as_str(), master.offset), ("aaa", 1234));
        assert_eq!(master.replicas.len(), 2);
        assert_eq!(master.healthy_replicas(Duration::from_secs(10)), 1);
        let replica = ReplicationInfo::parse(REPLICA).unwrap();
        assert!(!replica.is_master && replica.link_up);
        assert_eq!(replica.offset, 1200, "the applied offset, not the master's");
        assert!(ReplicationInfo::parse("role:master\r\n").is_err());
    }

    #[test]
    fn a_replica_is_as_stale_as_the_last_master_sample_it_has_reached() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let keep = Duration::from_secs(10);
        let mut history = OffsetHistory::default();
        history.record(at(0), "a", 100, keep);
        history.record(at(500), "a", 200, keep);
        history.record(at(1000), "a", 300, keep);
        assert_eq!(history.caught_up_at("a", 99), None);
        assert_eq!(history.caught_up_at("a", 250), Some(at(500)));
        assert_eq!(history.caught_up_at("a", 300), Some(at(1000)));
        assert_eq!(history.caught_up_at("b", 300), None, "another history");
        history.record(at(1500), "b", 10, keep);
        assert_eq!(
            history.caught_up_at("a", 300),
            None,
            "forgotten on a switch"
        );
    }

    #[test]
    fn a_replica_serves_only_within_the_bound_of_the_last_offset_it_reached() {
        let now = Instant::now();
        let bound = Duration::from_secs(1);
        assert!(too_stale(None, now, bound).is_some(), "never caught up");
        assert!(too_stale(Some(now), now, bound).is_none());
        assert!(too_stale(Some(now - Duration::from_millis(999)), now, bound).is_none());
        let stale = too_stale(Some(now - Duration::from_millis(1500)), now, bound)
            .unwrap()
            .to_string();
        assert!(stale.contains("behind the master"), "{stale}");
    }

    proptest! {
        /// Whatever the writes and probes, a replica is never judged fresher
        /// than it is: every write acknowledged before the moment it is
        /// said to have caught up to is within its offset.
        #[test]
        fn staleness_is_never_underestimated(
            steps in prop::collection::vec((1u64..50, 0u64..20, 0u64..30, 0u64..10), 1..60),
        ) {
            let start = Instant::now();
            let keep = Duration::from_secs(3600);
            let mut history = OffsetHistory::default();
            // (acknowledged at, offset after the write)
            let mut writes: Vec<(Instant, u64)> = Vec::new();
            let (mut now, mut offset) = (start, 0u64);
            for (gap_ms, written, replica_behind, during_probe) in steps {
                now += Duration::from_millis(gap_ms);
                if written > 0 {
                    offset += written;
                    writes.push((now, offset));
                }
                // The probe's time is taken before it is sent; writes
                // acknowledged while it travels are in the offset it reads.
                let sent = now;
                if during_probe > 0 {
                    now += Duration::from_millis(1);
                    offset += during_probe;
                    writes.push((now, offset));
                }
                history.record(sent, "r", offset, keep);
                let replica = offset.saturating_sub(replica_behind);
                if let Some(caught_up) = history.caught_up_at("r", replica) {
                    for (acked, write_offset) in &writes {
                        if *acked < caught_up {
                            prop_assert!(*write_offset <= replica);
                        }
                    }
                }
            }
        }
    }
}
