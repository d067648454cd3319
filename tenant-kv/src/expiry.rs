//! The expiry watcher: `key_expiration` records as soon as Redis expires
//! an item, from keyspace notifications, with sweeps for the ones missed.
//! On the same subscription it hears of tenants' data keys destroyed by
//! other instances, and stops using them at once.
//!
//! On a Redis Cluster each master publishes only its own keys' expiries,
//! and `SCAN` on a master sees only its own keys: the watcher subscribes
//! on every master (`subscribe_each_master`, which follows failovers and
//! new shards), enables the notifications on each (again after every
//! gap: a promoted replica does not inherit them), and sweeps each
//! (`scan_keys`).

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use redis::FromRedisValue;
use redis_failover::{Backoff, Delivery, FailoverClient, NodeAddr, Subscription};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::crypto::DATA_KEY_DESTROYED;
use crate::keys::TenantId;
use crate::store::{Actor, TenantKv};

/// Where Redis announces every key it expires (database 0).
const EXPIRED_CHANNEL: &str = "__keyevent@0__:expired";
/// Every tenant's expiry index (and items whose key ends so, which
/// [`tenant_of_expiry_index`] tells apart). `{` and `}` are no glob
/// characters: they match themselves.
const EXPIRY_INDEXES: &str = "tenant:{*}:expiry";
/// How many notifications already received are handled together.
const COALESCE: usize = 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running expiry watcher (see [`TenantKv::watch_expirations`]). It
/// stops when dropped, or on [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct ExpiryWatcher {
    // Cancels the task when the watcher is dropped: it ends at its next
    // await point between purges.
    stop: DropGuard,
    task: JoinHandle<()>,
}

impl ExpiryWatcher {
    pub(crate) fn start(store: TenantKv) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(store, stop.clone()));
        Self {
            stop: stop.drop_guard(),
            task,
        }
    }

    /// Stops the watcher and waits until it has. (A purge cut short ran
    /// whole or not at all: it is one script.)
    pub async fn shutdown(self) {
        let Self { stop, task } = self;
        drop(stop);
        let _ = task.await;
    }
}

async fn watch(store: TenantKv, stopped: CancellationToken) {
    let client = store.inner.client.clone();
    let mut channels = vec![EXPIRED_CHANNEL];
    if store.inner.encryption.is_some() {
        channels.push(DATA_KEY_DESTROYED);
    }
    let mut subscription = tokio::select! {
        () = stopped.cancelled() => return,
        subscribed = subscribe(&client, &channels) => subscribed,
    };
    // Whatever expired while nobody listened, then on every gap.
    let mut catch_up = true;
    let interval = store.inner.expiry_sweep_interval;
    let mut sweeps = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        if std::mem::take(&mut catch_up) {
            if store.inner.expiry_notifications {
                enable_notifications(&client).await;
            }
            report(sweep(&store).await);
        }
        tokio::select! {
            () = stopped.cancelled() => return,
            delivery = subscription.next() => match delivery {
                Some(Delivery::Message(message)) => {
                    let mut tenants = BTreeSet::new();
                    take(&store, &message, &mut tenants);
                    while tenants.len() < COALESCE {
                        match subscription.next().now_or_never() {
                            Some(Some(Delivery::Message(message))) => take(&store, &message, &mut tenants),
                            Some(Some(_)) => catch_up = true,
                            _ => break,
                        }
                    }
                    for tenant in tenants {
                        report(purge(&store, tenant).await);
                    }
                }
                // On another master, or a new master of a cluster (whose
                // notifications may be off), or after missing messages.
                Some(_) => catch_up = true,
                // The client is gone.
                None => return,
            },
            _ = sweeps.tick() => report(sweep(&store).await),
        }
    }
}

/// Subscribes to `channels` on every master (a cluster's masters each
/// publish their own keys' expiries; with one master, on it), trying
/// again (with backoff) until it works. A cluster propagates a `PUBLISH`
/// (a destroyed data key) to every node, so each master delivers it: it
/// is forgotten again, which is harmless.
async fn subscribe(client: &FailoverClient, channels: &[&str]) -> Subscription {
    // Between tries, each of which had the client's whole retry budget.
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
        .expect("100 ms up to 5 s is a valid backoff");
    for attempt in 0.. {
        match client
            .subscribe_each_master(channels.iter().copied(), Vec::<String>::new())
            .await
        {
            Ok(subscription) => return subscription,
            Err(error) => {
                tracing::warn!(%error, "expiry watcher: could not subscribe, retrying");
                tokio::time::sleep(backoff.delay(attempt)).await;
            }
        }
    }
    unreachable!("the loop returns")
}

/// Logs a failed purge or sweep: the next sweep tries again.
fn report(done: Result<(), BoxError>) {
    if let Err(error) = done {
        tracing::warn!(%error, "expiry watcher: purge failed; the next sweep tries again");
    }
}

/// Handles one message: an expired item's tenant joins `tenants` (to
/// purge); a destroyed data key is forgotten at once.
fn take(store: &TenantKv, message: &redis::Msg, tenants: &mut BTreeSet<TenantId>) {
    let payload = message.get_payload_bytes();
    if message.get_channel_name() == DATA_KEY_DESTROYED {
        let tenant = std::str::from_utf8(payload)
            .ok()
            .and_then(|id| TenantId::new(id).ok());
        if let (Some(encryption), Some(tenant)) = (&store.inner.encryption, tenant) {
            encryption.forget(&tenant);
        }
        return;
    }
    tenants.extend(tenant_of_item(payload));
}

/// Where each master's own `CONFIG` goes: each master of a cluster by
/// name; with one master, `None`, the master requests go to.
fn each_master(client: &FailoverClient) -> Vec<Option<NodeAddr>> {
    if client.is_cluster() {
        client.masters().into_iter().map(Some).collect()
    } else {
        vec![None]
    }
}

/// Sends `cmd` to the master `node` (see [`each_master`]); with one
/// master as an idempotent request, since every command sent so runs
/// twice harmlessly.
async fn query_master<T: FromRedisValue>(
    client: &FailoverClient,
    node: Option<&NodeAddr>,
    cmd: &redis::Cmd,
) -> redis_failover::Result<T> {
    match node {
        Some(node) => client.query_on(node, cmd).await,
        None => client.query_idempotent(cmd).await,
    }
}

/// Adds `Ex` (expired-key events) to each master's `notify-keyspace-events`
/// where they are not on. Where `CONFIG` is not allowed, says so: records
/// then come from the sweeps only.
async fn enable_notifications(client: &FailoverClient) {
    for node in each_master(client) {
        if let Err(error) = enable_notifications_on(client, node.as_ref()).await {
            tracing::warn!(
                %error,
                node = node.map(|n| n.to_string()),
                "expiry watcher: cannot enable keyspace notifications (`notify-keyspace-events Ex`); \
                 key_expiration records come from the periodic sweeps only"
            );
        }
    }
}

async fn enable_notifications_on(
    client: &FailoverClient,
    node: Option<&NodeAddr>,
) -> redis_failover::Result<()> {
    let get = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .clone();
    let (_, flags): (String, String) = query_master(client, node, &get).await?;
    if has_expired_events(&flags) {
        return Ok(());
    }
    let set = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(format!("{flags}Ex"))
        .clone();
    query_master::<()>(client, node, &set).await?;
    tracing::info!(
        previous = flags,
        node = node.map(|n| n.to_string()),
        "expiry watcher: enabled keyspace notifications of expired keys"
    );
    Ok(())
}

/// Whether `notify-keyspace-events` flags publish expired-key events.
fn has_expired_events(flags: &str) -> bool {
    flags.contains('E') && (flags.contains('x') || flags.contains('A'))
}

/// The tenant of an item's Redis key `tenant:{<id>}:data:<key>`, or of a
/// layout 1 item's `tenant:<id>:data:<key>` (expiring while a migration
/// runs), if it is one.
fn tenant_of_item(redis_key: &[u8]) -> Option<TenantId> {
    let rest = redis_key.strip_prefix(b"tenant:")?;
    let (id, after) = match rest.strip_prefix(b"{") {
        Some(tagged) => {
            let end = tagged.iter().position(|&b| b == b'}')?;
            (&tagged[..end], tagged[end + 1..].strip_prefix(b":")?)
        }
        None => {
            let end = rest.iter().position(|&b| b == b':')?;
            (&rest[..end], &rest[end + 1..])
        }
    };
    if !after.starts_with(b"data:") {
        return None;
    }
    TenantId::new(std::str::from_utf8(id).ok()?).ok()
}

/// The tenant of an expiry index's Redis key `tenant:{<id>}:expiry`.
fn tenant_of_expiry_index(redis_key: &str) -> Option<TenantId> {
    let id = redis_key
        .strip_prefix("tenant:{")?
        .strip_suffix("}:expiry")?;
    TenantId::new(id).ok()
}

async fn purge(store: &TenantKv, tenant: TenantId) -> Result<(), BoxError> {
    let purged = store
        .tenant(tenant.clone(), Actor::system())
        .purge_expired()
        .await?;
    if purged > 0 {
        tracing::debug!(%tenant, purged, "expiry watcher: purged expired items");
    }
    Ok(())
}

/// Purges every tenant whose expiry index holds an item past its time.
/// Scans the keyspace (every master's) for expiry indexes: this costs in
/// proportion to the whole database, which is why it runs seldom and
/// notifications do the prompt work.
async fn sweep(store: &TenantKv) -> Result<(), BoxError> {
    let client = &store.inner.client;
    let mut scan = client.scan_keys(EXPIRY_INDEXES).of_type("zset");
    while let Some(indexes) = scan.next_batch().await? {
        let tenants: Vec<(&String, TenantId)> = indexes
            .iter()
            .filter_map(|index| Some((index, tenant_of_expiry_index(index)?)))
            .collect();
        if tenants.is_empty() {
            continue;
        }
        let indexes: Vec<&String> = tenants.iter().map(|(index, _)| *index).collect();
        let counts = due_counts(client, &indexes).await?;
        for ((_, tenant), count) in tenants.into_iter().zip(counts) {
            if count > 0 {
                purge(store, tenant).await?;
            }
        }
    }
    Ok(())
}

/// How many items of each expiry index are past their time.
async fn due_counts(
    client: &FailoverClient,
    indexes: &[&String],
) -> redis_failover::Result<Vec<u64>> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let zcount = |index: &String| {
        redis::cmd("ZCOUNT")
            .arg(index)
            .arg("-inf")
            .arg(now_ms.to_string())
            .clone()
    };
    if !client.is_cluster() {
        let mut due = redis::pipe();
        for index in indexes {
            due.add_command(zcount(index));
        }
        return client.query_pipeline(&due).await;
    }
    // Each tenant's index is in its tenant's slot: a pipeline of several
    // would span slots, which a cluster refuses.
    let mut counts = Vec::with_capacity(indexes.len());
    for index in indexes {
        counts.push(client.query_idempotent(&zcount(index)).await?);
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_keys_name_their_tenant() {
        let tenant = |key: &[u8]| tenant_of_item(key).map(|t| t.as_str().to_owned());
        assert_eq!(tenant(b"tenant:{acme}:data:a:b"), Some("acme".to_owned()));
        assert_eq!(tenant(b"tenant:{acme}:data:"), Some("acme".to_owned()));
        assert_eq!(tenant(b"tenant:{acme}:data:}x"), Some("acme".to_owned()));
        // Layout 1's, while a migration runs.
        assert_eq!(tenant(b"tenant:acme:data:a:b"), Some("acme".to_owned()));
        assert_eq!(tenant(b"tenant:{acme}:rate"), None);
        assert_eq!(tenant(b"tenant:{acme}:index"), None);
        assert_eq!(tenant(b"tenant:{acme}data:x"), None);
        assert_eq!(tenant(b"tenant:{a*b}:data:x"), None);
        assert_eq!(tenant(b"tenant:{acme:data:x"), None);
        assert_eq!(tenant(b"other:{acme}:data:x"), None);
        assert_eq!(tenant(b"tenant:{\xff}:data:x"), None);
    }

    #[test]
    fn only_expiry_indexes_name_a_tenant() {
        let tenant = |key| tenant_of_expiry_index(key).map(|t| t.as_str().to_owned());
        assert_eq!(tenant("tenant:{acme}:expiry"), Some("acme".to_owned()));
        // An item whose key ends in `:expiry` is not an index.
        assert_eq!(tenant("tenant:{acme}:data:x}:expiry"), None);
        assert_eq!(tenant("tenant:{acme}:data:x:expiry"), None);
        assert_eq!(tenant("tenant:{}:expiry"), None);
        assert_eq!(tenant("tenant:acme:expiry"), None);
    }

    #[test]
    fn expired_events_need_the_keyevent_class_and_the_expired_type() {
        assert!(has_expired_events("xE"));
        assert!(has_expired_events("AKE"));
        assert!(!has_expired_events(""));
        assert!(!has_expired_events("Kx"));
        assert!(!has_expired_events("E$"));
    }
}
