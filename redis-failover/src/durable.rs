//! How many replicas a durable write waits for on one master.
//!
//! All that [`Durability::Replicated`](crate::Durability::Replicated)
//! asks for, as long as the master has them online. With
//! [`lost_replica_grace`](crate::FailoverClientBuilder::lost_replica_grace),
//! a shortfall that lasts (a replica gone for good, its pod not coming
//! back) stops holding writes: once the master has been short for the
//! grace period, writes wait for the replicas online, never fewer than the
//! floor. A shortfall that ends within the grace (a replica being promoted,
//! which the client follows in about a second; a replica restarting) never
//! lowers the count, so a write a failover could lose is not acknowledged.
//! For a master installed after the previous one failed, the shortfall is
//! counted from that failure: the replica missing is most likely that
//! master. With Sentinel, writes wait for fewer replicas only while a
//! majority of sentinels confirm (within the last second) that this master
//! is still the master: cut off from them, it may have been replaced by a
//! replica it no longer sees, and a write its remaining replicas
//! acknowledge would be lost when the partition heals.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::{FromRedisValue, RedisError};

use crate::addr::NodeAddr;
use crate::error::Error;

/// When a shortfall of replicas stops holding writes
/// ([`FailoverClientBuilder::lost_replica_grace`](crate::FailoverClientBuilder::lost_replica_grace)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LostReplicaGrace {
    /// How long the master must have been short.
    pub(crate) after: Duration,
    /// The fewest replicas a write waits for all the same.
    pub(crate) floor: u32,
}

/// How often the replicas online are counted again while writes wait for
/// fewer than asked, to wait for all of them again once they are back.
const RECOUNT: Duration = Duration::from_secs(1);

/// One master's replicas as durable writes last saw them.
#[derive(Debug, Default)]
pub(crate) struct Replicas {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Replicas online at the last count, and when it was made.
    online: Option<(u32, Instant)>,
    /// Since when the master has had fewer replicas online than asked.
    short_since: Option<Instant>,
    /// When a majority of sentinels last named this master.
    confirmed: Option<Instant>,
}

/// What a durable write should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Run, then `WAIT` for this many replicas.
    Wait(u32),
    /// Do not run: this many are online, the write waits for that many.
    Hold { online: u32, waits_for: u32 },
}

/// The replication of a master as durable writes see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicationStatus {
    /// Replicas the durability asks for.
    pub asked: u32,
    /// Replicas online at the last count (`None`: not counted yet).
    pub online: Option<u32>,
    /// Replicas writes wait for now: fewer than asked once the master has
    /// been short of replicas for the grace period.
    pub waits_for: u32,
}

impl ReplicationStatus {
    /// Whether durable writes can be acknowledged now (as far as the last
    /// count tells).
    pub fn writable(&self) -> bool {
        self.online.is_none_or(|online| online >= self.waits_for)
    }

    /// Whether writes wait for fewer replicas than asked.
    pub fn degraded(&self) -> bool {
        self.waits_for < self.asked
    }
}

impl Replicas {
    /// For a master installed after the previous one failed at `since`.
    pub(crate) fn short_since(since: Option<Instant>) -> Self {
        Self {
            state: Mutex::new(State {
                online: None,
                short_since: since,
                confirmed: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a write asking for `asked` replicas should do now, from the
    /// last count; `None` when the replicas must be counted first (never
    /// counted, a `WAIT` fell short since, or short and counted over a
    /// second ago).
    pub(crate) fn cached(
        &self,
        asked: u32,
        grace: Option<LostReplicaGrace>,
        now: Instant,
    ) -> Option<Outcome> {
        let state = self.state();
        let (online, counted) = state.online?;
        if online < asked && now.duration_since(counted) >= RECOUNT {
            return None;
        }
        Some(outcome(&state, asked, grace, now))
    }

    /// Records a count of the replicas online, and what a write asking for
    /// `asked` should do.
    pub(crate) fn counted(
        &self,
        online: u32,
        asked: u32,
        grace: Option<LostReplicaGrace>,
        now: Instant,
    ) -> Outcome {
        let mut state = self.state();
        state.online = Some((online, now));
        if online >= asked {
            state.short_since = None;
        } else {
            state.short_since.get_or_insert(now);
        }
        outcome(&state, asked, grace, now)
    }

    /// Whether a majority of sentinels named this master within the last
    /// second (writes may then wait for fewer replicas than asked).
    pub(crate) fn confirmed(&self, now: Instant) -> bool {
        self.state()
            .confirmed
            .is_some_and(|at| now.duration_since(at) < RECOUNT)
    }

    /// A majority of sentinels named this master at `now`.
    pub(crate) fn confirm(&self, now: Instant) {
        self.state().confirmed = Some(now);
    }

    /// A `WAIT` fell short, or failed: count again before the next write.
    pub(crate) fn forget_count(&self) {
        self.state().online = None;
    }

    pub(crate) fn status(
        &self,
        asked: u32,
        grace: Option<LostReplicaGrace>,
        now: Instant,
    ) -> ReplicationStatus {
        let state = self.state();
        ReplicationStatus {
            asked,
            online: state.online.map(|(online, _)| online),
            waits_for: waits_for(&state, asked, grace, now),
        }
    }
}

fn outcome(state: &State, asked: u32, grace: Option<LostReplicaGrace>, now: Instant) -> Outcome {
    let online = state.online.map_or(0, |(online, _)| online);
    let waits_for = waits_for(state, asked, grace, now);
    if online >= waits_for {
        Outcome::Wait(waits_for)
    } else {
        Outcome::Hold { online, waits_for }
    }
}

/// All that is asked, unless the master has been short for the grace
/// period: then those online, at least the floor.
fn waits_for(state: &State, asked: u32, grace: Option<LostReplicaGrace>, now: Instant) -> u32 {
    let (Some(grace), Some(since), Some((online, _))) = (grace, state.short_since, state.online)
    else {
        return asked;
    };
    if now.duration_since(since) < grace.after {
        return asked;
    }
    online.max(grace.floor).min(asked)
}

/// What a durable write waits for once it ran: `WAIT` (replicas
/// received it) or `WAITAOF` (fsynced to the append-only file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ack {
    /// `Some(local)`: `WAITAOF`, the master's own fsync asked for too when
    /// `local`; `None`: `WAIT`.
    pub(crate) aof: Option<bool>,
    /// How many replicas must have it.
    pub(crate) replicas: u32,
    /// How long to wait for them.
    pub(crate) timeout: Duration,
}

/// What a `WAIT` or `WAITAOF` counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Acked {
    /// Whether the master fsynced the writes (`WAITAOF` only).
    pub(crate) local: bool,
    /// How many replicas have them.
    pub(crate) replicas: u32,
}

impl Ack {
    /// `WAIT replicas ms`, or `WAITAOF local replicas ms` (at least 1 ms:
    /// 0 would wait forever).
    pub(crate) fn command(self) -> redis::Cmd {
        let timeout_ms = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        match self.aof {
            None => redis::cmd("WAIT")
                .arg(self.replicas)
                .arg(timeout_ms)
                .to_owned(),
            Some(local) => redis::cmd("WAITAOF")
                .arg(u32::from(local))
                .arg(self.replicas)
                .arg(timeout_ms)
                .to_owned(),
        }
    }

    /// One wait that answers for `self` and `other` (of the same command):
    /// the most of each. Its counts tell each write whether it got its own.
    pub(crate) fn merge(self, other: Self) -> Self {
        debug_assert_eq!(self.aof.is_some(), other.aof.is_some());
        Self {
            aof: self.aof.zip(other.aof).map(|(a, b)| a || b),
            replicas: self.replicas.max(other.replicas),
            timeout: self.timeout.max(other.timeout),
        }
    }

    /// Reads the command's reply: a count of replicas (`WAIT`), or the
    /// local fsync and the replicas' (`WAITAOF`).
    pub(crate) fn acked(self, reply: redis::Value) -> Result<Acked, RedisError> {
        let reply = reply.extract_error()?;
        if self.aof.is_none() {
            let replicas = u32::from_redis_value(reply)?;
            return Ok(Acked {
                local: false,
                replicas,
            });
        }
        let (local, replicas) = <(u32, u32)>::from_redis_value(reply)?;
        Ok(Acked {
            local: local >= 1,
            replicas,
        })
    }

    /// Whether `acked` is all that was asked.
    pub(crate) fn met_by(self, acked: Acked) -> bool {
        acked.replicas >= self.replicas && (acked.local || self.aof != Some(true))
    }

    /// What the wait's answer means for a write that asked for `self` on
    /// the master `node`: done, short (`NotReplicated`, `NotPersisted`),
    /// or unknown (the wait failed; the write ran all the same).
    pub(crate) fn outcome(
        self,
        node: &NodeAddr,
        acked: &Result<Acked, RedisError>,
    ) -> crate::error::Result<()> {
        match acked {
            Ok(acked) if self.met_by(*acked) => Ok(()),
            Ok(acked) => Err(match self.aof {
                None => Error::NotReplicated {
                    node: node.clone(),
                    acked: acked.replicas,
                    required: self.replicas,
                    timeout: self.timeout,
                },
                Some(local) => Error::NotPersisted {
                    node: node.clone(),
                    local: acked.local,
                    local_required: local,
                    acked: acked.replicas,
                    required: self.replicas,
                    timeout: self.timeout,
                },
            }),
            Err(source) => Err(Error::ReplicationUnknown {
                node: node.clone(),
                source: source.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: LostReplicaGrace = LostReplicaGrace {
        after: Duration::from_secs(8),
        floor: 1,
    };

    #[test]
    fn waitaof_answers_for_the_local_fsync_and_the_replicas() {
        let node: NodeAddr = "r:6379".parse().unwrap();
        let ack = |aof, replicas| Ack {
            aof,
            replicas,
            timeout: Duration::from_millis(100),
        };
        let persisted = ack(Some(true), 1);
        let packed =
            String::from_utf8_lossy(&persisted.command().get_packed_command()).into_owned();
        assert!(
            packed.contains("WAITAOF") && packed.ends_with("$3\r\n100\r\n"),
            "{packed:?}"
        );
        let reply = |local: i64, replicas: i64| {
            redis::Value::Array(vec![redis::Value::Int(local), redis::Value::Int(replicas)])
        };
        let acked = persisted.acked(reply(1, 1));
        assert!(persisted.outcome(&node, &acked).is_ok());
        let not_local = persisted.outcome(&node, &persisted.acked(reply(0, 1)));
        assert!(matches!(
            not_local,
            Err(Error::NotPersisted {
                local: false,
                local_required: true,
                acked: 1,
                ..
            })
        ));
        // The master's fsync not asked for: only the replicas count.
        assert!(
            ack(Some(false), 1)
                .outcome(&node, &ack(Some(false), 1).acked(reply(0, 1)))
                .is_ok()
        );
        let merged = ack(Some(false), 2).merge(ack(Some(true), 1));
        assert_eq!(merged, ack(Some(true), 2));
        let replicated = ack(None, 2);
        let short = replicated.outcome(&node, &replicated.acked(redis::Value::Int(1)));
        assert!(matches!(
            short,
            Err(Error::NotReplicated {
                acked: 1,
                required: 2,
                ..
            })
        ));
    }

    #[test]
    fn a_full_master_is_waited_on_for_every_replica() {
        let (replicas, t0) = (Replicas::default(), Instant::now());
        assert_eq!(replicas.cached(2, Some(GRACE), t0), None);
        assert_eq!(replicas.counted(2, 2, Some(GRACE), t0), Outcome::Wait(2));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            replicas.cached(2, Some(GRACE), later),
            Some(Outcome::Wait(2))
        );
        replicas.forget_count();
        assert_eq!(replicas.cached(2, Some(GRACE), later), None);
    }

    #[test]
    fn a_short_master_holds_writes_for_the_grace_then_waits_for_those_online() {
        let (replicas, t0) = (Replicas::default(), Instant::now());
        let hold = Outcome::Hold {
            online: 1,
            waits_for: 2,
        };
        assert_eq!(replicas.counted(1, 2, Some(GRACE), t0), hold);
        assert_eq!(replicas.cached(2, Some(GRACE), t0), Some(hold));
        // Counted again every second while short; the shortfall keeps its start.
        let later = t0 + Duration::from_millis(7_900);
        assert_eq!(replicas.cached(2, Some(GRACE), later), None);
        assert_eq!(replicas.counted(1, 2, Some(GRACE), later), hold);
        let past = t0 + GRACE.after;
        assert_eq!(replicas.counted(1, 2, Some(GRACE), past), Outcome::Wait(1));
        assert!(replicas.status(2, Some(GRACE), past).degraded());
        // Without a grace, the shortfall holds writes however long it lasts.
        assert_eq!(replicas.cached(2, None, past), Some(hold));
        // The replica back: every replica is waited for again.
        assert_eq!(replicas.counted(2, 2, Some(GRACE), past), Outcome::Wait(2));
        let again = past + Duration::from_secs(1);
        assert_eq!(
            replicas.counted(1, 2, Some(GRACE), again),
            hold,
            "a new shortfall starts a new grace"
        );
    }

    #[test]
    fn never_fewer_than_the_floor() {
        let (replicas, t0) = (Replicas::default(), Instant::now());
        let past = t0 + GRACE.after;
        replicas.counted(0, 2, Some(GRACE), t0);
        assert_eq!(
            replicas.counted(0, 2, Some(GRACE), past),
            Outcome::Hold {
                online: 0,
                waits_for: 1
            }
        );
        let status = replicas.status(2, Some(GRACE), past);
        assert!(!status.writable() && status.degraded());
    }

    #[test]
    fn a_confirmation_lasts_a_second() {
        let (replicas, t0) = (Replicas::default(), Instant::now());
        assert!(!replicas.confirmed(t0));
        replicas.confirm(t0);
        assert!(replicas.confirmed(t0 + Duration::from_millis(999)));
        assert!(!replicas.confirmed(t0 + RECOUNT));
    }

    #[test]
    fn a_master_installed_after_a_failure_counts_the_shortfall_from_it() {
        let t0 = Instant::now();
        let replicas = Replicas::short_since(Some(t0));
        let promoted = t0 + Duration::from_secs(6);
        assert_eq!(
            replicas.counted(1, 2, Some(GRACE), promoted),
            Outcome::Hold {
                online: 1,
                waits_for: 2
            }
        );
        assert_eq!(
            replicas.counted(1, 2, Some(GRACE), t0 + GRACE.after),
            Outcome::Wait(1)
        );
        // A full count ends it, as for any master.
        let full = Replicas::short_since(Some(t0));
        assert_eq!(full.counted(2, 2, Some(GRACE), promoted), Outcome::Wait(2));
    }
}
