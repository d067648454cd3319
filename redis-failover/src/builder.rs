//! Client settings, their defaults and their validation.

use std::sync::Arc;
use std::time::Duration;

use crate::addr::{DnsResolver, NodeAddr, Resolve};
use crate::backoff::Backoff;
// Named by the docs' links only.
#[cfg(doc)]
use crate::client::FailoverClient;
use crate::durable::LostReplicaGrace;
use crate::error::{Error, Result};
use crate::node::{Credentials, MasterCheck, Tls};
use crate::policy::RetryPolicy;
use crate::routing::{Durability, ReadPolicy, ReplicaPreference};

/// How the client finds the master.
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    Candidates {
        nodes: Vec<NodeAddr>,
    },
    Sentinel {
        master_name: String,
        sentinels: Vec<NodeAddr>,
    },
}

/// Settings of a [`FailoverClient`]; start from
/// [`FailoverClient::candidates`] or [`FailoverClient::sentinel`].
#[derive(Clone, Debug)]
#[must_use]
pub struct FailoverClientBuilder {
    pub(crate) mode: Mode,
    pub(crate) last_resort: Option<NodeAddr>,
    pub(crate) min_agreement: Option<usize>,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) credentials: Credentials,
    pub(crate) sentinel_credentials: Credentials,
    pub(crate) tls: Option<Tls>,
    pub(crate) sentinel_tls: Option<Tls>,
    pub(crate) master_check: MasterCheck,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) retry_budget: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) recheck_interval: Duration,
    pub(crate) event_capacity: usize,
    pub(crate) read_policy: ReadPolicy,
    pub(crate) replica_preference: Option<ReplicaPreference>,
    pub(crate) max_staleness: Duration,
    pub(crate) replica_probe_interval: Duration,
    pub(crate) durability: Durability,
    pub(crate) dedicated_connections: u32,
    pub(crate) lost_replica_grace: Option<LostReplicaGrace>,
    pub(crate) min_replicas: Option<MinReplicas>,
    pub(crate) demote_stale_masters: bool,
}

/// Client-side `min-replicas-to-write`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MinReplicas {
    pub(crate) count: usize,
    pub(crate) max_lag: Duration,
}

impl FailoverClientBuilder {
    pub(crate) fn new(mode: Mode) -> Self {
        Self {
            mode,
            last_resort: None,
            min_agreement: None,
            resolver: Arc::new(DnsResolver),
            credentials: Credentials::none(),
            sentinel_credentials: Credentials::none(),
            tls: None,
            sentinel_tls: None,
            master_check: MasterCheck::Role,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(500),
            retry_budget: Duration::from_secs(30),
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(500))
                .expect("valid defaults"),
            recheck_interval: Duration::from_secs(1),
            event_capacity: 1024,
            read_policy: ReadPolicy::Master,
            replica_preference: None,
            max_staleness: Duration::from_secs(5),
            replica_probe_interval: Duration::from_millis(500),
            durability: Durability::Master,
            dedicated_connections: 16,
            lost_replica_grace: None,
            min_replicas: None,
            demote_stale_masters: false,
        }
    }

    /// Credentials for the data nodes (master and replicas). Defaults to none.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Credentials for the sentinels, which often differ from the data
    /// nodes'. Defaults to none.
    pub fn sentinel_credentials(mut self, credentials: Credentials) -> Self {
        self.sentinel_credentials = credentials;
        self
    }

    /// Connects to the data nodes over TLS. Defaults to plain TCP.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Connects to the sentinels over TLS, which may differ from the data
    /// nodes' settings. Defaults to plain TCP.
    pub fn sentinel_tls(mut self, tls: Tls) -> Self {
        self.sentinel_tls = Some(tls);
        self
    }

    /// How a candidate proves it is the master. Defaults to
    /// [`MasterCheck::Role`]. Sentinel mode always confirms with `ROLE` too.
    pub fn master_check(mut self, check: MasterCheck) -> Self {
        self.master_check = check;
        self
    }

    /// In candidates mode, an address tried only when no candidate is the
    /// master, such as a Kubernetes Service in front of every pod; each
    /// connection through it is checked like a candidate. Defaults to none;
    /// an error in Sentinel mode.
    pub fn last_resort(mut self, addr: NodeAddr) -> Self {
        self.last_resort = Some(addr);
        self
    }

    /// In Sentinel mode, how many sentinels must name the same master
    /// before the client switches to it. Defaults to a majority of the
    /// configured sentinels; an error in candidates mode.
    pub fn min_agreement(mut self, sentinels: usize) -> Self {
        self.min_agreement = Some(sentinels);
        self
    }

    /// How node names become addresses, on every connect. Defaults to
    /// [`DnsResolver`].
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Arc::new(resolver);
        self
    }

    /// How long opening a connection may take. Defaults to 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one request may wait for its reply before the master is
    /// suspected hung and checked. Defaults to 500 ms; raise it for slow
    /// commands.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How long a request keeps trying (finding the master, resending),
    /// counted from its first failure, before its error reaches the caller.
    /// Defaults to 30 s; it must cover your failover: Sentinel's
    /// `down-after-milliseconds` plus its election, a few seconds.
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    /// The backoff between attempts. Defaults to 10 ms, up to 500 ms. A new master found meanwhile ends the
    /// wait at once.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How often the master's role is checked (and, with Sentinel, the
    /// sentinels asked) even when no request failed. Defaults to 1 s.
    pub fn recheck_interval(mut self, interval: Duration) -> Self {
        self.recheck_interval = interval;
        self
    }

    /// How many events a slow subscriber may lag behind before it misses
    /// some. Defaults to 1024.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity;
        self
    }

    /// Where reads ([`FailoverClient::read`], [`FailoverClient::get`],
    /// [`FailoverClient::read_connection`]) go unless a call says otherwise
    /// ([`FailoverClient::with_read_policy`]). Defaults to
    /// [`ReadPolicy::Master`].
    pub fn read_policy(mut self, policy: ReadPolicy) -> Self {
        self.read_policy = policy;
        self
    }

    /// Replicas for which `prefer` returns true are used first (say, those
    /// in the client's zone); the others only when none of those qualifies.
    /// Defaults to no preference.
    pub fn prefer_replicas(
        mut self,
        prefer: impl Fn(&NodeAddr) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.replica_preference = Some(ReplicaPreference(Arc::new(prefer)));
        self
    }

    /// How stale a replica may be and still serve reads. A replica's
    /// staleness is the time since the master's replication offset was last
    /// at or below the replica's, both sampled every
    /// [`replica_probe_interval`](Self::replica_probe_interval), so it is
    /// overestimated by up to one interval, never underestimated. Defaults
    /// to 5 s; must be at least two probe intervals.
    pub fn max_staleness(mut self, bound: Duration) -> Self {
        self.max_staleness = bound;
        self
    }

    /// How often the master and every replica are probed (`INFO
    /// replication`, one command each) for replication offsets, link
    /// status and latency. Defaults to 500 ms.
    pub fn replica_probe_interval(mut self, interval: Duration) -> Self {
        self.replica_probe_interval = interval;
        self
    }

    /// How many replicas must acknowledge a write before it counts as done,
    /// unless a call says otherwise ([`FailoverClient::with_durability`]).
    /// Defaults to [`Durability::Master`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How many connections of their own to the master may be in use at
    /// once, so that the shared connection never blocks: each blocking
    /// command (`BLPOP`, `XREAD BLOCK`, ...) and transaction holds one until
    /// it is answered (durable writes share a connection of their own). A request that finds
    /// them all busy waits (up to the connect and command timeouts, then
    /// within the retry budget). Defaults to 16.
    pub fn dedicated_connections(mut self, connections: u32) -> Self {
        self.dedicated_connections = connections;
        self
    }

    /// Lets durable writes ([`Durability::Replicated`]) wait for fewer
    /// replicas than they ask for once the master has had fewer online
    /// for `after`: then they wait for those online, never fewer than
    /// `floor`. Set `after` longer than a failover takes: a replica that
    /// drops out because it is being promoted is still waited for (the
    /// client follows the promotion within that time), so a write the
    /// failover would lose is never acknowledged, while a replica gone for
    /// good (a lost node) stops holding every write. For a master installed
    /// after the previous one failed, the time counts from that failure.
    /// With Sentinel, fewer replicas are waited for only while a majority
    /// of sentinels name the master (asked once a second), so a master cut
    /// off from them on the minority side of a partition holds its writes.
    /// [`FailoverClient::replication_status`] tells where writes stand.
    /// Defaults to off: writes wait for every replica asked, however long
    /// one is missing.
    pub fn lost_replica_grace(mut self, after: Duration, floor: u32) -> Self {
        self.lost_replica_grace = Some(LostReplicaGrace { after, floor });
        self
    }

    /// Holds writes back while the master reports fewer than `count`
    /// replicas online whose last acknowledgement is at most `max_lag` old
    /// (`INFO replication`, whole seconds, like the server's
    /// `min-replicas-max-lag`): they wait, within the retry budget, and
    /// fail with [`Error::RetryBudgetExhausted`] naming the shortfall. A
    /// master cut off from its replicas then takes no writes from this
    /// client. Defaults to off.
    pub fn min_replicas(mut self, count: usize, max_lag: Duration) -> Self {
        self.min_replicas = Some(MinReplicas { count, max_lag });
        self
    }

    /// In Sentinel mode, after every switch, turns the master left behind
    /// into a replica of the new one (`REPLICAOF`) as soon as it answers
    /// and still claims to be master, and only while the new master is
    /// installed and named by as many sentinels as a switch needs
    /// ([`min_agreement`](Self::min_agreement)). Sentinel does the same itself, but
    /// only after the old master has answered for 8 s; until then writes
    /// that wait for every replica
    /// ([`Durability::Replicated`] with all of them) cannot be
    /// acknowledged, and the old master takes writes from clients that
    /// have not switched yet. The data user needs the `REPLICAOF`
    /// permission (`+replicaof`). Each demotion is reported as
    /// [`Event::StaleMasterDemoted`](crate::Event::StaleMasterDemoted).
    /// Defaults to off; an error in candidates mode.
    pub fn demote_stale_masters(mut self, demote: bool) -> Self {
        self.demote_stale_masters = demote;
        self
    }

    /// The budget and backoff of every retry loop.
    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            budget: self.retry_budget,
            backoff: self.backoff,
        }
    }

    pub(crate) fn required_agreement(&self) -> usize {
        match &self.mode {
            Mode::Sentinel { sentinels, .. } => {
                self.min_agreement.unwrap_or(sentinels.len() / 2 + 1)
            }
            Mode::Candidates { .. } => 0,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        self.validate_mode()?;
        for (setting, value) in [
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
            ("retry_budget", self.retry_budget),
            ("recheck_interval", self.recheck_interval),
        ] {
            if value.is_zero() {
                return invalid(setting, "must be more than zero");
            }
        }
        if self.event_capacity == 0 {
            return invalid("event_capacity", "must be more than zero");
        }
        if self.replica_probe_interval.is_zero() {
            return invalid("replica_probe_interval", "must be more than zero");
        }
        if self.max_staleness < self.replica_probe_interval * 2 {
            return invalid(
                "max_staleness",
                "must be at least two replica probe intervals",
            );
        }
        self.durability.validate()?;
        if self.dedicated_connections == 0 {
            return invalid("dedicated_connections", "must be more than zero");
        }
        if let Some(grace) = self.lost_replica_grace
            && (grace.floor == 0 || grace.after.is_zero())
        {
            return invalid(
                "lost_replica_grace",
                "needs a floor of at least one replica and a time above zero",
            );
        }
        if let Some(min) = self.min_replicas
            && (min.count == 0 || min.max_lag < Duration::from_secs(1))
        {
            return invalid(
                "min_replicas",
                "needs at least one replica and a lag of at least 1 s",
            );
        }
        Ok(())
    }

    /// The settings that belong to one way of finding the master.
    fn validate_mode(&self) -> Result<()> {
        match &self.mode {
            Mode::Candidates { nodes } => {
                if nodes.is_empty() {
                    return invalid("candidates", "at least one node is needed");
                }
                if self.min_agreement.is_some() {
                    return invalid("min_agreement", "only applies with Sentinel");
                }
                if self.demote_stale_masters {
                    return invalid(
                        "demote_stale_masters",
                        "only applies with Sentinel, which decides what is stale",
                    );
                }
            }
            Mode::Sentinel {
                sentinels,
                master_name,
                ..
            } => {
                if sentinels.is_empty() {
                    return invalid("sentinels", "at least one sentinel is needed");
                }
                if master_name.is_empty() {
                    return invalid("master_name", "must not be empty");
                }
                let required = self.required_agreement();
                if required == 0 || required > sentinels.len() {
                    return invalid(
                        "min_agreement",
                        "must be between 1 and the number of sentinels",
                    );
                }
                if self.last_resort.is_some() {
                    return invalid("last_resort", "only applies to candidates");
                }
            }
        }
        Ok(())
    }
}

/// A setting that cannot work, and why.
fn invalid(setting: &'static str, reason: &str) -> Result<()> {
    Err(Error::InvalidConfig {
        setting,
        reason: reason.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FailoverClient;

    fn sentinels(n: u16) -> Vec<NodeAddr> {
        (0..n)
            .map(|i| NodeAddr::new("sentinel", 26379 + i).unwrap())
            .collect()
    }

    fn rejected(builder: FailoverClientBuilder) -> &'static str {
        match builder.validate() {
            Err(Error::InvalidConfig { setting, .. }) => setting,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn agreement_defaults_to_a_majority_of_the_sentinels() {
        let builder = FailoverClient::sentinel("mymaster", sentinels(3));
        assert_eq!(builder.required_agreement(), 2);
        assert_eq!(
            FailoverClient::sentinel("m", sentinels(5)).required_agreement(),
            3
        );
        assert_eq!(
            FailoverClient::sentinel("m", sentinels(1)).required_agreement(),
            1
        );
        builder.validate().unwrap();
    }

    #[test]
    fn unworkable_settings_are_named() {
        assert_eq!(rejected(FailoverClient::candidates([])), "candidates");
        assert_eq!(rejected(FailoverClient::sentinel("m", [])), "sentinels");
        assert_eq!(
            rejected(FailoverClient::sentinel("", sentinels(3))),
            "master_name"
        );
        assert_eq!(
            rejected(FailoverClient::sentinel("m", sentinels(3)).min_agreement(4)),
            "min_agreement"
        );
        let addr = NodeAddr::new("redis", 6379).unwrap();
        assert_eq!(
            rejected(FailoverClient::sentinel("m", sentinels(3)).last_resort(addr)),
            "last_resort"
        );
        assert_eq!(
            rejected(FailoverClient::candidates(sentinels(1)).min_agreement(1)),
            "min_agreement"
        );
        assert_eq!(
            rejected(FailoverClient::candidates(sentinels(1)).demote_stale_masters(true)),
            "demote_stale_masters"
        );
        let one = FailoverClient::candidates(sentinels(1));
        assert_eq!(
            rejected(one.clone().retry_budget(Duration::ZERO)),
            "retry_budget"
        );
    }

    #[test]
    fn building_outside_a_runtime_is_an_error_not_a_panic() {
        let result = FailoverClient::candidates(sentinels(1)).build();
        assert!(matches!(
            result,
            Err(Error::InvalidConfig {
                setting: "runtime",
                ..
            })
        ));
    }
}
