//! The online migration from storage layout 1 to layout 2
//! ([`TenantKv::migration`]).
//!
//! 1. **Prepare.** A scan of the keyspace finds layout 1's keys
//!    (`tenant:<id>:...`). For each tenant, one script renames every key
//!    but its items to layout 2's name (`tenant:{<id>}:...`: the index,
//!    counters, audit and log streams with their consumer groups, quotas,
//!    data key, users, API keys, rate states), and leaves a fence at
//!    layout 1's `expiry`, on which the previous version's write script
//!    fails before writing. The tenants with items join the set
//!    `tenant-kv:migration:pending`. Then the marker `tenant-kv:layout`
//!    says `migrating`: servers of this version may start, and serve every
//!    tenant at once.
//! 2. **Convert.** Each pending tenant's index is walked in batches; one
//!    script per batch turns each item still in layout 1 (a hash) into an
//!    envelope, keeping its value, metadata, version, times, size and
//!    expiry time, and records how far the walk got in
//!    `tenant:{<id>}:migration`. A tenant whose walk ends leaves the set.
//! 3. **Finish.** A last scan converts any layout 1 item left outside an
//!    index and merges keys a server of the previous version wrote since
//!    the prepare step; then the marker says `2`.
//!
//! Meanwhile servers of this version read an item's layout 1 hash and its
//! envelope in one pipeline and take the envelope if there is one; a write
//! replaces the hash by an envelope in its script. An item moves from one
//! layout to the other in one script, whoever moves it, so nothing a
//! client sees depends on how far the migration got, and no write waits.
//!
//! Only the prepare step pauses anything: from a tenant's fence until the
//! marker says `migrating`, servers of the previous version fail that
//! tenant's writes and servers of this version do not start yet (they
//! find layout 1's keys and no marker). The step renames keys only, a few
//! per tenant; a migration stopped during it leaves that state until it is
//! run again.
//!
//! Every step is idempotent: a migration stopped anywhere (even by
//! `kill -9`) resumes where it was when run again, and two running at
//! once only do some work twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use redis::Value;

use crate::error::{Error, Result};
use crate::keys::{TenantId, TenantKeys, legacy_prefix, tenant_prefix};
use crate::layout::{LAYOUT_KEY, MIGRATING, STORAGE_LAYOUT};
use crate::scripts::{MARK_MIGRATING, MIGRATE_ITEMS, MIGRATE_PREPARE};
use crate::store::TenantKv;

/// The set of tenants whose items remain to convert.
const PENDING: &str = "tenant-kv:migration:pending";
/// What the fence at layout 1's `expiry` holds.
const FENCE: &str = "moved to tenant-kv storage layout 2";
/// How long the fences stay: longer than any migration, after which no
/// server of the previous version should run.
const FENCE_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// How many last scans may each find something left before the migration
/// gives up (only a server of the previous version writing all along
/// keeps leaving some).
const FINISH_SCANS: usize = 5;
/// The most items one batch converts.
pub const MAX_MIGRATION_BATCH: usize = 10_000;

/// A migration of the data from storage layout 1 to layout 2, from
/// [`TenantKv::migration`]; see the crate's documentation for what clients
/// see meanwhile.
#[derive(Debug)]
#[must_use]
pub struct Migration {
    store: TenantKv,
    batch_size: usize,
    pause: Duration,
}

/// What a migration reports as it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationProgress {
    /// Redis already holds layout 2: nothing to do.
    AlreadyCurrent,
    /// Every tenant's keys but its items are in layout 2: servers of this
    /// version may start.
    Prepared {
        /// Tenants found in layout 1.
        tenants: usize,
        /// Layout 1 items left to convert.
        items: u64,
        /// Keys renamed to layout 2.
        keys_moved: u64,
    },
    /// One batch of a tenant's items converted.
    Batch {
        /// The tenant.
        tenant: TenantId,
        /// Its index entries walked so far.
        walked: u64,
        /// Its items converted so far.
        converted: u64,
    },
    /// Every item of a tenant is in layout 2.
    TenantDone {
        /// The tenant.
        tenant: TenantId,
        /// Tenants left.
        remaining: usize,
    },
    /// The migration is over: Redis holds layout 2.
    Done(MigrationReport),
}

/// What a migration did, from this run (a resumed one counts only its own work).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Tenants found with keys in layout 1.
    pub tenants: usize,
    /// Items converted.
    pub items_converted: u64,
    /// Keys renamed to layout 2.
    pub keys_moved: u64,
    /// Keys found under both names and merged into layout 2's.
    pub keys_merged: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// A tenant's layout 1 keys, as a scan found them.
#[derive(Debug, Default)]
struct Legacy {
    /// The names after `tenant:<id>:` of its keys that are not items.
    names: BTreeSet<String>,
    /// Its items.
    items: u64,
    /// Its items' keys, when the scan keeps them.
    item_keys: Vec<String>,
}

impl TenantKv {
    /// A migration of Redis's data from storage layout 1 to layout 2, the
    /// one this version serves, while servers of this version serve it.
    pub fn migration(&self) -> Migration {
        Migration {
            store: self.clone(),
            batch_size: 500,
            pause: Duration::ZERO,
        }
    }
}

impl Migration {
    /// How many items one script converts (1 to 10 000):
    /// each batch holds Redis for its length. Defaults to 500.
    pub fn batch_size(mut self, items: usize) -> Self {
        self.batch_size = items.clamp(1, MAX_MIGRATION_BATCH);
        self
    }

    /// A pause after each batch, to leave Redis to the service. Defaults
    /// to none.
    pub fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// Runs the migration, or resumes it, telling `progress` how it goes;
    /// returns once Redis holds layout 2 only. Fails with
    /// [`Error::UnsupportedLayout`] on a layout newer than 2.
    pub async fn run(
        self,
        mut progress: impl FnMut(&MigrationProgress),
    ) -> Result<MigrationReport> {
        let started = Instant::now();
        let client = &self.store.inner.client;
        let marker: Option<String> = client
            .query_idempotent(redis::cmd("GET").arg(LAYOUT_KEY))
            .await?;
        let mut report = MigrationReport::default();
        match marker.as_deref() {
            Some("2") => {
                progress(&MigrationProgress::AlreadyCurrent);
                return Ok(report);
            }
            Some(MIGRATING) | None => {}
            Some(other) => {
                return Err(Error::UnsupportedLayout {
                    found: other.to_owned(),
                });
            }
        }
        let found = self.scan(false).await?;
        if !found.is_empty() && client.is_cluster() {
            // Layout 1's names have no hash tag: a tenant's keys, and each
            // key's two names, lie in different slots, which no script of
            // the migration may name together. Layout 1 never ran on a
            // cluster for the same reason.
            return Err(Error::UnsupportedLayout {
                found: "1, on a Redis Cluster (migrate on one master, then move the data)"
                    .to_owned(),
            });
        }
        report.tenants = found.len();
        for (tenant, legacy) in &found {
            self.prepare(tenant, legacy, &mut report).await?;
        }
        let mut mark = MARK_MIGRATING.command(&[LAYOUT_KEY]);
        mark.arg(MIGRATING).arg(STORAGE_LAYOUT);
        let _: Value = MARK_MIGRATING.run(client, &mark, true).await?;
        progress(&MigrationProgress::Prepared {
            tenants: found.len(),
            items: found.values().map(|legacy| legacy.items).sum(),
            keys_moved: report.keys_moved,
        });
        self.convert_pending(&mut report, &mut progress).await?;
        self.finish(&mut report).await?;
        let _: () = client
            .query_idempotent(redis::cmd("SET").arg(LAYOUT_KEY).arg(STORAGE_LAYOUT))
            .await?;
        self.store.check_layout().await?;
        report.elapsed = started.elapsed();
        progress(&MigrationProgress::Done(report.clone()));
        Ok(report)
    }

    /// Layout 1's keys by tenant, from a scan of the whole keyspace; with
    /// the items' keys if `keep_items`.
    async fn scan(&self, keep_items: bool) -> Result<BTreeMap<TenantId, Legacy>> {
        let mut found: BTreeMap<TenantId, Legacy> = BTreeMap::new();
        let mut scan = self.store.scan_legacy();
        while let Some(keys) = scan.next_batch().await? {
            for key in keys {
                let Some((id, name)) = key
                    .strip_prefix("tenant:")
                    .and_then(|rest| rest.split_once(':'))
                else {
                    continue;
                };
                let Ok(tenant) = TenantId::new(id) else {
                    continue;
                };
                let legacy = found.entry(tenant).or_default();
                if let Some(item) = name.strip_prefix("data:") {
                    legacy.items += 1;
                    if keep_items {
                        legacy.item_keys.push(item.to_owned());
                    }
                } else {
                    legacy.names.insert(name.to_owned());
                }
            }
        }
        Ok(found)
    }

    /// Moves a tenant's keys but its items to layout 2, fences layout 1's
    /// writes, and marks the tenant pending if it has items.
    async fn prepare(
        &self,
        tenant: &TenantId,
        legacy: &Legacy,
        report: &mut MigrationReport,
    ) -> Result<()> {
        let client = &self.store.inner.client;
        let (old, new) = (
            legacy_prefix(tenant.as_str()),
            tenant_prefix(tenant.as_str()),
        );
        let mut keys = vec![format!("{old}expiry"), format!("{new}expiry")];
        for name in legacy.names.iter().filter(|name| *name != "expiry") {
            keys.push(format!("{old}{name}"));
            keys.push(format!("{new}{name}"));
        }
        let mut command = MIGRATE_PREPARE.command(&keys);
        command.arg(FENCE).arg(FENCE_LIFETIME.as_millis() as u64);
        let (moved, merged): (u64, u64) = MIGRATE_PREPARE.run(client, &command, true).await?;
        report.keys_moved += moved;
        report.keys_merged += merged;
        if legacy.items > 0 {
            let _: () = client
                .query_idempotent(redis::cmd("SADD").arg(PENDING).arg(tenant.as_str()))
                .await?;
        }
        Ok(())
    }

    /// Converts the items of every pending tenant, one tenant at a time.
    async fn convert_pending(
        &self,
        report: &mut MigrationReport,
        progress: &mut impl FnMut(&MigrationProgress),
    ) -> Result<()> {
        let client = &self.store.inner.client;
        let mut pending: Vec<String> = client
            .query_idempotent(redis::cmd("SMEMBERS").arg(PENDING))
            .await?;
        pending.sort();
        let mut remaining = pending.len();
        for id in pending {
            remaining -= 1;
            if let Ok(tenant) = TenantId::new(id.as_str()) {
                self.convert_tenant(&tenant, report, progress).await?;
                progress(&MigrationProgress::TenantDone { tenant, remaining });
            }
            let _: () = client
                .query_idempotent(redis::cmd("SREM").arg(PENDING).arg(&id))
                .await?;
        }
        Ok(())
    }

    /// Walks a tenant's index from where an earlier run stopped,
    /// converting its items batch by batch.
    async fn convert_tenant(
        &self,
        tenant: &TenantId,
        report: &mut MigrationReport,
        progress: &mut impl FnMut(&MigrationProgress),
    ) -> Result<()> {
        let client = &self.store.inner.client;
        let keys = TenantKeys::new(tenant);
        let (mut after, mut converted): (Option<String>, Option<u64>) = client
            .query_idempotent(
                redis::cmd("HMGET")
                    .arg(keys.migration())
                    .arg("after")
                    .arg("converted"),
            )
            .await?;
        let mut walked = 0u64;
        loop {
            let start = after.as_ref().map_or_else(
                || b"-".to_vec(),
                |after| {
                    let mut start = b"(".to_vec();
                    start.extend_from_slice(after.as_bytes());
                    start
                },
            );
            let batch: Vec<String> = client
                .query_idempotent(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(keys.index())
                        .arg(start)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(self.batch_size),
                )
                .await?;
            let Some(last) = batch.last() else { break };
            let done = self.convert(tenant, &batch, Some(last)).await?;
            report.items_converted += done;
            walked += batch.len() as u64;
            let total = converted.unwrap_or(0) + done;
            converted = Some(total);
            progress(&MigrationProgress::Batch {
                tenant: tenant.clone(),
                walked,
                converted: total,
            });
            if batch.len() < self.batch_size {
                break;
            }
            after = Some(last.clone());
            if !self.pause.is_zero() {
                tokio::time::sleep(self.pause).await;
            }
        }
        let _: () = client
            .query_idempotent(redis::cmd("DEL").arg(keys.migration()))
            .await?;
        Ok(())
    }

    /// Converts the items `items` of `tenant`: a batch of its index ending
    /// at `last`, or (`None`) items found outside the index, added to it.
    async fn convert(
        &self,
        tenant: &TenantId,
        items: &[String],
        last: Option<&String>,
    ) -> Result<u64> {
        let keys = TenantKeys::new(tenant);
        let mut redis_keys = vec![
            keys.migration(),
            keys.index(),
            keys.usage(),
            keys.expiry(),
            keys.expiring_sizes(),
        ];
        redis_keys.extend(items.iter().map(|item| keys.legacy_data(item)));
        redis_keys.extend(items.iter().map(|item| keys.data(item)));
        let mut command = MIGRATE_ITEMS.command(&redis_keys);
        command.arg(last.map_or("", String::as_str)).arg(items);
        MIGRATE_ITEMS
            .run(&self.store.inner.client, &command, true)
            .await
    }

    /// The last scan: converts layout 1 items left outside any index, and
    /// merges the keys a server of the previous version wrote since they
    /// were moved, until none is left (the fences excepted).
    async fn finish(&self, report: &mut MigrationReport) -> Result<()> {
        let mut left = String::new();
        for _ in 0..FINISH_SCANS {
            let found = self.scan(true).await?;
            let mut clean = true;
            for (tenant, legacy) in &found {
                let names = legacy.names.iter().any(|name| name != "expiry");
                if names {
                    self.prepare(tenant, legacy, report).await?;
                }
                for items in legacy.item_keys.chunks(self.batch_size) {
                    report.items_converted += self.convert(tenant, items, None).await?;
                }
                if names || legacy.items > 0 {
                    clean = false;
                    left = legacy_prefix(tenant.as_str());
                }
            }
            if clean {
                return Ok(());
            }
        }
        Err(Error::Corrupt {
            key: left,
            reason: format!(
                "layout 1 keys were still found after {FINISH_SCANS} scans: a server of the previous version may still write"
            ),
        })
    }
}
