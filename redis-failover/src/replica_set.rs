//! What the replica probes found: each replica's state, how stale it may
//! be (from the master's offsets over time), and the read set reads pick
//! from.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::addr::NodeAddr;
use crate::node::Connection;

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
        if self.connection.as_ref().is_none_or(|c| c.has_failed()) {
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
