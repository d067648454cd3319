//! API keys: `tkv_<key id>_<secret><checksum>`, shown once, stored as a
//! SHA-256 hash, scoped, optionally limited to a key prefix, an expiry and
//! a request rate, owned by the user who created them (a disabled owner
//! disables them), rotated with a grace period.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis_failover::Durability;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::keys::{MAX_KEY_LEN, TenantId, TenantKeys, check_text};
use crate::scripts::API_KEY_CREATE;
use crate::store::{Actor, MAX_TTL, TenantKv, audit_record};
use crate::users::User;

/// The longest API key name, in bytes.
pub const MAX_API_KEY_NAME_LEN: usize = 128;
/// The longest a rotated-out secret may stay valid.
pub const MAX_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The most keys one page of [`ApiKeys::list_page`] holds.
pub const MAX_API_KEY_PAGE: usize = 100;

/// What an API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Scope {
    /// Read items.
    Read,
    /// Create and replace items.
    Write,
    /// Delete items.
    Delete,
    /// List keys.
    List,
    /// Manage the tenant's API keys.
    Admin,
}

impl Scope {
    const ALL: [Self; 5] = [
        Self::Read,
        Self::Write,
        Self::Delete,
        Self::List,
        Self::Admin,
    ];

    /// Its name: `read`, `write`, `delete`, `list` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Delete => "delete",
            Self::List => "list",
            Self::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str() == name)
            .ok_or_else(|| Error::InvalidApiKeySettings {
                reason: format!("unknown scope {name:?}"),
            })
    }
}

/// An API key to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewApiKey {
    /// A name for people to recognise it by.
    pub name: String,
    /// What it may do; at least one.
    pub scopes: Vec<Scope>,
    /// If set, the item keys it may touch must start with this.
    pub key_prefix: Option<String>,
    /// How long it is valid (at most [`MAX_TTL`]); `None` until revoked.
    pub ttl: Option<Duration>,
    /// The user it acts for: disabling the user disables the key. `None`
    /// for a key of no user (made by an operator).
    pub owner: Option<String>,
    /// Its own request rate, instead of the tenant's
    /// `api_key_requests_per_second` (1 to 1,000,000).
    pub requests_per_second: Option<u32>,
}

/// An API key as stored, without its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiKey {
    /// Its id, the part between the first two `_` of the key.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: TenantId,
    /// Its name.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The prefix item keys must start with, if any.
    pub key_prefix: Option<String>,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it stops being valid, if ever.
    pub expires_at: Option<SystemTime>,
    /// When it was last used, about (updated at most once a minute).
    pub last_used: Option<SystemTime>,
    /// The user it acts for, if any.
    pub owner: Option<String>,
    /// Its own request rate, if it has one.
    pub requests_per_second: Option<u32>,
}

/// One page of a tenant's API keys, from [`ApiKeys::list_page`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiKeyPage {
    /// Keys, oldest first.
    pub keys: Vec<ApiKey>,
    /// Pass it to get the next page; `None` when the listing is done.
    pub cursor: Option<String>,
}

impl ApiKey {
    /// Whether the key may do `scope` on the item `key` (or, for listing,
    /// under the prefix `key`).
    pub fn allows(&self, scope: Scope, key: &str) -> bool {
        self.scopes.contains(&scope)
            && self
                .key_prefix
                .as_deref()
                .is_none_or(|prefix| key.starts_with(prefix))
    }
}

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
const PREFIX: &str = "tkv_";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn api_key_key(id: &str) -> String {
    format!("api-key:{id}")
}

/// The key's request-rate state.
pub(crate) fn rate_key(id: &str) -> String {
    format!("api-key:{id}:request-rate")
}

/// Checks what a new key may be before anything is stored.
fn check_new(new: &NewApiKey) -> Result<()> {
    let invalid = |reason: String| Err(Error::InvalidApiKeySettings { reason });
    if new.scopes.is_empty() {
        return invalid("a key needs at least one scope".to_owned());
    }
    if new.name.is_empty() || new.name.len() > MAX_API_KEY_NAME_LEN {
        return invalid(format!(
            "a name is 1 to {MAX_API_KEY_NAME_LEN} bytes ({} given)",
            new.name.len()
        ));
    }
    check_text("a name", &new.name).or_else(invalid)?;
    if let Some(prefix) = &new.key_prefix {
        if prefix.len() > MAX_KEY_LEN {
            return invalid(format!("a key prefix is at most {MAX_KEY_LEN} bytes"));
        }
        check_text("a key prefix", prefix).or_else(invalid)?;
    }
    if new.ttl.is_some_and(|ttl| ttl.is_zero() || ttl > MAX_TTL) {
        return invalid(format!(
            "a key lives 1 ms to {} days",
            MAX_TTL.as_secs() / 86_400
        ));
    }
    if new
        .requests_per_second
        .is_some_and(|rate| !(1..=1_000_000).contains(&rate))
    {
        return invalid("a key's request rate is 1 to 1000000 per second".to_owned());
    }
    Ok(())
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// `tkv_<16 hex id>_<32 hex secret><8 hex CRC-32 of what precedes>`.
fn format_key(id: &str, secret: &str) -> String {
    let body = format!("{PREFIX}{id}_{secret}");
    format!("{body}{:08x}", crc32fast::hash(body.as_bytes()))
}

/// The id of a well-formed key with a valid checksum; `None` for anything
/// else, which is refused without asking Redis.
fn parse_key(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret_and_crc) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(id, 16) || !hex(secret_and_crc, 40) {
        return None;
    }
    let (body, crc) = presented.split_at(presented.len() - 8);
    (format!("{:08x}", crc32fast::hash(body.as_bytes())) == crc).then_some(id)
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
        let settings = &self.store.inner;
        let max_keys = self.store.quotas(tenant).await?.max_api_keys;
        let mut command = API_KEY_CREATE.command(&[
            TenantKeys::new(tenant).api_keys(),
            api_key_key(&id),
            TenantKeys::new(tenant).audit(),
        ]);
        command
            .arg(max_keys.map_or_else(String::new, |n| n.to_string()))
            .arg(&id)
            .arg(settings.audit_max_len)
            .arg(tenant.as_str())
            .arg(actor.as_str());
        for (field, value) in &fields {
            command.arg(*field).arg(value);
        }
        let held: i64 = API_KEY_CREATE.run(self.client(), &command, false).await?;
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

    async fn load(&self, id: &str) -> Result<Option<(ApiKey, HashMap<String, String>)>> {
        let fields: HashMap<String, String> = self
            .client()
            .query(redis::cmd("HGETALL").arg(api_key_key(id)))
            .await?;
        Ok(key_from_fields(id, &fields)?.map(|key| (key, fields)))
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
        let (key, fields) = self.load(id).await?.ok_or(Error::InvalidApiKey)?;
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
            .client()
            .with_durability(Durability::Master)
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
        match self.load(id).await? {
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
        let (key, fields) = match self.load(id).await? {
            Some((key, fields)) if key.tenant == *tenant => (key, fields),
            _ => return Err(Error::UnknownApiKey { id: id.to_owned() }),
        };
        let presented = format_key(id, &random_hex(16));
        let until = now_ms().saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        let _: () = self
            .client()
            .query_pipeline(
                redis::pipe()
                    .atomic()
                    .hset_multiple(
                        api_key_key(id),
                        &[
                            ("hash", sha256_hex(&presented)),
                            (
                                "previous_hash",
                                fields.get("hash").cloned().unwrap_or_default(),
                            ),
                            ("previous_until", until.to_string()),
                        ],
                    )
                    .ignore()
                    .add_command(audit_record(
                        &self.store.inner,
                        tenant,
                        actor,
                        "rotate_api_key",
                        id,
                    ))
                    .ignore(),
            )
            .await?;
        Ok((key, presented))
    }

    /// Revokes `tenant`'s key `id` at once.
    pub async fn revoke(&self, tenant: &TenantId, id: &str, actor: &Actor) -> Result<()> {
        self.get(tenant, id).await?;
        let _: () = self
            .client()
            .query_pipeline(
                redis::pipe()
                    .atomic()
                    .del(api_key_key(id))
                    .ignore()
                    .srem(TenantKeys::new(tenant).api_keys(), id)
                    .ignore()
                    .add_command(audit_record(
                        &self.store.inner,
                        tenant,
                        actor,
                        "delete_api_key",
                        id,
                    ))
                    .ignore(),
            )
            .await?;
        Ok(())
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
        let mut pipeline = redis::pipe();
        for id in &ids {
            pipeline.cmd("HGETALL").arg(api_key_key(id));
        }
        let all: Vec<HashMap<String, String>> = self.client().query_pipeline(&pipeline).await?;
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
                    .is_none_or(|(ms, id)| (key_ms(key), &key.id) > (*ms, id))
            })
            .collect();
        let more = keys.len() > limit;
        keys.truncate(limit);
        let cursor = more
            .then(|| keys.last().map(|key| format!("{}.{}", key_ms(key), key.id)))
            .flatten();
        Ok(ApiKeyPage { keys, cursor })
    }
}

fn key_ms(key: &ApiKey) -> u64 {
    key.created_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A listing cursor: `<created ms>.<key id>`.
fn parse_cursor(cursor: &str) -> Result<(u64, String)> {
    cursor
        .split_once('.')
        .and_then(|(ms, id)| {
            let hex = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
            Some((ms.parse().ok()?, id.to_owned())).filter(|_| hex)
        })
        .ok_or(Error::InvalidCursor)
}

/// A key from its hash fields; `None` if there is no such key.
fn key_from_fields(id: &str, fields: &HashMap<String, String>) -> Result<Option<ApiKey>> {
    let Some(tenant) = fields.get("tenant") else {
        return Ok(None);
    };
    let number = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok());
    Ok(Some(ApiKey {
        id: id.to_owned(),
        tenant: TenantId::new(tenant.clone())?,
        name: fields.get("name").cloned().unwrap_or_default(),
        scopes: fields
            .get("scopes")
            .map(|s| s.split(',').filter_map(|s| s.parse().ok()).collect())
            .unwrap_or_default(),
        key_prefix: fields.get("key_prefix").cloned(),
        created_at: ms_to_time(number("created").unwrap_or(0)),
        expires_at: number("expires").map(ms_to_time),
        last_used: number("last_used").map(ms_to_time),
        owner: fields.get("owner").cloned(),
        requests_per_second: number("requests_per_second")
            .and_then(|rate| u32::try_from(rate).ok()),
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn keys_carry_their_id_and_a_checksum() {
        let key = format_key("0123456789abcdef", "00112233445566778899aabbccddeeff");
        assert!(key.starts_with("tkv_0123456789abcdef_"));
        assert_eq!(key.len(), 4 + 16 + 1 + 32 + 8);
        assert_eq!(parse_key(&key), Some("0123456789abcdef"));
        let mut typo = key.clone().into_bytes();
        typo[30] = if typo[30] == b'0' { b'1' } else { b'0' };
        assert_eq!(parse_key(&String::from_utf8(typo).unwrap()), None);
        for bad in ["", "tkv_", "tkv_x_y", "sk_live_abc", &key[..key.len() - 1]] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }

    pub(crate) fn key_with_scopes(scopes: Vec<Scope>) -> ApiKey {
        ApiKey {
            id: "0123456789abcdef".into(),
            tenant: TenantId::new("t").unwrap(),
            name: "ci".into(),
            scopes,
            key_prefix: None,
            created_at: UNIX_EPOCH,
            expires_at: None,
            last_used: None,
            owner: None,
            requests_per_second: None,
        }
    }

    #[test]
    fn new_keys_are_bounded() {
        let new = |name: &str, prefix: Option<&str>, ttl: Option<Duration>, rate: Option<u32>| {
            NewApiKey {
                name: name.to_owned(),
                scopes: vec![Scope::Read],
                key_prefix: prefix.map(str::to_owned),
                ttl,
                owner: None,
                requests_per_second: rate,
            }
        };
        assert!(
            check_new(&new(
                "ci",
                Some("a/"),
                Some(Duration::from_secs(60)),
                Some(5)
            ))
            .is_ok()
        );
        let too_long = "n".repeat(MAX_API_KEY_NAME_LEN + 1);
        let long_prefix = "p".repeat(MAX_KEY_LEN + 1);
        for bad in [
            new("", None, None, None),
            new(&too_long, None, None, None),
            new("a\u{1b}[31m", None, None, None),
            new("ci", Some(&long_prefix), None, None),
            new("ci", Some("a\n"), None, None),
            new("ci", None, Some(MAX_TTL + Duration::from_secs(1)), None),
            new("ci", None, None, Some(0)),
        ] {
            assert!(
                matches!(check_new(&bad), Err(Error::InvalidApiKeySettings { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            check_new(&NewApiKey {
                scopes: vec![],
                ..new("ci", None, None, None)
            }),
            Err(Error::InvalidApiKeySettings { .. })
        ));
        assert_eq!(
            parse_cursor("17.0123456789abcdef").unwrap(),
            (17, "0123456789abcdef".to_owned())
        );
        for bad in [
            "",
            "17",
            "x.0123456789abcdef",
            "17.0123",
            "17.0123456789abcdeg",
        ] {
            assert!(
                matches!(parse_cursor(bad), Err(Error::InvalidCursor)),
                "{bad}"
            );
        }
    }

    #[test]
    fn scopes_and_prefixes_limit_a_key() {
        let key = ApiKey {
            key_prefix: Some("public/".into()),
            ..key_with_scopes(vec![Scope::Read, Scope::List])
        };
        assert!(key.allows(Scope::Read, "public/a"));
        assert!(!key.allows(Scope::Read, "private/a"));
        assert!(!key.allows(Scope::Write, "public/a"));
        assert_eq!("list".parse::<Scope>().unwrap(), Scope::List);
        assert!("root".parse::<Scope>().is_err());
    }
}
