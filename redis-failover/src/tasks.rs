//! Background work: the periodic re-check, one `+switch-master` watcher
//! per sentinel, and the demotion of stale masters. Each runs until the
//! client's last handle is dropped, which cancels the `stop` token.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Role};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::addr::NodeAddr;
use crate::backoff::Backoff;
use crate::builder::Mode;
use crate::events::{Counter, Event, Trigger};
use crate::node::verify_master;
use crate::shared::Shared;
use crate::state::{Master, Observed};

/// Between tries to reach a sentinel again.
const SENTINEL_RECONNECT: Backoff =
    Backoff::constant(Duration::from_millis(100), Duration::from_secs(2));
/// Between tries to demote a stale master.
const DEMOTION_RETRY: Backoff =
    Backoff::constant(Duration::from_millis(200), Duration::from_secs(2));

/// Resolves once a master other than generation `generation` is installed.
pub(crate) async fn replaced(installed: &mut watch::Receiver<u64>, generation: u64) {
    if installed.wait_for(|now| *now != generation).await.is_err() {
        // The client is going away: nothing will be installed.
        std::future::pending::<()>().await;
    }
}

/// Re-checks the master every `recheck_interval`; with Sentinel, also
/// learns new sentinels every tenth time and watches them.
pub(crate) async fn recheck_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let watchers_stop = stop.clone();
    let mut interval = tokio::time::interval(shared.settings.recheck_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for tick in 0u64.. {
        let work = async {
            interval.tick().await;
            recheck(&shared).await;
            if tick % 10 == 0 {
                for sentinel in shared.learn_sentinels().await {
                    let stop = watchers_stop.clone();
                    tokio::spawn(watch_sentinel(Arc::clone(&shared), sentinel, stop));
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            _ = work => {}
        }
    }
}

/// Is the master still master (and, with Sentinel, still the node the
/// sentinels name)? If not, look again.
async fn recheck(shared: &Shared) {
    let Observed { master, epoch } = shared.state.observe();
    let Some(master) = master else {
        let _ = shared.rediscover(epoch, Trigger::NoMaster, None).await;
        return;
    };
    let mut connection = master.connection.load().multiplexed.clone();
    let still_master = verify_master(&mut connection, shared.master_check())
        .await
        .is_ok();
    if !still_master {
        let _ = shared.rediscover(epoch, Trigger::Poll, Some(&master)).await;
    } else if sentinels_moved_from(shared, &master).await {
        let _ = shared.rediscover(epoch, Trigger::Poll, None).await;
    }
}

/// With Sentinel: whether the sentinels now agree on a master other than
/// `master`, or any of them named another in a newer epoch.
async fn sentinels_moved_from(shared: &Shared, master: &Master) -> bool {
    if !matches!(shared.settings.mode, Mode::Sentinel { .. }) {
        return false;
    }
    let agreed = shared.ask_sentinels().await;
    let superseded = shared.state.superseded(master);
    superseded || agreed.is_ok_and(|named| named.node != master.node)
}

/// Follows one sentinel's `+switch-master` notices, reconnecting with
/// backoff, and catches up after every (re)connect, since notices sent
/// while disconnected are lost.
pub(crate) async fn watch_sentinel(
    shared: Arc<Shared>,
    sentinel: NodeAddr,
    stop: CancellationToken,
) {
    let Mode::Sentinel { master_name, .. } = &shared.settings.mode else {
        return;
    };
    let mut attempt = 0;
    let mut down = false;
    loop {
        let session = async {
            let mut pubsub = shared.sentinels.connector.pubsub(&sentinel).await?;
            pubsub.subscribe("+switch-master").await?;
            attempt = 0;
            if std::mem::take(&mut down) {
                shared.emit(Event::NodeUp {
                    node: sentinel.clone(),
                });
            }
            let Observed { master, epoch } = shared.state.observe();
            let stale = match &master {
                None => true,
                Some(master) => sentinels_moved_from(&shared, master).await,
            };
            if stale {
                let _ = shared
                    .rediscover(epoch, Trigger::SentinelReconnect, None)
                    .await;
            }
            let mut notices = pubsub.into_on_message();
            while let Some(notice) = notices.next().await {
                let payload: String = notice.get_payload().unwrap_or_default();
                // "<name> <old ip> <old port> <new ip> <new port>"
                let words: Vec<&str> = payload.split_whitespace().collect();
                let [name, _, _, ip, port] = words.as_slice() else {
                    continue;
                };
                let announced = port
                    .parse()
                    .ok()
                    .and_then(|port| NodeAddr::new(*ip, port).ok());
                let installed = shared.state.master().map(|m| m.node.clone());
                if name == master_name && announced.is_some() && announced != installed {
                    let epoch = shared.state.observe().epoch;
                    let _ = shared.rediscover(epoch, Trigger::PubSub, None).await;
                }
            }
            Ok::<_, RedisError>(())
        };
        let reason = tokio::select! {
            () = stop.cancelled() => return,
            result = session => match result {
                Ok(()) => "the connection closed".to_owned(),
                Err(error) => error.to_string(),
            },
        };
        tracing::debug!(%sentinel, %reason, "sentinel subscription lost");
        if !down {
            down = true;
            shared.emit(Event::NodeDown {
                node: sentinel.clone(),
                reason,
            });
        }
        let wait = SENTINEL_RECONNECT.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How long after a switch the old master is watched for, to be demoted
/// once it answers.
const DEMOTION_WINDOW: Duration = Duration::from_secs(60);

/// With `demote_stale_masters`: after every switch, demotes the master left
/// behind. A newer switch replaces the pending demotion. `installed` is
/// subscribed before the task starts, so no switch is missed.
pub(crate) async fn demote_loop(
    shared: Arc<Shared>,
    mut installed: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let installed_node = || shared.state.master().as_ref().map(|m| m.node.clone());
    let mut last: Option<NodeAddr> = None;
    let mut demotion: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(std::future::pending());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = &mut demotion => demotion = Box::pin(std::future::pending()),
            changed = installed.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = installed_node();
                if let (Some(old), Some(new)) = (&last, &now)
                    && old != new
                {
                    demotion = Box::pin(demote(Arc::clone(&shared), old.clone(), new.clone()));
                }
                last = now.or(last);
            }
        }
    }
}

/// Tries to demote `old` until it is a replica, `new` is no longer the
/// master, `old` refuses, or the window closes.
async fn demote(shared: Arc<Shared>, old: NodeAddr, new: NodeAddr) {
    let deadline = Instant::now() + DEMOTION_WINDOW;
    let mut connection = None;
    for attempt in 0.. {
        let why = match demote_once(&shared, &old, &new, &mut connection).await {
            Ok(Demotion::Done) => {
                shared.telemetry.add(Counter::StaleMastersDemoted);
                tracing::info!(node = %old, master = %new, "stale master demoted");
                shared.emit(Event::StaleMasterDemoted {
                    node: old,
                    master: new,
                });
                return;
            }
            Ok(Demotion::NotNeeded) => return,
            Ok(Demotion::Wait(reason)) => reason,
            // A refusal (no permission for REPLICAOF, say) will not change.
            Err(error)
                if error
                    .code()
                    .is_some_and(|code| !matches!(code, "LOADING" | "BUSY")) =>
            {
                tracing::warn!(node = %old, master = %new, %error, "stale master left to Sentinel: it refused to be demoted");
                return;
            }
            Err(error) => {
                connection = None;
                format!("not reached: {error}")
            }
        };
        if Instant::now() >= deadline {
            tracing::warn!(node = %old, master = %new, reason = %why, "stale master left to Sentinel: not demoted within {DEMOTION_WINDOW:?}");
            return;
        }
        let pause = DEMOTION_RETRY.delay(attempt);
        tokio::time::sleep(pause).await;
    }
}

enum Demotion {
    Done,
    /// `old` is a replica already, or another node than `new` is master.
    NotNeeded,
    /// Not now (this is why): no master is installed, or the sentinels do
    /// not (yet) name `new`.
    Wait(String),
}

/// One attempt, over `connection` to `old` (opened if `None`).
async fn demote_once(
    shared: &Shared,
    old: &NodeAddr,
    new: &NodeAddr,
    connection: &mut Option<MultiplexedConnection>,
) -> Result<Demotion, RedisError> {
    // Only a master this client has verified counts.
    let blocked = || match shared.state.master().as_ref() {
        Some(master) if master.node == *new => None,
        Some(_) => Some(Demotion::NotNeeded),
        None => Some(Demotion::Wait("no master installed".to_owned())),
    };
    if let Some(blocked) = blocked() {
        return Ok(blocked);
    }
    let connection = match connection {
        Some(connection) => connection,
        None => connection.insert(shared.data.connect(old).await?),
    };
    let role: Role = redis::cmd("ROLE").query_async(connection).await?;
    if !matches!(role, Role::Primary { .. }) {
        return Ok(Demotion::NotNeeded);
    }
    // Checked just before acting: demoting a node the sentinels name as
    // master would take the only master away.
    let named = shared.ask_sentinels_current().await;
    if !named.is_ok_and(|named| named.node == *new) {
        return Ok(Demotion::Wait(format!(
            "the sentinels do not agree on {new}"
        )));
    }
    if let Some(blocked) = blocked() {
        return Ok(blocked);
    }
    redis::cmd("REPLICAOF")
        .arg(new.host())
        .arg(new.port())
        .query_async::<()>(connection)
        .await?;
    Ok(Demotion::Done)
}
