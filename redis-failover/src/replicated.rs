//! Writes held back while the master has too few replicas for them
//! (`min_replicas`, [`Durability::Replicated`](crate::Durability)): run
//! now, they would only be refused or fail their `WAIT`.

use std::time::{Duration, Instant};

use redis::RedisError;

use crate::builder::Mode;
use crate::durable::Outcome;
use crate::events::Counter;
use crate::request::Sent;
use crate::retry::Failure;
use crate::shared::Shared;
use crate::state::Master;

impl Shared {
    /// With `min_replicas`, holds a write back while the master has too
    /// few healthy replicas; `None` lets it go.
    pub(crate) async fn hold_back(&self, master: &Master, write: bool) -> Option<Sent> {
        let min = self.settings.min_replicas.filter(|_| write)?;
        match self.healthy_replicas(master, min.max_lag).await {
            Ok(healthy) if healthy >= min.count => None,
            Ok(healthy) => {
                self.telemetry.add(Counter::MinReplicasRefusals);
                Some(Sent::Held(format!(
                    "{healthy} healthy replicas, min_replicas asks for {}",
                    min.count
                )))
            }
            Err(error) => Some(self.info_failed(master, &error)),
        }
    }

    /// How many replicas a durable write asking for `asked` waits for on
    /// `master` (see [`crate::durable`]), or why it is held back: run now,
    /// it would only fail its `WAIT` (say, right after a failover, until
    /// the old master rejoins as a replica). Replicas are counted (`INFO
    /// replication`) when not counted since the master was installed or a
    /// `WAIT` fell short, and every second while short.
    pub(crate) async fn await_replicas(&self, master: &Master, asked: u32) -> Result<u32, Sent> {
        let grace = self.settings.lost_replica_grace;
        let outcome = match master.replicas.cached(asked, grace, Instant::now()) {
            Some(outcome) => outcome,
            None => {
                let info = match self.replication_info(master).await {
                    Ok(info) => info,
                    Err(error) => return Err(self.info_failed(master, &error)),
                };
                if !info.is_master {
                    // Demoted: look for the new master, as a READONLY reply would.
                    return Err(Sent::Failed(redis::make_extension_error(
                        "READONLY".to_owned(),
                        Some("INFO replication says replica".to_owned()),
                    )));
                }
                let online =
                    u32::try_from(info.healthy_replicas(Duration::MAX)).unwrap_or(u32::MAX);
                master
                    .replicas
                    .counted(online, asked, grace, Instant::now())
            }
        };
        match outcome {
            Outcome::Wait(waits_for) if waits_for < asked && !self.still_named(master).await => {
                self.telemetry.add(Counter::DurableWritesHeld);
                Err(Sent::Held(format!(
                    "{waits_for} of {asked} replicas online, and the sentinels do not confirm {} as master",
                    master.node
                )))
            }
            Outcome::Wait(waits_for) => Ok(waits_for),
            Outcome::Hold { online, waits_for } => {
                self.telemetry.add(Counter::DurableWritesHeld);
                Err(Sent::Held(format!(
                    "{online} replicas online, the write waits for {waits_for}"
                )))
            }
        }
    }

    /// Whether a majority of sentinels name `master` (asked at most once a
    /// second); always, without Sentinel, which has no one to ask.
    async fn still_named(&self, master: &Master) -> bool {
        if !matches!(self.settings.mode, Mode::Sentinel { .. }) {
            return true;
        }
        let now = Instant::now();
        if master.replicas.confirmed(now) {
            return true;
        }
        let named = self
            .ask_sentinels_current()
            .await
            .is_ok_and(|named| named.node == master.node);
        if named {
            master.replicas.confirm(now);
        }
        named
    }

    /// The master did not answer `INFO`: its connection is suspect.
    fn info_failed(&self, master: &Master, error: &RedisError) -> Sent {
        if Failure::of(error) == Failure::OutcomeUnknown {
            master.connection_failed();
        }
        Sent::Unreachable(format!("could not read INFO replication: {error}"))
    }
}
