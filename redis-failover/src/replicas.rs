//! Tracking the replicas that may serve reads: who they are, whether they
//! follow the current master, how stale they are, how fast they answer.
//!
//! One background task probes the master and every replica with `INFO
//! replication` each `replica_probe_interval` and publishes a [`ReadSet`]
//! snapshot that reads pick from without waiting on anything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::addr::NodeAddr;
use crate::builder::Mode;
use crate::events::{Event, Telemetry};
use crate::node::{Connection, Connector};
use crate::replica_set::{OffsetHistory, ReadReplica, ReadSet, ReplicationInfo};
use crate::shared::Shared;
use crate::state::Master;

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

impl Tracked {
    /// Takes in what a probe found, judged against the master's sample.
    fn judge(
        &mut self,
        (connection, result): Probed,
        master: Option<&ReplicationInfo>,
        history: &OffsetHistory,
    ) {
        self.connection = connection;
        self.problem = match (&result, master) {
            (Err(error), _) => Some(format!("probe failed: {error}")),
            (Ok((info, _)), _) if info.is_master => Some("it is a master".to_owned()),
            (Ok((info, _)), _) if !info.link_up => {
                Some("its link to the master is down".to_owned())
            }
            // Without the master's sample, what the replica had stands:
            // its staleness only grows until one comes.
            (Ok(_), None) => self.problem.take(),
            (Ok((info, _)), Some(master)) if info.replid != master.replid => {
                Some("it does not replicate the current master".to_owned())
            }
            (Ok((info, took)), Some(_)) => {
                self.latency = Some(average(self.latency, *took));
                let caught_up = history.caught_up_at(&info.replid, info.offset);
                self.caught_up_at = self.caught_up_at.max(caught_up);
                None
            }
        };
        if self.problem.is_some() {
            self.caught_up_at = None;
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
        connection.fail();
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

/// How a round of replica probes runs.
pub(crate) struct Probing<'a> {
    /// Opens the replicas' connections.
    pub(crate) connector: &'a Connector,
    /// A probe still running after this long is judged at a later round.
    pub(crate) interval: Duration,
    pub(crate) max_staleness: Duration,
    /// Where replicas becoming usable or unusable are told.
    pub(crate) telemetry: &'a Telemetry,
}

/// One master's replicas as the probes follow them: the master's offsets
/// over time, its latency, and what each replica showed. The one-master
/// modes keep one; a cluster client one per master of its slot map.
#[derive(Default)]
pub(crate) struct ReplicaTracker {
    history: OffsetHistory,
    tracked: HashMap<NodeAddr, Tracked>,
    pub(crate) master_latency: Option<Duration>,
}

impl ReplicaTracker {
    /// The replicas followed now.
    pub(crate) fn members(&self) -> Vec<NodeAddr> {
        self.tracked.keys().cloned().collect()
    }

    /// The master's `INFO replication` on `connection`, sampled into the
    /// history (its offset at `sent`, kept for `keep`) and its latency;
    /// `None` if it did not answer as a master.
    pub(crate) async fn probe_master(
        &mut self,
        connection: &mut MultiplexedConnection,
        sent: Instant,
        keep: Duration,
    ) -> Option<ReplicationInfo> {
        match probe(connection).await {
            Ok((info, took)) if info.is_master => {
                self.master_latency = Some(average(self.master_latency, took));
                self.history.record(sent, &info.replid, info.offset, keep);
                Some(info)
            }
            Ok(_) | Err(_) => None,
        }
    }

    /// Probes `members` (forgetting the replicas no longer listed), judged
    /// against `master_info`, sampled at `sent`; the replicas as reads see
    /// them.
    pub(crate) async fn probe_replicas(
        &mut self,
        members: &[NodeAddr],
        master_info: Option<&ReplicationInfo>,
        sent: Instant,
        probing: &Probing<'_>,
    ) -> Vec<ReadReplica> {
        self.tracked.retain(|node, entry| {
            let listed = members.contains(node);
            if !listed && entry.usable {
                probing.telemetry.emit(Event::ReplicaUnusable {
                    node: node.clone(),
                    reason: "no longer listed as a replica".to_owned(),
                });
            }
            listed
        });
        // Each replica is probed by a task of its own: one that hangs (or
        // takes a connect timeout) must not hold up the others' samples.
        for node in members {
            let entry = self
                .tracked
                .entry(node.clone())
                .or_insert_with(Tracked::new);
            if entry.pending.is_none() {
                let connection = entry.connection.clone().filter(|c| !c.has_failed());
                let (connector, node) = (probing.connector.clone(), node.clone());
                entry.pending = Some(tokio::spawn(probe_replica(connector, node, connection)));
            }
        }
        let deadline = tokio::time::Instant::from_std(sent) + probing.interval;
        let mut replicas = Vec::new();
        for node in members {
            let entry = self.tracked.get_mut(node).expect("tracked above");
            if let Some(pending) = &mut entry.pending
                && let Ok(joined) = tokio::time::timeout_at(deadline, pending).await
            {
                // A probe still running is judged at a later round; until
                // then the replica ages from its last sample.
                entry.pending = None;
                let probed = joined.unwrap_or_else(|error| (None, Err(error.to_string())));
                entry.judge(probed, master_info, &self.history);
            }
            replicas.push(read_replica(node, entry, probing));
        }
        replicas
    }
}

/// The replica at `node` as reads see it, with an event when it became
/// usable or unusable.
fn read_replica(node: &NodeAddr, entry: &mut Tracked, probing: &Probing<'_>) -> ReadReplica {
    let replica = ReadReplica {
        node: node.clone(),
        connection: entry.connection.clone(),
        problem: entry.problem.clone(),
        caught_up_at: entry.caught_up_at,
        latency: entry.latency,
    };
    let reason = replica.unusable(Instant::now(), probing.max_staleness);
    match (&reason, entry.usable) {
        (None, false) => probing
            .telemetry
            .emit(Event::ReplicaUsable { node: node.clone() }),
        (Some(reason), true) => probing.telemetry.emit(Event::ReplicaUnusable {
            node: node.clone(),
            reason: reason.to_string(),
        }),
        _ => {}
    }
    entry.usable = reason.is_none();
    replica
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
        let set = self.state.read_set();
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
                let sentinels = crate::state::lock(&self.sentinels.known).clone();
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
    async fn probe_replicas(&self, tracker: &mut ReplicaTracker) {
        let master = self.state.master();
        let sent = Instant::now();
        let master_info = match &master {
            Some(master) => {
                let mut connection = master.connection.load().multiplexed.clone();
                let keep = self.settings.max_staleness + self.settings.replica_probe_interval;
                tracker.probe_master(&mut connection, sent, keep).await
            }
            None => None,
        };
        let previous = tracker.members();
        let members = self
            .replica_members(master.as_deref(), master_info.as_ref(), previous)
            .await;
        let probing = Probing {
            connector: &self.data,
            interval: self.settings.replica_probe_interval,
            max_staleness: self.settings.max_staleness,
            telemetry: &self.telemetry,
        };
        let replicas = tracker
            .probe_replicas(&members, master_info.as_ref(), sent, &probing)
            .await;
        let healthy = match (&master_info, self.settings.min_replicas) {
            (Some(info), Some(min)) => Some((info.healthy_replicas(min.max_lag), sent)),
            _ => None,
        };
        self.state.publish_read_set(ReadSet {
            master_generation: master.as_ref().map_or(0, |m| m.generation),
            master_latency: tracker.master_latency,
            healthy_replicas: healthy,
            replicas,
        });
    }

    /// Starts the replica probes unless they run: on the first read that
    /// may use replicas, or at build time when the settings need them.
    pub(crate) fn track_replicas(self: &Arc<Self>) {
        if !self.tracking.swap(true, Ordering::AcqRel) {
            tokio::spawn(replica_loop(Arc::clone(self), self.stopped()));
        }
    }
}

/// Probes the master and its replicas every `replica_probe_interval`, and
/// at once when a new master is installed, until the client is dropped.
pub(crate) async fn replica_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut installed = shared.subscribe_installed();
    let mut interval = tokio::time::interval(shared.settings.replica_probe_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tracker = ReplicaTracker::default();
    let mut generation = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
            _ = installed.changed() => {}
        }
        let now = *installed.borrow_and_update();
        if now != generation {
            generation = now;
            tracker.master_latency = None;
        }
        let round = shared.probe_replicas(&mut tracker);
        tokio::select! {
            () = stop.cancelled() => return,
            _ = round => shared.probe_rounds.send_modify(|rounds| *rounds += 1),
        }
    }
}
