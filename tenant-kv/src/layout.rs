//! Which storage layout Redis holds, as a marker in Redis: the store serves
//! layout 2 ([`STORAGE_LAYOUT`]), and a dataset migrating to it from
//! layout 1 ([`TenantKv::migration`]); it refuses anything else.
//!
//! The marker `tenant-kv:layout` holds `2`, or `migrating` while a
//! migration from layout 1 runs. Layout 1 had no marker: without one, a
//! database holding layout 1's keys (`tenant:<id>:...`, with no `{`) is
//! layout 1, and one without them is marked layout 2 on first use.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use redis_failover::KeyScan;

use crate::error::{Error, Result};
use crate::store::TenantKv;

/// The storage layout this version serves.
pub const STORAGE_LAYOUT: u32 = 2;
/// The marker's key.
pub(crate) const LAYOUT_KEY: &str = "tenant-kv:layout";
/// The marker's value while a migration from layout 1 runs.
pub(crate) const MIGRATING: &str = "migrating";
/// Layout 1's keys: `tenant:` followed by anything but layout 2's `{`.
const LEGACY_PATTERN: &str = "tenant:[^{]*";
/// How long an instance goes on reading layout 1's items beside layout 2's
/// once the migration is over, at most: it reads the marker again this often.
const MIGRATING_RECHECK: Duration = Duration::from_secs(1);

/// What a store instance serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutStatus {
    /// Layout 2 alone.
    Current,
    /// Layout 2, and the items of layout 1 a running migration has not
    /// converted yet: reads fall back to them, writes replace them.
    Migrating,
}

const UNKNOWN: u8 = 0;
const CURRENT: u8 = 1;
const MIGRATING_STATE: u8 = 2;

/// The layout last read, so that the store serving layout 2 asks Redis
/// once per process.
#[derive(Debug)]
pub(crate) struct LayoutCache {
    state: AtomicU8,
    read_at: Mutex<Option<Instant>>,
}

impl Default for LayoutCache {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(UNKNOWN),
            read_at: Mutex::new(None),
        }
    }
}

impl LayoutCache {
    fn fresh(&self) -> Option<LayoutStatus> {
        match self.state.load(Ordering::Acquire) {
            CURRENT => Some(LayoutStatus::Current),
            MIGRATING_STATE => {
                let read_at = *self.read_at.lock().unwrap_or_else(|e| e.into_inner());
                read_at
                    .is_some_and(|at| at.elapsed() < MIGRATING_RECHECK)
                    .then_some(LayoutStatus::Migrating)
            }
            _ => None,
        }
    }

    fn remember(&self, status: LayoutStatus) {
        *self.read_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let state = match status {
            LayoutStatus::Current => CURRENT,
            LayoutStatus::Migrating => MIGRATING_STATE,
        };
        self.state.store(state, Ordering::Release);
    }
}

fn is_noperm(error: &redis_failover::Error) -> bool {
    matches!(error, redis_failover::Error::Command { source, .. } if source.code() == Some("NOPERM"))
}

impl TenantKv {
    /// Checks that Redis holds a storage layout this version serves, and
    /// says which; marks an empty database as layout 2. Fails with
    /// [`Error::UnsupportedLayout`] on layout 1 (to migrate first:
    /// [`TenantKv::migration`]) or a newer one. Every operation checks this
    /// first (once per process, or once a second while a migration runs);
    /// call it at start-up to refuse to start instead.
    pub async fn check_layout(&self) -> Result<LayoutStatus> {
        let status = self.read_layout().await?;
        self.inner.layout.remember(status);
        Ok(status)
    }

    /// The layout to serve, from memory when it can be.
    pub(crate) async fn layout(&self) -> Result<LayoutStatus> {
        match self.inner.layout.fresh() {
            Some(status) => Ok(status),
            None => self.check_layout().await,
        }
    }

    async fn read_layout(&self) -> Result<LayoutStatus> {
        let client = &self.inner.client;
        let marker: Option<String> = client
            .query_idempotent(redis::cmd("GET").arg(LAYOUT_KEY))
            .await?;
        match marker.as_deref() {
            Some("2") => return Ok(LayoutStatus::Current),
            Some(MIGRATING) => return Ok(LayoutStatus::Migrating),
            Some(other) => {
                return Err(Error::UnsupportedLayout {
                    found: other.to_owned(),
                });
            }
            None => {}
        }
        let keys = self.key_count().await?;
        if keys > 0 {
            match self.find_legacy_key().await {
                Ok(None) => {}
                Ok(Some(_)) => {
                    return Err(Error::UnsupportedLayout {
                        found: "1".to_owned(),
                    });
                }
                Err(error) if is_noperm(&error) => {
                    return Err(Error::UnsupportedLayout {
                        found:
                            "unknown (no marker, and this client may not scan for layout 1's keys)"
                                .to_owned(),
                    });
                }
                Err(error) => return Err(error.into()),
            }
        }
        let marked: redis_failover::Result<Option<String>> = client
            .query_idempotent(
                redis::cmd("SET")
                    .arg(LAYOUT_KEY)
                    .arg(STORAGE_LAYOUT)
                    .arg("NX")
                    .arg("GET"),
            )
            .await;
        match marked {
            // Marked now, or by another instance meanwhile: read it again.
            Ok(None) => Ok(LayoutStatus::Current),
            Ok(Some(_)) => Box::pin(self.read_layout()).await,
            // A client confined to one tenant's keys serves an empty
            // database as layout 2 without marking it.
            Err(error) if is_noperm(&error) && keys == 0 => Ok(LayoutStatus::Current),
            Err(error) => Err(error.into()),
        }
    }

    /// A key of layout 1, if the database holds one (a scan of the whole
    /// keyspace, every master of a cluster, when it holds none).
    pub(crate) async fn find_legacy_key(&self) -> redis_failover::Result<Option<String>> {
        let mut scan = self.scan_legacy();
        while let Some(keys) = scan.next_batch().await? {
            if let Some(key) = keys.into_iter().next() {
                return Ok(Some(key));
            }
        }
        Ok(None)
    }

    /// A `SCAN` over layout 1's keys, on every master.
    pub(crate) fn scan_legacy(&self) -> KeyScan {
        self.inner.client.scan_keys(LEGACY_PATTERN)
    }

    /// How many keys the database holds: on a cluster, the sum over its
    /// masters (a keyless `DBSIZE` would count one master's).
    async fn key_count(&self) -> redis_failover::Result<u64> {
        let client = &self.inner.client;
        if !client.is_cluster() {
            return client.query_idempotent(&redis::cmd("DBSIZE")).await;
        }
        let mut total = 0;
        for master in client.masters() {
            let keys: u64 = client.query_on(&master, &redis::cmd("DBSIZE")).await?;
            total += keys;
        }
        Ok(total)
    }
}
