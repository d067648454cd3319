//! The store's authentication cache: how often a request authenticated
//! without a Redis round trip, and how often the master's invalidations
//! and failovers took records away.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use tenant_kv::{AuthCacheStats, TenantKv};

use super::family::Family;

/// Reads one counter out of the cache's counters.
type Field = fn(&AuthCacheStats) -> u64;

/// The counters: the name after `tenant_kv_auth_cache_` and before
/// `_total`, the help text, and the field.
const COUNTERS: [(&str, &str, Field); 4] = [
    (
        "hits",
        "User and API-key lookups answered from the cache.",
        |s| s.hits,
    ),
    (
        "misses",
        "Lookups that read Redis while the cache served.",
        |s| s.misses,
    ),
    (
        "invalidations",
        "Records invalidated by the master or by this instance's writes.",
        |s| s.invalidations,
    ),
    (
        "drops",
        "Times the whole cache was dropped (new master, lost tracking connection, flush).",
        |s| s.drops,
    ),
];

/// Reads the store's cache at each scrape.
pub(crate) struct AuthCacheCollector {
    store: TenantKv,
    counters: Vec<(Family, Field)>,
    entries: Family,
    serving: Family,
}

impl AuthCacheCollector {
    pub(crate) fn new(store: TenantKv) -> Self {
        let counters = COUNTERS
            .iter()
            .map(|(name, help, field)| {
                let name = format!("tenant_kv_auth_cache_{name}_total");
                (Family::counter(&name, help, &[]), *field)
            })
            .collect();
        Self {
            store,
            counters,
            entries: Family::gauge("tenant_kv_auth_cache_entries", "Records cached.", &[]),
            serving: Family::gauge(
                "tenant_kv_auth_cache_serving",
                "1 while the cache serves (tracking on, for the current master).",
                &[],
            ),
        }
    }
}

impl Collector for AuthCacheCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.counters
            .iter()
            .map(|(family, _)| family)
            .chain([&self.entries, &self.serving])
            .map(Family::desc)
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self.store.auth_cache_stats();
        let mut families: Vec<MetricFamily> = self
            .counters
            .iter()
            .map(|(family, field)| family.single(field(&stats)))
            .collect();
        families.push(self.entries.single(stats.entries as u64));
        families.push(self.serving.single(u64::from(stats.serving)));
        families
    }
}
