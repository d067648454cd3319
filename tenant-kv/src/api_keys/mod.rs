//! API keys: `tkv_<key id>_<secret><checksum>`, shown once, stored as a
//! SHA-256 hash, scoped, optionally limited to a key prefix, an expiry and
//! a request rate, owned by the user who created them (a disabled owner
//! disables them), rotated with a grace period.

mod model;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use subtle::ConstantTimeEq;

use crate::audit::audit_record;
use crate::auth_cache::{API_KEY_PREFIX, Fields};
use crate::error::{Error, Result};
use crate::keys::{TenantId, TenantKeys};
use crate::scripts::{API_KEY_CREATE, API_KEY_ROTATE};
use crate::slots;
use crate::store::{Actor, TenantKv};
use crate::users::User;
#[cfg(test)]
pub(crate) use model::tests;
pub use model::{
    ApiKey, ApiKeyPage, MAX_API_KEY_NAME_LEN, MAX_API_KEY_PAGE, MAX_ROTATION_GRACE, NewApiKey,
    Scope,
};
use model::{
    check_new, format_key, is_key_id, key_from_fields, ms_to_time, parse_cursor, parse_key,
    random_hex, sha256_hex, time_to_ms,
};

/// The API keys of every tenant, from [`TenantKv::api_keys`].
#[derive(Debug)]
pub struct ApiKeys {
    store: TenantKv,
    /// When each key's `last_used` was last written, to write it at most
    /// once per [`LAST_USED_EVERY`].
    last_used_written: Mutex<HashMap<String, Instant>>,
}

/// How often a key's `last_used` is written at most.
const LAST_USED_EVERY: Duration = Duration::from_secs(60);
fn now_ms() -> u64 {
    time_to_ms(SystemTime::now())
}

fn api_key_key(id: &str) -> String {
    [API_KEY_PREFIX, id].concat()
}

impl TenantKv {
    /// The API keys of every tenant.
    pub fn api_keys(&self) -> ApiKeys {
        ApiKeys {
            store: self.clone(),
            last_used_written: Mutex::default(),
        }
    }
}

impl ApiKeys {
    fn client(&self) -> &redis_failover::FailoverClient {
        &self.store.inner.client
    }

    /// Creates a key for `tenant`; returns it with its secret form, shown
    /// this once (only its hash is stored). Fails with
    /// [`Error::QuotaExceeded`] (`api_keys`) when the tenant holds its
    /// `max_api_keys` already.
    pub async fn create(
        &self,
        tenant: &TenantId,
        new: NewApiKey,
        actor: &Actor,
    ) -> Result<(ApiKey, String)> {
        check_new(&new)?;
        let (id, secret) = (random_hex(8), random_hex(16));
        let presented = format_key(&id, &secret);
        let created = now_ms();
        let expires = new
            .ttl
            .map(|ttl| created.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)));
        let scopes: Vec<&str> = new.scopes.iter().map(|s| s.as_str()).collect();
        let mut fields = vec![
            ("tenant", tenant.to_string()),
            ("name", new.name.clone()),
            ("scopes", scopes.join(",")),
            ("hash", sha256_hex(&presented)),
            ("created", created.to_string()),
        ];
        let optional = [
            ("key_prefix", new.key_prefix.clone()),
            ("expires", expires.map(|e| e.to_string())),
            ("owner", new.owner.clone()),
            (
                "requests_per_second",
                new.requests_per_second.map(|r| r.to_string()),
            ),
        ];
        fields.extend(optional.into_iter().filter_map(|(f, v)| Some((f, v?))));
        let max_keys = self.store.quotas(tenant).await?.max_api_keys;
        let held = self.claim(tenant, &id, &fields, max_keys, actor).await?;
        if held >= 0 {
            return Err(Error::QuotaExceeded {
                what: "api_keys",
                limit: max_keys.unwrap_or(0),
                would_be: held.unsigned_abs() + 1,
            });
        }
        let key = ApiKey {
            id,
            tenant: tenant.clone(),
            name: new.name,
            scopes: new.scopes,
            key_prefix: new.key_prefix,
            created_at: ms_to_time(created),
            expires_at: expires.map(ms_to_time),
            last_used: None,
            owner: new.owner,
            requests_per_second: new.requests_per_second,
        };
        Ok((key, presented))
    }

    /// Records the key `id` with `fields` and lists it in `tenant`'s set,
    /// with its audit record, unless the tenant holds `max_keys` already
    /// (expired keys revoked first): -1 once done, else how many it holds.
    async fn claim(
        &self,
        tenant: &TenantId,
        id: &str,
        fields: &[(&str, String)],
        max_keys: Option<u64>,
        actor: &Actor,
    ) -> Result<i64> {
        let keys = TenantKeys::new(tenant);
        let mut script_keys = vec![keys.api_keys(), keys.audit()];
        // On a cluster the record lies in another slot than the tenant's
        // set: it is written first and dropped if the script refuses or
        // fails. Nobody knows its secret until this returns, so a record
        // left behind by a crash opens nothing.
        let cluster = self.client().is_cluster();
        if cluster {
            let () = self
                .client()
                .query_idempotent(redis::cmd("HSET").arg(api_key_key(id)).arg(fields))
                .await?;
        } else {
            script_keys.push(api_key_key(id));
        }
        let mut command = API_KEY_CREATE.command(&script_keys);
        command
            .arg(max_keys.map_or_else(String::new, |n| n.to_string()))
            .arg(id)
            .arg(self.store.inner.audit_max_len)
            .arg(tenant.as_str())
            .arg(actor.as_str());
        if !cluster {
            command.arg(fields);
        }
        let run = || API_KEY_CREATE.run::<i64>(self.client(), &command, false);
        let mut held = run().await;
        // Expired keys still count until revoked: revoke them, then try again.
        if matches!(held, Ok(n) if n >= 0) && self.revoke_expired(tenant).await? > 0 {
            held = run().await;
        }
        if cluster && !matches!(held, Ok(-1)) {
            let _: redis_failover::Result<u64> = self.client().del(&api_key_key(id)).await;
        }
        held
    }

    /// The key `id` and its fields; with `cached`, from the authentication
    /// cache when it serves ([`TenantKv::cache_auth`]).
    async fn load(&self, id: &str, cached: bool) -> Result<Option<(ApiKey, Fields)>> {
        // An id is 16 hex digits: anything else names no key (and no other
        // Redis key either).
        if !is_key_id(id) {
            return Ok(None);
        }
        let fields: Fields = if cached {
            let inner = &self.store.inner;
            inner
                .auth_cache
                .fetch(&inner.client, &api_key_key(id))
                .await?
        } else {
            let fields: HashMap<String, String> = self
                .client()
                .query(redis::cmd("HGETALL").arg(api_key_key(id)))
                .await?;
            Arc::new(fields)
        };
        Ok(key_from_fields(id, &fields)?.map(|key| (key, fields)))
    }

    /// Forgets the key `id` in this process at once (other instances hear
    /// of the change from the master).
    fn forget(&self, id: &str) {
        self.store
            .inner
            .auth_cache
            .invalidate([api_key_key(id).as_str()]);
    }

    /// The key `presented` stands for, if it is valid now: well formed, its
    /// hash matching (compared in constant time) the current secret or,
    /// within a rotation's grace period, the previous one, not expired,
    /// and its owner (if it has one) not disabled. Anything else is
    /// [`Error::InvalidApiKey`].
    pub async fn verify(&self, presented: &str) -> Result<ApiKey> {
        self.verify_with_owner(presented).await.map(|(key, _)| key)
    }

    /// Like [`verify`](Self::verify), and returns the key's owner as well
    /// (whose rights, such as [`User::admin`], the key acts with).
    pub async fn verify_with_owner(&self, presented: &str) -> Result<(ApiKey, Option<User>)> {
        let id = parse_key(presented).ok_or(Error::InvalidApiKey)?;
        let (key, fields) = self.load(id, true).await?.ok_or(Error::InvalidApiKey)?;
        let hash = sha256_hex(presented);
        let matches = |field: &str| {
            fields
                .get(field)
                .is_some_and(|stored| bool::from(stored.as_bytes().ct_eq(hash.as_bytes())))
        };
        let now = now_ms();
        let previous_valid = fields
            .get("previous_until")
            .and_then(|t| t.parse::<u64>().ok())
            .is_some_and(|until| now < until);
        let current = matches("hash");
        let valid = (current || (previous_valid && matches("previous_hash")))
            && key.expires_at.is_none_or(|at| SystemTime::now() < at);
        if !valid {
            return Err(Error::InvalidApiKey);
        }
        let owner = match &key.owner {
            None => None,
            Some(name) => match self.store.users().get(name).await {
                Ok(user) if !user.disabled && user.tenant == key.tenant => Some(user),
                // Disabled, gone, or moved: the key goes with its owner.
                Ok(_) | Err(Error::UnknownUser { .. } | Error::InvalidUser { .. }) => {
                    return Err(Error::InvalidApiKey);
                }
                Err(other) => return Err(other),
            },
        };
        self.touch(id).await;
        Ok((key, owner))
    }

    /// Writes `last_used`, at most once per minute per key and process.
    async fn touch(&self, id: &str) {
        {
            let mut written = self
                .last_used_written
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if written
                .get(id)
                .is_some_and(|at| at.elapsed() < LAST_USED_EVERY)
            {
                return;
            }
            written.insert(id.to_owned(), Instant::now());
        }
        // Best effort: a lost update only leaves `last_used` a little old,
        // so it never waits for replicas, whatever the client's durability.
        let _: Result<(), _> = self
            .store
            .inner
            .bookkeeping
            .query(
                redis::cmd("HSET")
                    .arg(api_key_key(id))
                    .arg("last_used")
                    .arg(now_ms()),
            )
            .await;
    }

    /// `tenant`'s key `id`; [`Error::UnknownApiKey`] if it has none such.
    pub async fn get(&self, tenant: &TenantId, id: &str) -> Result<ApiKey> {
        match self.load(id, true).await? {
            Some((key, _)) if key.tenant == *tenant => Ok(key),
            _ => Err(Error::UnknownApiKey { id: id.to_owned() }),
        }
    }

    /// Gives `tenant`'s key `id` a new secret, returned in full; the old
    /// one stays valid for `grace` (0 to revoke it at once; at most
    /// [`MAX_ROTATION_GRACE`]).
    pub async fn rotate(
        &self,
        tenant: &TenantId,
        id: &str,
        grace: Duration,
        actor: &Actor,
    ) -> Result<(ApiKey, String)> {
        if grace > MAX_ROTATION_GRACE {
            return Err(Error::InvalidApiKeySettings {
                reason: format!(
                    "a rotation's grace period is at most {} s",
                    MAX_ROTATION_GRACE.as_secs()
                ),
            });
        }
        // Not from the cache: the script checks the hash read here.
        let (key, fields) = match self.load(id, false).await? {
            Some((key, fields)) if key.tenant == *tenant => (key, fields),
            _ => return Err(Error::UnknownApiKey { id: id.to_owned() }),
        };
        let presented = format_key(id, &random_hex(16));
        let until = now_ms().saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        let mut keys = vec![api_key_key(id)];
        if self.client().is_cluster() {
            // The record first, in its own slot: a rotation whose script
            // then fails or is refused leaves a record of a rotation that
            // did not happen, never a secret handed out unrecorded.
            let record = audit_record(&self.store.inner, tenant, actor, "rotate_api_key", id);
            let _: String = self.client().query(&record).await?;
        } else {
            keys.push(TenantKeys::new(tenant).audit());
        }
        let mut command = API_KEY_ROTATE.command(&keys);
        command
            .arg(fields.get("hash").map_or("", String::as_str))
            .arg(sha256_hex(&presented))
            .arg(until)
            .arg(self.store.inner.audit_max_len)
            .arg(tenant.as_str())
            .arg(actor.as_str())
            .arg(id);
        let rotated = API_KEY_ROTATE.run(self.client(), &command, false).await;
        self.forget(id);
        let rotated: u8 = rotated?;
        if rotated == 0 {
            return Err(Error::ApiKeyChanged { id: id.to_owned() });
        }
        Ok((key, presented))
    }

    /// Revokes `tenant`'s expired keys, each with an `expire_api_key` audit
    /// record by the system; returns how many.
    async fn revoke_expired(&self, tenant: &TenantId) -> Result<usize> {
        let now = SystemTime::now();
        let expired: Vec<ApiKey> = self
            .list(tenant)
            .await?
            .into_iter()
            .filter(|key| key.expires_at.is_some_and(|at| at <= now))
            .collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = expired.iter().map(|key| key.id.as_str()).collect();
        let revoked = self
            .remove(tenant, &ids, &Actor::system(), "expire_api_key")
            .await;
        for key in &expired {
            self.forget(&key.id);
        }
        revoked?;
        Ok(expired.len())
    }

    /// Revokes `tenant`'s key `id` at once.
    pub async fn revoke(&self, tenant: &TenantId, id: &str, actor: &Actor) -> Result<()> {
        self.get(tenant, id).await?;
        let revoked = self.remove(tenant, &[id], actor, "delete_api_key").await;
        self.forget(id);
        revoked?;
        Ok(())
    }

    /// Deletes `tenant`'s keys `ids`, out of its set, each with an
    /// `action` audit record: all in one transaction with one master. On a
    /// cluster, the set and records first, then each key's record in its
    /// own slot: a failure between them leaves a key unlisted but still
    /// known to [`get`](Self::get), so revoking it again finishes the job.
    async fn remove(
        &self,
        tenant: &TenantId,
        ids: &[&str],
        actor: &Actor,
        action: &str,
    ) -> redis_failover::Result<()> {
        let mut listed = redis::pipe();
        for id in ids {
            listed
                .srem(TenantKeys::new(tenant).api_keys(), id)
                .ignore()
                .add_command(audit_record(&self.store.inner, tenant, actor, action, id))
                .ignore();
        }
        let mut parts = vec![listed];
        parts.extend(ids.iter().map(|id| {
            let mut record = redis::pipe();
            record.del(api_key_key(id)).ignore();
            record
        }));
        slots::apply(self.client(), parts).await
    }

    /// `tenant`'s keys, oldest first, without secrets.
    pub async fn list(&self, tenant: &TenantId) -> Result<Vec<ApiKey>> {
        let ids: Vec<String> = self
            .client()
            .query(redis::cmd("SMEMBERS").arg(TenantKeys::new(tenant).api_keys()))
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let reads = ids
            .iter()
            .map(|id| redis::cmd("HGETALL").arg(api_key_key(id)).clone())
            .collect();
        let all: Vec<HashMap<String, String>> = slots::read_all(self.client(), reads).await?;
        let mut keys = Vec::with_capacity(ids.len());
        for (id, fields) in ids.iter().zip(all) {
            // A key revoked meanwhile is left out.
            if let Some(key) = key_from_fields(id, &fields)? {
                keys.push(key);
            }
        }
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(keys)
    }

    /// Up to `limit` (at most [`MAX_API_KEY_PAGE`]) of `tenant`'s keys,
    /// oldest first, after `cursor` (from the previous page): every key
    /// for `owner` `None`, else only those whose owner is `owner`
    /// (`Some(None)`: keys of no user). A cursor names a position, not a
    /// key, so keys revoked meanwhile do not break it.
    pub async fn list_page(
        &self,
        tenant: &TenantId,
        owner: Option<Option<&str>>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<ApiKeyPage> {
        let after = cursor.map(parse_cursor).transpose()?;
        let limit = limit.clamp(1, MAX_API_KEY_PAGE);
        let mut keys: Vec<ApiKey> = self
            .list(tenant)
            .await?
            .into_iter()
            .filter(|key| owner.is_none_or(|owner| key.owner.as_deref() == owner))
            .filter(|key| {
                after
                    .as_ref()
                    .is_none_or(|(ms, id)| (time_to_ms(key.created_at), &key.id) > (*ms, id))
            })
            .collect();
        let more = keys.len() > limit;
        keys.truncate(limit);
        let cursor = more
            .then(|| {
                keys.last()
                    .map(|key| format!("{}.{}", time_to_ms(key.created_at), key.id))
            })
            .flatten();
        Ok(ApiKeyPage { keys, cursor })
    }
}
