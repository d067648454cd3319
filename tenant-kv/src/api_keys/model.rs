//! What an API key is: its scopes, its settings and their bounds, its
//! secret's format, and how it is stored.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
// Named by the docs' links only.
#[cfg(doc)]
use crate::api_keys::ApiKeys;
use crate::item::MAX_TTL;
use crate::keys::{MAX_KEY_LEN, TenantId, check_text};

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

pub(super) const PREFIX: &str = "tkv_";

pub(super) fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Milliseconds since the epoch of `time`.
pub(super) fn time_to_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Checks what a new key may be before anything is stored.
pub(super) fn check_new(new: &NewApiKey) -> Result<()> {
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

pub(super) fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(super) fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// `tkv_<16 hex id>_<32 hex secret><8 hex CRC-32 of what precedes>`.
pub(super) fn format_key(id: &str, secret: &str) -> String {
    let body = format!("{PREFIX}{id}_{secret}");
    format!("{body}{:08x}", crc32fast::hash(body.as_bytes()))
}

/// Whether `id` is a key id: 16 hex digits.
pub(super) fn is_key_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The id of a well-formed key with a valid checksum; `None` for anything
/// else, which is refused without asking Redis.
pub(super) fn parse_key(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret_and_crc) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_key_id(id) || !hex(secret_and_crc, 40) {
        return None;
    }
    let (body, crc) = presented.split_at(presented.len() - 8);
    (format!("{:08x}", crc32fast::hash(body.as_bytes())) == crc).then_some(id)
}

/// A listing cursor: `<created ms>.<key id>`.
pub(super) fn parse_cursor(cursor: &str) -> Result<(u64, String)> {
    cursor
        .split_once('.')
        .and_then(|(ms, id)| Some((ms.parse().ok()?, id.to_owned())).filter(|_| is_key_id(id)))
        .ok_or(Error::InvalidCursor)
}

/// A key from its hash fields; `None` if there is no such key.
pub(super) fn key_from_fields(
    id: &str,
    fields: &HashMap<String, String>,
) -> Result<Option<ApiKey>> {
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
