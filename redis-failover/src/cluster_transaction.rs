//! Optimistic transactions (`WATCH` … `EXEC`) in cluster mode: on a
//! dedicated connection to the master of the watched keys' slot, tried
//! again on the slot's new master after a `MOVED`, as the one-master mode
//! tries again on a new master after a failover.

use std::future::Future;
use std::sync::Arc;

use redis::{Cmd, FromRedisValue, Pipeline, ToRedisArgs};

use crate::addr::NodeAddr;
use crate::cluster_exec::{Judging, Retrying};
use crate::cluster_state::ClusterShared;
use crate::dedicated::{checkout, wait_on};
use crate::durable::Ack;
use crate::error::{Error, Result};
use crate::events::Counter;
use crate::policy::{GaveUp, Tried};
use crate::request::Sent;
use crate::slots::slot_of;
use crate::transaction::{Try, Watched, converted, watch_and_exec};

/// The one slot of the keys a transaction watches, or why it cannot run
/// in a cluster (checked before anything is sent).
pub(crate) fn watched_slot<K: ToRedisArgs>(keys: &[K]) -> Result<u16> {
    let mut slots: Vec<u16> = keys
        .iter()
        .flat_map(ToRedisArgs::to_redis_args)
        .map(|key| slot_of(&key))
        .collect();
    slots.sort_unstable();
    slots.dedup();
    match slots.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(Error::NotInCluster {
            what: "a transaction that watches no key (its slot is unknown until it runs)",
        }),
        _ => Err(Error::CrossSlot {
            command: "WATCH".to_owned(),
            slots,
        }),
    }
}

/// What a cluster transaction runs: the `WATCH` of keys in `slot`, and
/// what to wait for after `EXEC` (a durable client's `WAIT`).
pub(crate) struct Watching<'a> {
    pub(crate) slot: u16,
    pub(crate) watch: &'a Cmd,
    pub(crate) ack: Option<Ack>,
}

impl ClusterShared {
    /// Runs a transaction on the master of `watching.slot`, again after a
    /// conflict or a failure before `EXEC` (a `MOVED` reply, a master
    /// gone), within the retry budget. `None` when the body aborted it.
    pub(crate) async fn transaction<F, B, T>(
        self: &Arc<Self>,
        watching: Watching<'_>,
        body: &mut F,
        idempotent: bool,
    ) -> Result<Option<T>>
    where
        F: FnMut(Watched) -> B,
        B: Future<Output = Result<Option<Pipeline>>>,
        T: FromRedisValue,
    {
        let mut retrying = Retrying::default();
        // An ASK redirect is not followed: each command of the try would
        // need ASKING. The try is made again once the migration is over.
        let mut ask = None;
        loop {
            let generation = self.generation();
            let Some(node) = self.route(Some(watching.slot)) else {
                self.refresh(generation).await;
                if self.wait(&mut retrying, Tried::NotSent).await.is_err() {
                    return Err(self.exhausted(retrying));
                }
                continue;
            };
            let failed = match self.transaction_once(&node, &watching, body).await {
                Try::Committed(replies) => return converted(&node, replies).map(Some),
                Try::Aborted => return Ok(None),
                Try::Body(error) => return Err(error),
                Try::Conflict => {
                    retrying.note(&node, "a watched key changed".to_owned());
                    match self.wait(&mut retrying, Tried::Conflict).await {
                        Ok(()) => continue,
                        Err(GaveUp::Budget) => {
                            let attempts = retrying.attempts();
                            return Err(Error::TransactionConflict { attempts });
                        }
                        Err(_) => unreachable!("a conflict is retried until the budget ends"),
                    }
                }
                Try::Failed(failed) => failed,
            };
            let judging = Judging {
                resendable: idempotent,
                follow: true,
                generation,
            };
            let (tried, lost) = self
                .judge_sent(&node, failed, judging, &mut ask, &mut retrying)
                .await?;
            ask = None;
            self.retry(&mut retrying, tried, lost, &node).await?;
        }
    }

    /// One try on `node`, on a connection of its own, `WAIT`ed for there
    /// after `EXEC` when durable.
    async fn transaction_once<F, B>(
        &self,
        node: &NodeAddr,
        watching: &Watching<'_>,
        body: &mut F,
    ) -> Try
    where
        F: FnMut(Watched) -> B,
        B: Future<Output = Result<Option<Pipeline>>>,
    {
        if let Err(sent) = self.check_ack(node, watching.ack).await {
            return Try::Failed(sent);
        }
        let exclusive = self.nodes.of(node, &self.connector);
        let limit = self.nodes.dedicated_connections;
        let mut pooled = match checkout(&exclusive.dedicated, limit).await {
            Ok(pooled) => pooled,
            Err(sent) => return Try::Failed(sent),
        };
        let connection = &mut *pooled;
        let slot = Some(watching.slot);
        let tried = watch_and_exec(connection, node, Some(watching.watch), body, slot).await;
        let (Try::Committed(exec), Some(ack)) = (&tried, watching.ack) else {
            return tried;
        };
        let acked = wait_on(connection, ack, self.connector.response_timeout()).await;
        match ack.outcome(node, &acked) {
            Ok(()) => Try::Committed(exec.clone()),
            Err(error) => {
                self.telemetry.add(Counter::UnreplicatedWrites);
                Try::Failed(Sent::Unreplicated(error))
            }
        }
    }
}
