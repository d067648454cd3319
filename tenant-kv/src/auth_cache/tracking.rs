//! The tracking task: one RESP3 connection of its own to each master (the
//! one master, or every master of a cluster) with broadcast tracking on
//! the records' prefixes, whose invalidation pushes it applies to the
//! cache, and which it replaces (dropping the cache) whenever one fails or
//! the masters change.
//!
//! Why RESP3 on one connection rather than RESP2 with `REDIRECT` to a
//! `__redis__:invalidate` subscriber: the failover client's subscriptions
//! hide their connection, whose `CLIENT ID` a redirect would need, and a
//! connection that is both tracked and the receiver of its own pushes has
//! no second connection whose loss could go unnoticed. (RESP2 tracking
//! without a redirect is accepted by the server but delivers nothing.)

use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, try_join_all};
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use redis_failover::{Backoff, Event, FailoverClient};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_util::sync::CancellationToken;

use super::{API_KEY_PREFIX, AuthCacheState, LEASE, Tracking, USER_PREFIX, generation};
use crate::store::TenantKv;

/// How often the tracking connection is pinged: each answer renews the
/// [`LEASE`], so several may be slow or lost before the cache stops serving.
const HEARTBEAT: Duration = Duration::from_millis(200);

/// How long turning tracking on for every master of a cluster may take.
const OPEN_LIMIT: Duration = Duration::from_secs(2);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Keeps tracking on, on the current masters, until `stop` is cancelled.
pub(super) async fn run(store: TenantKv, stop: CancellationToken) {
    let state = &store.inner.auth_cache;
    track(state, &store.inner.client, &stop).await;
    state.reset(None);
    state
        .started
        .store(false, std::sync::atomic::Ordering::Release);
}

/// Turns tracking on, and on again whenever it is lost, until `stop`.
async fn track(state: &AuthCacheState, client: &FailoverClient, stop: &CancellationToken) {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
        .expect("100 ms up to 5 s is a valid backoff");
    let mut attempt = 0;
    loop {
        // Subscribed before connecting: no change after it goes unseen.
        let events = client.events();
        let (sender, pushes) = unbounded_channel();
        let opened = tokio::select! {
            () = stop.cancelled() => break,
            opened = open(client, sender) => opened,
        };
        match opened {
            Ok((generation, connections, sent)) => {
                attempt = 0;
                state.reset(Some(Tracking {
                    generation,
                    valid_until: sent + LEASE,
                }));
                let connected = Connected {
                    state,
                    client,
                    generation,
                    connections,
                };
                let reason = tokio::select! {
                    () = stop.cancelled() => break,
                    reason = connected.serve(pushes, events) => reason,
                };
                state.reset(None);
                tracing::info!(%reason, "authentication cache dropped; turning tracking on again");
            }
            Err(error) => {
                // Once loud (a user without `CLIENT`, a Redis before 6),
                // then quiet while it goes on failing.
                if attempt == 0 {
                    tracing::warn!(%error, "authentication cache: tracking could not be turned on; retrying");
                } else {
                    tracing::debug!(%error, "authentication cache: tracking could not be turned on");
                }
                let wait = backoff.delay(attempt);
                attempt += 1;
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Connects to every master and turns broadcast tracking on; returns the
/// masters' epoch, the connections, and when tracking was asked for (the
/// lease runs from then).
async fn open(
    client: &FailoverClient,
    pushes: UnboundedSender<PushInfo>,
) -> Result<(u64, Vec<MultiplexedConnection>, Instant), BoxError> {
    let sent = Instant::now();
    if !client.is_cluster() {
        let (master, mut connection) = client.push_connection(pushes).await?;
        track_prefixes(&mut connection).await?;
        return Ok((master.generation, vec![connection], sent));
    }
    let epoch = generation(client).ok_or("no slot map yet")?;
    // Side by side, and within a bound: a dead master of a map about to
    // change must not hold tracking off for a retry budget (`track` backs
    // off and tries again, with the masters of then).
    let opening = client.masters().into_iter().map(|master| {
        let pushes = pushes.clone();
        async move {
            let mut connection = client.push_connection_to(&master, pushes).await?;
            track_prefixes(&mut connection).await?;
            Ok::<_, BoxError>(connection)
        }
    });
    let opened = async {
        let connections = try_join_all(opening).await?;
        // Each must be a master now, as each heartbeat will check: a node
        // demoted or cut off before the map knows is not tracked as one.
        let (_, masters) = heartbeats(connections.clone(), true).await;
        if masters.is_err() {
            client.reload_slot_map();
        }
        masters.map(|()| connections).map_err(BoxError::from)
    };
    let connections = tokio::time::timeout(OPEN_LIMIT, opened)
        .await
        .map_err(|_| "a master did not answer in time")??;
    // Every master of this epoch is tracked only if the epoch held.
    if generation(client) != Some(epoch) {
        return Err("the masters changed while tracking was turned on".into());
    }
    Ok((epoch, connections, sent))
}

/// Broadcast tracking of every user and API-key record on `connection`.
async fn track_prefixes(connection: &mut MultiplexedConnection) -> redis::RedisResult<()> {
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(USER_PREFIX)
        .arg("PREFIX")
        .arg(API_KEY_PREFIX)
        .query_async(connection)
        .await
}

/// Tracking on, on every master.
struct Connected<'a> {
    state: &'a AuthCacheState,
    client: &'a FailoverClient,
    /// The master's generation, or the cluster's masters' epoch.
    generation: u64,
    connections: Vec<MultiplexedConnection>,
}

impl Connected<'_> {
    /// Applies invalidations and renews the lease until tracking cannot
    /// be trusted any more; says why.
    async fn serve(
        self,
        mut pushes: UnboundedReceiver<PushInfo>,
        mut events: broadcast::Receiver<Event>,
    ) -> String {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cluster = self.client.is_cluster();
        // A round of heartbeats in flight, polled beside the pushes: a slow
        // master must not hold up the other masters' invalidations.
        let mut round: Option<BoxFuture<'static, (Instant, redis::RedisResult<()>)>> = None;
        loop {
            tokio::select! {
                push = pushes.recv() => {
                    if let Err(reason) = self.handle(push) {
                        return reason;
                    }
                }
                event = events.recv() => match event {
                    // A cluster's master changes show in the epoch, checked
                    // at every lookup and heartbeat.
                    Ok(_) if cluster => {}
                    // One master: the change to the master tracked.
                    Ok(Event::MasterChanged { generation, .. }) if generation == self.generation => {}
                    Ok(event @ (Event::MasterChanged { .. }
                        | Event::MasterLost { .. }
                        | Event::MasterRestarted { .. })) => return format!("{event:?}"),
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => return "master events were missed".to_owned(),
                    // Cannot happen while the store (and so its client) lives.
                    Err(RecvError::Closed) => return "the client is gone".to_owned(),
                },
                _ = heartbeat.tick(), if round.is_none() => {
                    if generation(self.client) != Some(self.generation) {
                        return "another master is in use".to_owned();
                    }
                    round = Some(Box::pin(heartbeats(self.connections.clone(), cluster)));
                }
                (sent, answered) = async { round.as_mut().expect("guarded").await }, if round.is_some() => {
                    round = None;
                    if let Err(error) = answered {
                        // A node no longer a master: the map is out of date.
                        self.client.reload_slot_map();
                        return format!("a tracking connection failed: {error}");
                    }
                    // Every push sent before the answers is applied first.
                    while let Ok(push) = pushes.try_recv() {
                        if let Err(reason) = self.handle(Some(push)) {
                            return reason;
                        }
                    }
                    self.state.renew(self.generation, sent);
                }
            }
        }
    }

    /// Applies one push; `Err` says why tracking is lost.
    fn handle(&self, push: Option<PushInfo>) -> Result<(), String> {
        match push {
            Some(push) if push.kind == PushKind::Invalidate => {
                self.apply(push);
                Ok(())
            }
            Some(push) if push.kind != PushKind::Disconnection => Ok(()),
            _ => Err("a tracking connection was lost".to_owned()),
        }
    }

    /// Forgets the keys an `invalidate` push names; all of them for a
    /// null (`FLUSHALL`, `FLUSHDB`).
    fn apply(&self, push: PushInfo) {
        match push.data.into_iter().next() {
            Some(Value::Array(keys)) => {
                let keys: Result<Vec<String>, _> =
                    keys.into_iter().map(redis::from_redis_value).collect();
                match keys {
                    Ok(keys) => self.state.invalidate(keys.iter().map(String::as_str)),
                    // Not one of ours, yet unreadable: forget everything.
                    Err(_) => self.state.flush(),
                }
            }
            _ => self.state.flush(),
        }
    }
}

/// One heartbeat on every tracking connection, sent now: a `PING` to the
/// one master; on a cluster, proof that each node still is a master of a
/// cluster that serves (`ROLE`, `CLUSTER INFO`): a master cut off in a
/// minority answers `PING` while the majority promotes its replica, but
/// reports `cluster_state:fail` after the node timeout without it.
async fn heartbeats(
    mut connections: Vec<MultiplexedConnection>,
    cluster: bool,
) -> (Instant, redis::RedisResult<()>) {
    let sent = Instant::now();
    let rounds = connections.iter_mut().map(|connection| async move {
        if !cluster {
            return redis::cmd("PING")
                .query_async::<String>(connection)
                .await
                .map(drop);
        }
        let (role, info): (Vec<Value>, String) = redis::pipe()
            .cmd("ROLE")
            .cmd("CLUSTER")
            .arg("INFO")
            .query_async(connection)
            .await?;
        let role = role.first().map(redis::from_redis_value_ref::<String>);
        if matches!(role, Some(Ok(role)) if role == "master")
            && info.lines().any(|line| line.trim() == "cluster_state:ok")
        {
            Ok(())
        } else {
            Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "no longer a master of a cluster that serves",
            )))
        }
    });
    let answered = try_join_all(rounds).await.map(drop);
    (sent, answered)
}
