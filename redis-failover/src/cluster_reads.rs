//! Reads on a cluster's replicas. Each master's replicas (as the slot map
//! lists them) are probed as in the one-master modes, by a
//! [`ReplicaTracker`] per master, from the first read that may use them
//! until the client is dropped; a read is planned over its key's shard by
//! the same rules ([`plan`], [`try_replicas`]).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::join_all;
use redis::RedisError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::addr::NodeAddr;
use crate::backend::cluster_via;
use crate::cluster_exec::{Destination, Retrying};
use crate::cluster_state::ClusterShared;
use crate::error::{Error, Result};
use crate::events::Counter;
use crate::node::Connector;
use crate::policy::Tried;
use crate::read::{ReadRules, Unserved, no_replica, plan, try_replicas};
use crate::replica_set::ReadSet;
use crate::replicas::{Probing, ReplicaTracker};
use crate::request::{Reply, Request};
use crate::retry::{Failure, cluster_redirect};
use crate::routing::{Durability, ReadPolicy, ReplicaPreference};

/// How a cluster client reads from replicas.
#[derive(Clone, Debug)]
pub(crate) struct ReadSettings {
    pub(crate) max_staleness: Duration,
    pub(crate) probe_interval: Duration,
    pub(crate) preference: Option<ReplicaPreference>,
}

/// What a cluster client knows of its replicas.
pub(crate) struct ClusterReads {
    pub(crate) settings: ReadSettings,
    /// Opens replica connections: each sends `READONLY` first.
    connector: Connector,
    /// Whether the probes run (they start on first need).
    tracking: AtomicBool,
    /// How many rounds of probes have completed.
    rounds: watch::Sender<u64>,
    /// Each master's replicas as of the latest round.
    sets: ArcSwap<HashMap<NodeAddr, Arc<ReadSet>>>,
    /// Where `ReadPolicy::RoundRobin` goes next.
    round_robin: AtomicUsize,
}

impl ClusterReads {
    pub(crate) fn new(settings: ReadSettings, connector: &Connector) -> Self {
        Self {
            settings,
            connector: connector.read_only(),
            tracking: AtomicBool::new(false),
            rounds: watch::channel(0).0,
            sets: ArcSwap::default(),
            round_robin: AtomicUsize::new(0),
        }
    }

    /// Every master's replicas as of the latest round.
    pub(crate) fn sets(&self) -> Arc<HashMap<NodeAddr, Arc<ReadSet>>> {
        self.sets.load_full()
    }

    fn rules(&self) -> ReadRules<'_> {
        ReadRules {
            max_staleness: self.settings.max_staleness,
            preference: self.settings.preference.as_ref(),
            round_robin: &self.round_robin,
        }
    }
}

impl ClusterShared {
    /// Sends a read `request` for `slot` where `policy` says: to a replica
    /// of the slot's master within the staleness bound, or the master.
    /// Keyless and blocking reads, and reads of a session (`session`),
    /// go to the master.
    pub(crate) async fn read(
        self: &Arc<Self>,
        request: Request<'_>,
        slot: Option<u16>,
        policy: ReadPolicy,
        session: Option<u64>,
    ) -> Result<(NodeAddr, Reply)> {
        let on_master =
            policy == ReadPolicy::Master || request.blocking().is_some() || session.is_some();
        let Some(slot) = slot.filter(|_| !on_master) else {
            return self.read_from_master(request, slot).await;
        };
        self.track_replicas();
        let mut retrying = Retrying::default();
        let mut failures = Vec::new();
        loop {
            let generation = self.generation();
            let Some(master) = self.route(Some(slot)) else {
                self.refresh(generation).await;
                self.retry_read(&mut retrying, Tried::NotSent).await?;
                continue;
            };
            let set = self.probed(&master).await;
            let plan = plan(&set, policy, &self.reads.rules());
            if plan.master_first
                && let Some(served) = self.try_master_once(&master, request).await
            {
                return served;
            }
            match try_replicas(&plan, request, None, &mut failures, &self.telemetry).await {
                ControlFlow::Break(served) => return served,
                ControlFlow::Continue(Unserved {
                    redirected: Some((node, error)),
                    ..
                }) => {
                    self.replica_redirected(&node, &error, generation).await;
                    self.retry_read(&mut retrying, Tried::Redirected).await?;
                    continue;
                }
                ControlFlow::Continue(_) => {}
            }
            if plan.master_last {
                return self.read_from_master(request, Some(slot)).await;
            }
            return Err(no_replica(
                plan,
                failures,
                self.reads.settings.max_staleness,
            ));
        }
    }

    /// Waits before another try of a read, or the error once the budget
    /// ran out.
    async fn retry_read(&self, retrying: &mut Retrying, tried: Tried) -> Result<()> {
        match self.wait(retrying, tried).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.exhausted(std::mem::take(retrying))),
        }
    }

    /// A replica `node` answered `MOVED`: the slot is another shard's now.
    /// Loads the map again, so that the next try goes to the new shard.
    async fn replica_redirected(&self, node: &NodeAddr, error: &RedisError, generation: u64) {
        self.telemetry.add(Counter::RedirectReplies);
        if let Some((slot, owner)) = cluster_redirect(error, node) {
            self.moved(slot, owner);
        }
        self.refresh(generation).await;
    }

    /// The replicas of `master` as probed; a master not probed yet (the
    /// first read, or a shard new to the map) waits for a round that
    /// includes it, for about as long as a probe may take.
    async fn probed(&self, master: &NodeAddr) -> Arc<ReadSet> {
        let of = |reads: &ClusterReads| reads.sets().get(master).cloned();
        if let Some(set) = of(&self.reads) {
            return set;
        }
        let connector = self.connector();
        let first_round = connector.connect_timeout()
            + connector.response_timeout()
            + self.reads.settings.probe_interval;
        let mut rounds = self.reads.rounds.subscribe();
        let waited = rounds.wait_for(|_| of(&self.reads).is_some());
        let _ = tokio::time::timeout(first_round, waited).await;
        of(&self.reads).unwrap_or_default()
    }

    /// A read on the slot's master (any master for `None`), with the full
    /// retry handling. Not declared idempotent: with `ReadPolicy::Master`
    /// any command may come here, and read-only ones are resent anyway.
    async fn read_from_master(
        self: &Arc<Self>,
        request: Request<'_>,
        slot: Option<u16>,
    ) -> Result<(NodeAddr, Reply)> {
        self.telemetry.add(Counter::MasterReads);
        let via = cluster_via(request, Durability::Master)?;
        Box::pin(self.execute(request, Destination::Slot(slot), false, via)).await
    }

    /// One try on `master` (`MasterPreferred`): `None` when it failed
    /// without an answer for the caller.
    async fn try_master_once(
        &self,
        master: &NodeAddr,
        request: Request<'_>,
    ) -> Option<Result<(NodeAddr, Reply)>> {
        let mut connection = self.connection(master).await.ok()?;
        match request.send(&mut connection).await {
            Ok(reply) if request.refusal(&reply, true).is_none() => {
                self.telemetry.add(Counter::MasterReads);
                Some(Ok((master.clone(), reply)))
            }
            Ok(_) => None,
            Err(error) => match Failure::of(&error) {
                Failure::Final => Some(Err(Error::Command {
                    node: master.clone(),
                    source: error,
                })),
                Failure::NotExecuted => None,
                Failure::OutcomeUnknown => {
                    self.forget(master);
                    self.refresh_soon();
                    None
                }
            },
        }
    }

    /// Starts the replica probes unless they run.
    pub(crate) fn track_replicas(self: &Arc<Self>) {
        if !self.reads.tracking.swap(true, Ordering::AcqRel) {
            tokio::spawn(probe_loop(Arc::clone(self), self.stopped()));
        }
    }

    /// One round of probes over every shard of the map, side by side;
    /// publishes each master's read set.
    async fn probe_round(&self, trackers: &mut HashMap<NodeAddr, ReplicaTracker>) {
        let shards = self.shards();
        // A master gone from the map takes its tracker (and probes) along.
        trackers.retain(|master, _| shards.iter().any(|(m, _)| m == master));
        let mut probing: Vec<_> = shards
            .into_iter()
            .map(|(master, replicas)| {
                let tracker = trackers.remove(&master).unwrap_or_default();
                (master, replicas, tracker)
            })
            .collect();
        let rounds = probing
            .iter_mut()
            .map(|(master, replicas, tracker)| self.probe_shard(master, replicas, tracker));
        let sets = join_all(rounds).await;
        let published = probing.iter().map(|(master, ..)| master.clone());
        self.reads.sets.store(Arc::new(
            published.zip(sets.into_iter().map(Arc::new)).collect(),
        ));
        trackers.extend(probing.into_iter().map(|(master, _, t)| (master, t)));
    }

    /// Probes `master` (on its shared connection) and its `replicas`.
    async fn probe_shard(
        &self,
        master: &NodeAddr,
        replicas: &[NodeAddr],
        tracker: &mut ReplicaTracker,
    ) -> ReadSet {
        let settings = &self.reads.settings;
        let sent = Instant::now();
        let keep = settings.max_staleness + settings.probe_interval;
        let master_info = match self.connection(master).await {
            Ok(mut connection) => tracker.probe_master(&mut connection, sent, keep).await,
            Err(_) => None,
        };
        let probing = Probing {
            connector: &self.reads.connector,
            interval: settings.probe_interval,
            max_staleness: settings.max_staleness,
            telemetry: &self.telemetry,
        };
        let replicas = tracker
            .probe_replicas(replicas, master_info.as_ref(), sent, &probing)
            .await;
        ReadSet {
            master_generation: 0,
            master_latency: tracker.master_latency,
            healthy_replicas: None,
            replicas,
        }
    }
}

/// Probes every shard each probe interval, and at once when the slot map
/// was loaded again, until `stop` is cancelled (the client dropped).
async fn probe_loop(cluster: Arc<ClusterShared>, stop: CancellationToken) {
    let mut interval = tokio::time::interval(cluster.reads.settings.probe_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generations = cluster.generations();
    let mut trackers = HashMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
            _ = generations.changed() => {}
        }
        generations.borrow_and_update();
        let round = cluster.probe_round(&mut trackers);
        tokio::select! {
            () = stop.cancelled() => return,
            () = round => cluster.reads.rounds.send_modify(|rounds| *rounds += 1),
        }
    }
}
