//! Per-tenant limits ([`Quotas`]): on data (keys, bytes), on the write
//! rate (both enforced by the write script), on the request rate of the
//! tenant and of each API key (enforced by whoever serves requests,
//! through [`TenantKv::admit_request`]), and on the number of API keys.
//!
//! Each tenant's quotas are the store's defaults (or the builder's
//! per-tenant ones), replaced field by field by overrides kept in Redis
//! (`tenant:<id>:quotas`), so an operator changes one tenant's limits on
//! every instance at once ([`TenantKv::set_quota`]). Instances read the
//! overrides at most once per [`QUOTA_REFRESH`] per tenant.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::api_keys::ApiKey;
use crate::audit::audit_record;
use crate::error::{Error, Result};
use crate::keys::{TenantId, TenantKeys};
use crate::ratelimit::{self, Check, Rate, RateLimitStatus};
use crate::store::{Actor, TenantKv};

/// How long an instance uses a tenant's quotas before reading its
/// overrides again: an override takes effect everywhere within this.
pub const QUOTA_REFRESH: Duration = Duration::from_secs(1);
/// Tenants whose quotas an instance keeps at once; past this, the stale
/// ones are forgotten.
const MAX_CACHED_TENANTS: usize = 10_000;
/// The largest rate or burst a quota may set.
const MAX_RATE: u64 = 1_000_000;

/// One of a tenant's limits, by name (its override field in Redis).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Quota {
    /// `max_keys`: items held.
    MaxKeys,
    /// `max_bytes`: bytes of keys, values and metadata held.
    MaxBytes,
    /// `writes_per_second`: item writes per second, on average.
    WritesPerSecond,
    /// `write_burst`: item writes at once above that rate.
    WriteBurst,
    /// `requests_per_second`: requests of the tenant per second.
    RequestsPerSecond,
    /// `request_burst`: requests of the tenant at once.
    RequestBurst,
    /// `api_key_requests_per_second`: requests per second of each API key
    /// without a rate of its own.
    ApiKeyRequestsPerSecond,
    /// `api_key_request_burst`: requests at once of each such API key.
    ApiKeyRequestBurst,
    /// `max_api_keys`: API keys the tenant may hold.
    MaxApiKeys,
}

impl Quota {
    /// Every quota.
    pub const ALL: [Self; 9] = [
        Self::MaxKeys,
        Self::MaxBytes,
        Self::WritesPerSecond,
        Self::WriteBurst,
        Self::RequestsPerSecond,
        Self::RequestBurst,
        Self::ApiKeyRequestsPerSecond,
        Self::ApiKeyRequestBurst,
        Self::MaxApiKeys,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxKeys => "max_keys",
            Self::MaxBytes => "max_bytes",
            Self::WritesPerSecond => "writes_per_second",
            Self::WriteBurst => "write_burst",
            Self::RequestsPerSecond => "requests_per_second",
            Self::RequestBurst => "request_burst",
            Self::ApiKeyRequestsPerSecond => "api_key_requests_per_second",
            Self::ApiKeyRequestBurst => "api_key_request_burst",
            Self::MaxApiKeys => "max_api_keys",
        }
    }

    /// Rates and bursts are 1 to 1,000,000; counts and sizes any number.
    fn check(self, value: Option<u64>) -> Result<()> {
        let rate = !matches!(self, Self::MaxKeys | Self::MaxBytes | Self::MaxApiKeys);
        match value {
            Some(n) if rate && !(1..=MAX_RATE).contains(&n) => Err(Error::InvalidConfig {
                setting: self.as_str(),
                reason: format!("must be 1 to {MAX_RATE}"),
            }),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Quota {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|quota| quota.as_str() == name)
            .ok_or_else(|| Error::InvalidConfig {
                setting: "quota",
                reason: format!(
                    "{name:?} is not one of {}",
                    Self::ALL.map(Self::as_str).join(", ")
                ),
            })
    }
}

/// Limits on one tenant; `None` is no limit. [`Quotas::default`] limits
/// only the number of API keys (100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Quotas {
    /// How many items a tenant may hold.
    pub max_keys: Option<u64>,
    /// How many bytes (keys, values and metadata) a tenant may hold.
    pub max_bytes: Option<u64>,
    /// How many writes per second a tenant may make, on average, shared by
    /// every instance (GCRA, kept in Redis).
    pub writes_per_second: Option<u32>,
    /// How many writes may come at once above that rate. Defaults to one
    /// second's worth.
    pub write_burst: Option<u32>,
    /// How many requests per second the tenant may make, on average
    /// ([`TenantKv::admit_request`]).
    pub requests_per_second: Option<u32>,
    /// How many requests may come at once. Defaults to one second's worth.
    pub request_burst: Option<u32>,
    /// How many requests per second each API key may make, unless it has
    /// a rate of its own.
    pub api_key_requests_per_second: Option<u32>,
    /// How many requests each such key may make at once. Defaults to one
    /// second's worth.
    pub api_key_request_burst: Option<u32>,
    /// How many API keys the tenant may hold.
    pub max_api_keys: Option<u64>,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            max_api_keys: Some(100),
            ..Self::unlimited()
        }
    }
}

impl Quotas {
    /// No limit at all.
    pub fn unlimited() -> Self {
        Self {
            max_keys: None,
            max_bytes: None,
            writes_per_second: None,
            write_burst: None,
            requests_per_second: None,
            request_burst: None,
            api_key_requests_per_second: None,
            api_key_request_burst: None,
            max_api_keys: None,
        }
    }

    /// At most `max_keys` items.
    #[must_use]
    pub fn max_keys(mut self, max_keys: u64) -> Self {
        self.max_keys = Some(max_keys);
        self
    }

    /// At most `max_bytes` bytes of keys, values and metadata.
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// At most `per_second` writes per second on average, and `burst` at once.
    #[must_use]
    pub fn writes_per_second(mut self, per_second: u32, burst: u32) -> Self {
        self.writes_per_second = Some(per_second);
        self.write_burst = Some(burst);
        self
    }

    /// At most `per_second` requests of the tenant per second, `burst` at once.
    #[must_use]
    pub fn requests_per_second(mut self, per_second: u32, burst: u32) -> Self {
        self.requests_per_second = Some(per_second);
        self.request_burst = Some(burst);
        self
    }

    /// At most `per_second` requests per second of each API key without a
    /// rate of its own, `burst` at once.
    #[must_use]
    pub fn api_key_requests_per_second(mut self, per_second: u32, burst: u32) -> Self {
        self.api_key_requests_per_second = Some(per_second);
        self.api_key_request_burst = Some(burst);
        self
    }

    /// At most `max_api_keys` API keys.
    #[must_use]
    pub fn max_api_keys(mut self, max_api_keys: u64) -> Self {
        self.max_api_keys = Some(max_api_keys);
        self
    }

    /// The value of `quota`.
    pub fn get(&self, quota: Quota) -> Option<u64> {
        match quota {
            Quota::MaxKeys => self.max_keys,
            Quota::MaxBytes => self.max_bytes,
            Quota::WritesPerSecond => self.writes_per_second.map(u64::from),
            Quota::WriteBurst => self.write_burst.map(u64::from),
            Quota::RequestsPerSecond => self.requests_per_second.map(u64::from),
            Quota::RequestBurst => self.request_burst.map(u64::from),
            Quota::ApiKeyRequestsPerSecond => self.api_key_requests_per_second.map(u64::from),
            Quota::ApiKeyRequestBurst => self.api_key_request_burst.map(u64::from),
            Quota::MaxApiKeys => self.max_api_keys,
        }
    }

    /// Sets `quota` to `value` (`None`: no limit); rates and bursts must be
    /// 1 to 1,000,000.
    pub fn set(&mut self, quota: Quota, value: Option<u64>) -> Result<()> {
        quota.check(value)?;
        // Checked above: rates fit in a u32.
        let rate = value.map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        match quota {
            Quota::MaxKeys => self.max_keys = value,
            Quota::MaxBytes => self.max_bytes = value,
            Quota::WritesPerSecond => self.writes_per_second = rate,
            Quota::WriteBurst => self.write_burst = rate,
            Quota::RequestsPerSecond => self.requests_per_second = rate,
            Quota::RequestBurst => self.request_burst = rate,
            Quota::ApiKeyRequestsPerSecond => self.api_key_requests_per_second = rate,
            Quota::ApiKeyRequestBurst => self.api_key_request_burst = rate,
            Quota::MaxApiKeys => self.max_api_keys = value,
        }
        Ok(())
    }

    /// Checks every rate and burst.
    pub fn validate(&self) -> Result<()> {
        Quota::ALL
            .into_iter()
            .try_for_each(|quota| quota.check(self.get(quota)))
    }

    pub(crate) fn write_burst(&self) -> u32 {
        self.write_burst
            .or(self.writes_per_second)
            .unwrap_or(1)
            .max(1)
    }

    fn request_rate(&self) -> Option<Rate> {
        let per_second = self.requests_per_second?;
        Some(Rate::per_second(per_second).burst(self.request_burst.unwrap_or(per_second)))
    }

    /// A key's rate: the tenant's rate for keys, or the key's own where
    /// it is lower (a key cannot give itself more than the tenant allows).
    fn api_key_rate(&self, key: &ApiKey) -> Option<Rate> {
        let tenant = self.api_key_requests_per_second.map(|per_second| {
            let burst = self.api_key_request_burst.unwrap_or(per_second);
            Rate::per_second(per_second).burst(burst)
        });
        match (key.requests_per_second, tenant) {
            (Some(own), Some(tenant))
                if tenant.interval_us() >= Rate::per_second(own).interval_us() =>
            {
                Some(tenant)
            }
            (Some(own), _) => Some(Rate::per_second(own)),
            (None, tenant) => tenant,
        }
    }
}

/// Overrides as stored: a number, or `unlimited`.
fn parse_override(quota: Quota, text: &str) -> Result<Option<u64>> {
    if text == "unlimited" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| Error::Corrupt {
        key: quota.as_str().to_owned(),
        reason: format!("the quota override {text:?} is neither a number nor `unlimited`"),
    })
}

/// Each tenant's quotas as last read, with when.
#[derive(Debug, Default)]
pub(crate) struct QuotaCache(Mutex<HashMap<TenantId, (Instant, Quotas)>>);

impl QuotaCache {
    fn get(&self, tenant: &TenantId) -> Option<Quotas> {
        let cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .get(tenant)
            .filter(|(read, _)| read.elapsed() < QUOTA_REFRESH)
            .map(|(_, quotas)| *quotas)
    }

    fn put(&self, tenant: &TenantId, quotas: Quotas) {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if cached.len() >= MAX_CACHED_TENANTS {
            cached.retain(|_, (read, _)| read.elapsed() < QUOTA_REFRESH);
        }
        cached.insert(tenant.clone(), (Instant::now(), quotas));
    }

    fn forget(&self, tenant: &TenantId) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tenant);
    }
}

impl TenantKv {
    /// `tenant`'s quotas now: the defaults, with the overrides stored in
    /// Redis applied (read at most once per [`QUOTA_REFRESH`]).
    pub async fn quotas(&self, tenant: &TenantId) -> Result<Quotas> {
        let settings = &self.inner;
        if let Some(quotas) = settings.quota_cache.get(tenant) {
            return Ok(quotas);
        }
        let mut quotas = settings.default_quotas(tenant);
        for (quota, value) in self.quota_overrides(tenant).await? {
            quotas.set(quota, value)?;
        }
        settings.quota_cache.put(tenant, quotas);
        Ok(quotas)
    }

    /// The overrides stored for `tenant` (`None`: no limit).
    pub async fn quota_overrides(&self, tenant: &TenantId) -> Result<BTreeMap<Quota, Option<u64>>> {
        let stored: HashMap<String, String> = self
            .inner
            .client
            .read(redis::cmd("HGETALL").arg(TenantKeys::new(tenant).quotas()))
            .await?;
        let mut overrides = BTreeMap::new();
        for (name, value) in stored {
            // A field this version does not know is left for the one that does.
            if let Ok(quota) = name.parse::<Quota>() {
                overrides.insert(quota, parse_override(quota, &value)?);
            }
        }
        Ok(overrides)
    }

    /// Stores an override of `tenant`'s `quota` (`None`: no limit), with a
    /// `set_quota` audit record. Every instance applies it within
    /// [`QUOTA_REFRESH`].
    pub async fn set_quota(
        &self,
        tenant: &TenantId,
        quota: Quota,
        value: Option<u64>,
        actor: &Actor,
    ) -> Result<()> {
        quota.check(value)?;
        let text = value.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
        let subject = format!("{quota}={text}");
        let mut pipeline = redis::pipe();
        pipeline
            .atomic()
            .hset(TenantKeys::new(tenant).quotas(), quota.as_str(), &text)
            .ignore()
            .add_command(audit_record(
                &self.inner,
                tenant,
                actor,
                "set_quota",
                &subject,
            ))
            .ignore();
        self.apply_quota_change(tenant, &pipeline).await
    }

    /// Removes `tenant`'s override of `quota`, so the default applies
    /// again, with a `reset_quota` audit record.
    pub async fn reset_quota(&self, tenant: &TenantId, quota: Quota, actor: &Actor) -> Result<()> {
        let mut pipeline = redis::pipe();
        pipeline
            .atomic()
            .hdel(TenantKeys::new(tenant).quotas(), quota.as_str())
            .ignore()
            .add_command(audit_record(
                &self.inner,
                tenant,
                actor,
                "reset_quota",
                quota.as_str(),
            ))
            .ignore();
        self.apply_quota_change(tenant, &pipeline).await
    }

    async fn apply_quota_change(&self, tenant: &TenantId, change: &redis::Pipeline) -> Result<()> {
        let _: () = self.inner.client.query_pipeline(change).await?;
        self.inner.quota_cache.forget(tenant);
        Ok(())
    }

    /// Books one request of `tenant`, made with `api_key` if given, against
    /// the tenant's request rate and the key's (its own, else the
    /// tenant's `api_key_requests_per_second`). Returns the status of the
    /// tightest limit (`None` when none applies: no Redis round trip then),
    /// or [`Error::RequestRateLimited`] with the limit that refused it.
    pub async fn admit_request(
        &self,
        tenant: &TenantId,
        api_key: Option<&ApiKey>,
    ) -> Result<Option<RateLimitStatus>> {
        let quotas = self.quotas(tenant).await?;
        let mut checks = Vec::new();
        if let Some(rate) = quotas.request_rate() {
            let key = TenantKeys::new(tenant).request_rate();
            checks.push(Check {
                policy: "tenant",
                key,
                rate,
            });
        }
        if let Some(key) = api_key
            && let Some(rate) = quotas.api_key_rate(key)
        {
            let key = TenantKeys::new(tenant).api_key_rate(&key.id);
            checks.push(Check {
                policy: "api_key",
                key,
                rate,
            });
        }
        if checks.is_empty() {
            return Ok(None);
        }
        let statuses =
            ratelimit::book(&self.inner.bookkeeping, &self.inner.refusals, &checks).await?;
        Ok(ratelimit::verdict(statuses)?)
    }

    /// The refusal of `tenant`'s request rate still in force, if any: a
    /// request that would be refused whoever made it, known without a
    /// round trip (a server may answer it before looking anything up).
    pub fn request_refused(&self, tenant: &TenantId) -> Option<RateLimitStatus> {
        if !self.inner.refusals.any() {
            return None;
        }
        self.inner.refusals.active(
            &TenantKeys::new(tenant).request_rate(),
            std::time::Instant::now(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_by_name() {
        let mut quotas = Quotas::default();
        assert_eq!(quotas.get(Quota::MaxApiKeys), Some(100));
        for quota in Quota::ALL {
            assert_eq!(quota.as_str().parse::<Quota>().unwrap(), quota);
            quotas.set(quota, Some(7)).unwrap();
            assert_eq!(quotas.get(quota), Some(7), "{quota}");
            quotas.set(quota, None).unwrap();
            assert_eq!(quotas.get(quota), None, "{quota}");
        }
        assert!("max_key".parse::<Quota>().is_err());
        assert!(quotas.set(Quota::RequestsPerSecond, Some(0)).is_err());
        assert!(quotas.set(Quota::WriteBurst, Some(MAX_RATE + 1)).is_err());
        quotas.set(Quota::MaxKeys, Some(0)).unwrap();
        assert_eq!(parse_override(Quota::MaxKeys, "unlimited").unwrap(), None);
        assert_eq!(parse_override(Quota::MaxKeys, "12").unwrap(), Some(12));
        assert!(parse_override(Quota::MaxKeys, "-1").is_err());
    }

    #[test]
    fn an_api_key_rate_of_its_own_wins() {
        let quotas = Quotas::unlimited().api_key_requests_per_second(10, 20);
        let mut key = crate::api_keys::tests::key_with_scopes(vec![]);
        assert_eq!(
            quotas.api_key_rate(&key),
            Some(Rate::per_second(10).burst(20))
        );
        key.requests_per_second = Some(3);
        assert_eq!(quotas.api_key_rate(&key), Some(Rate::per_second(3)));
        assert_eq!(Quotas::unlimited().request_rate(), None);
    }
}
