//! Where requests go: reads by policy, writes by how many replicas must
//! have them.

use std::sync::Arc;
use std::time::Duration;

use crate::addr::NodeAddr;
use crate::error::{Error, Result};

/// Where a read goes.
///
/// A replica qualifies when it replicates the current master, its link to
/// the master is up, it answers, and it is within
/// [`max_staleness`](crate::FailoverClientBuilder::max_staleness). Replicas
/// chosen by [`prefer_replicas`](crate::FailoverClientBuilder::prefer_replicas)
/// are tried before the others. A read that fails on a replica (connection
/// lost, `LOADING`, ...) is tried on the next one.
///
/// In cluster mode the same rules apply to the master of the key's slot
/// and its replicas, each replica's staleness measured against its own
/// master; keyless reads go to a master.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReadPolicy {
    /// Only the master, with the full failover handling of writes. This is
    /// the default.
    #[default]
    Master,
    /// The master; a replica when no master is known or the master fails
    /// this read.
    MasterPreferred,
    /// A random qualifying replica; [`Error::NoReplicaAvailable`] when none
    /// qualifies.
    Replica,
    /// A random qualifying replica; the master when none qualifies.
    ReplicaPreferred,
    /// The node (master or qualifying replica) with the lowest round-trip
    /// time, as measured by the replica probes (a moving average, updated
    /// every probe interval).
    Nearest,
    /// The qualifying replicas in turn; [`Error::NoReplicaAvailable`] when
    /// none qualifies.
    RoundRobin,
}

impl ReadPolicy {
    pub(crate) fn may_use_master(self) -> bool {
        !matches!(self, Self::Replica | Self::RoundRobin)
    }
}

/// How many nodes must have a write before it counts as done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Durability {
    /// The master's reply is enough. A failover may lose the write if no
    /// replica had it yet. This is the default.
    #[default]
    Master,
    /// The write goes over the master's connection of durable writes, in a
    /// batch of writes followed by one `WAIT replicas timeout` in the same
    /// pipeline, and is acknowledged once that `WAIT` counted enough
    /// replicas (group commit). A write may wait for the batch ahead of
    /// it, then for its own: up to about twice `timeout` when replicas are
    /// short.
    /// Fewer acknowledgements than asked give [`Error::NotReplicated`]:
    /// the write ran on the master and is not undone, but may not survive
    /// a failover. On a master that is new, or whose last `WAIT` fell
    /// short, the replicas online are counted first (`INFO replication`):
    /// while fewer than `replicas`, the write waits without running, within
    /// the retry budget. Transactions with `WATCH` and blocking commands
    /// wait on their own connection (see
    /// [`dedicated_connections`](crate::FailoverClientBuilder::dedicated_connections)).
    /// In cluster mode each master of the slot map has its connection of
    /// durable writes, and a write waits on the master that ran it;
    /// replicas are not counted first there: the write runs, and a
    /// shortfall is [`Error::NotReplicated`].
    Replicated {
        /// How many replicas must acknowledge the write (at least 1).
        replicas: u32,
        /// How long to wait for them (more than zero).
        timeout: Duration,
    },
    /// As [`Replicated`](Self::Replicated), with `WAITAOF local replicas
    /// timeout` instead of `WAIT`: acknowledged once fsynced to the
    /// append-only file, on the master itself when `local`, and on
    /// `replicas` replicas. `WAIT` only says replicas received the write,
    /// which a crash of them all (a power cut of the whole deployment)
    /// loses. Concurrent persisted writes share one `WAITAOF`. Fewer
    /// acknowledgements than asked give [`Error::NotPersisted`] (of kind
    /// [`NotReplicated`](crate::ErrorKind::NotReplicated)): the write ran
    /// and is not undone. Needs `WAITAOF` (Redis 7.2 or Valkey), and with
    /// `local`, `appendonly yes` on the master; replicas without it never
    /// acknowledge. A master lacking either gives [`Error::Unsupported`]
    /// before the write is sent (checked once per master), not retried.
    Persisted {
        /// Whether the master must have fsynced the write too.
        local: bool,
        /// How many replicas must have fsynced it.
        replicas: u32,
        /// How long to wait for them (more than zero).
        timeout: Duration,
    },
}

impl Durability {
    pub(crate) fn validate(self) -> Result<()> {
        match self {
            Self::Replicated { replicas, timeout } if replicas == 0 || timeout.is_zero() => {
                Err(Error::InvalidConfig {
                    setting: "durability",
                    reason: "Replicated needs at least one replica and a timeout above zero"
                        .to_owned(),
                })
            }
            Self::Persisted {
                local,
                replicas,
                timeout,
            } if (!local && replicas == 0) || timeout.is_zero() => Err(Error::InvalidConfig {
                setting: "durability",
                reason: "Persisted needs the local fsync or a replica, and a timeout above zero"
                    .to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// How many replicas a durable write asks for (0 when not durable).
    pub(crate) fn replicas(self) -> u32 {
        match self {
            Self::Master => 0,
            Self::Replicated { replicas, .. } | Self::Persisted { replicas, .. } => replicas,
        }
    }
}

/// The user's choice of replicas to try first.
#[derive(Clone)]
pub(crate) struct ReplicaPreference(pub(crate) Arc<dyn Fn(&NodeAddr) -> bool + Send + Sync>);

impl std::fmt::Debug for ReplicaPreference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaPreference(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicated_durability_needs_a_replica_and_a_timeout() {
        assert!(Durability::Master.validate().is_ok());
        let replicated = |replicas, ms| Durability::Replicated {
            replicas,
            timeout: Duration::from_millis(ms),
        };
        assert!(replicated(1, 100).validate().is_ok());
        assert!(replicated(0, 100).validate().is_err());
        assert!(replicated(1, 0).validate().is_err());
        let persisted = |local, replicas, ms| Durability::Persisted {
            local,
            replicas,
            timeout: Duration::from_millis(ms),
        };
        assert!(persisted(true, 0, 100).validate().is_ok());
        assert!(persisted(false, 1, 100).validate().is_ok());
        assert!(persisted(false, 0, 100).validate().is_err());
        assert!(persisted(true, 1, 0).validate().is_err());
    }
}
