//! The request and response bodies of the public API, as types: the
//! handlers read and answer exactly these, and the OpenAPI document is
//! derived from them (with the constraints the store enforces), so the
//! two cannot drift. `openapi::tests` checks the constraints against the
//! store's own limits.
//!
//! Lengths are the store's, in bytes of UTF-8; JSON Schema counts
//! characters, so text outside ASCII may be refused before its
//! `maxLength`. Patterns leave out the characters the store refuses in
//! keys, names and prefixes (control and bidirectional formatting ones,
//! see `tenant_kv::is_unsafe_char`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tenant_kv::{ApiKey, Item, Scope};
use utoipa::ToSchema;

use crate::http::Rfc3339;

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorDetail,
}

/// What went wrong.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable, for programs: `bad_request`, `invalid_key`, `not_found`, ...
    pub(crate) code: String,
    /// For people.
    pub(crate) message: String,
}

/// A whole number, also written as one with a zero fraction (`3.0`): JSON
/// Schema's `integer` admits both, and so do clients that hold numbers as
/// floats. `null` is none.
fn whole<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    Option::<serde_json::Number>::deserialize(deserializer)?
        .map(whole_number)
        .transpose()
}

/// [`whole`], where `null` is refused.
fn whole_required<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    whole_number(serde_json::Number::deserialize(deserializer)?)
}

fn whole_number<T: TryFrom<u64>, E: serde::de::Error>(number: serde_json::Number) -> Result<T, E> {
    let whole = number.as_u64().or_else(|| {
        // Below 2^53 every integer is exact as a float.
        number
            .as_f64()
            .filter(|x| x.fract() == 0.0 && (0.0..9_007_199_254_740_992.0).contains(x))
            .map(|x| x as u64)
    });
    whole
        .and_then(|whole| T::try_from(whole).ok())
        .ok_or_else(|| E::custom(format!("expected a whole number in range, not {number}")))
}

/// A list of JSON objects: serde would also read a struct, or a tagged
/// enum, from an array of its fields, which the document does not allow.
fn objects<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    Vec::<Map<String, Value>>::deserialize(deserializer)?
        .into_iter()
        .map(|object| {
            serde_json::from_value(Value::Object(object)).map_err(serde::de::Error::custom)
        })
        .collect()
}

/// A login, as a form or as JSON.
#[derive(Deserialize, ToSchema)]
pub(crate) struct Login {
    #[schema(pattern = "^[A-Za-z0-9_.@-]{1,64}$", min_length = 1, max_length = 64)]
    pub(crate) username: String,
    /// 1 to 1024 bytes.
    #[schema(min_length = 1, max_length = 1024)]
    pub(crate) password: String,
}

/// A token to send as `Authorization: Bearer <access_token>`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Token {
    pub(crate) access_token: String,
    pub(crate) token_type: TokenType,
    /// Seconds until it expires.
    pub(crate) expires_in: u64,
}

/// Always `bearer`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TokenType {
    Bearer,
}

/// The logged-in user.
#[derive(Serialize, ToSchema)]
pub(crate) struct UserInfo {
    pub(crate) username: String,
    pub(crate) tenant_id: String,
    pub(crate) email: Option<String>,
    pub(crate) full_name: Option<String>,
    pub(crate) disabled: bool,
    /// Manages every API key of the tenant.
    pub(crate) admin: bool,
}

/// The tenant's usage and the quotas it is held to.
#[derive(Serialize, ToSchema)]
pub(crate) struct UsageReport {
    pub(crate) tenant_id: String,
    pub(crate) usage: UsageFigures,
    /// Each quota's value by name, `null` for no limit.
    pub(crate) quotas: BTreeMap<String, Option<u64>>,
}

/// What the tenant holds.
#[derive(Serialize, ToSchema)]
pub(crate) struct UsageFigures {
    /// Items.
    pub(crate) keys: u64,
    /// Bytes of keys, values and metadata.
    pub(crate) bytes: u64,
}

/// The body of `POST /data` and `PUT /data/{key}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"value": {"text": "hello"}, "ttl": 3600, "metadata": {"lang": "en"}}))]
pub(crate) struct ItemInput {
    /// Any JSON value, at most 1 MiB as JSON text.
    pub(crate) value: Value,
    /// Seconds the item lives (at most 100 years); for ever without.
    #[serde(default, deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 3_153_600_000_u64)]
    pub(crate) ttl: Option<u64>,
    /// Kept beside the value, at most 8 KiB as JSON text.
    #[serde(default)]
    pub(crate) metadata: Option<Map<String, Value>>,
}

/// A stored item.
// Its value is parsed (`Value`) where the handler has it so, or the JSON
// text as stored (`RawValue`) where it reads the item only to answer it.
#[derive(Serialize, ToSchema)]
#[schema(as = Item)]
pub(crate) struct ItemView<V = Value> {
    pub(crate) key: String,
    #[schema(value_type = Value)]
    pub(crate) value: V,
    pub(crate) metadata: Option<Map<String, Value>>,
    /// Bumped by every write; the ETag is this number, quoted.
    pub(crate) version: u64,
    #[schema(value_type = String, format = DateTime)]
    pub(crate) created_at: Rfc3339,
    #[schema(value_type = String, format = DateTime)]
    pub(crate) updated_at: Rfc3339,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub(crate) expires_at: Option<Rfc3339>,
}

impl<V> From<Item<V>> for ItemView<V> {
    fn from(item: Item<V>) -> Self {
        Self {
            created_at: Rfc3339(item.created_at),
            updated_at: Rfc3339(item.updated_at),
            expires_at: item.expires_at.map(Rfc3339),
            key: item.key,
            value: item.value,
            metadata: item.metadata,
            version: item.version,
        }
    }
}

/// A deleted item.
#[derive(Serialize, ToSchema)]
pub(crate) struct Deleted {
    pub(crate) key: String,
    /// Always `true`.
    pub(crate) deleted: bool,
    /// The version the deletion took.
    pub(crate) version: u64,
}

/// A page of keys, in byte order.
#[derive(Serialize, ToSchema)]
pub(crate) struct Page {
    pub(crate) keys: Vec<String>,
    /// Pass it as `cursor` for the next page; `null` on the last one.
    pub(crate) cursor: Option<String>,
}

/// Several writes, all done or none; each key at most once (JSON Schema
/// cannot say so: the server answers 400).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"operations": [
    {"op": "put", "key": "greeting", "value": "hi"},
    {"op": "delete", "key": "old", "if_version": 3}]}))]
pub(crate) struct BatchInput {
    /// 1 to the server's `max_batch` operations (100 unless configured).
    #[serde(deserialize_with = "objects")]
    #[schema(min_items = 1, max_items = 100)]
    pub(crate) operations: Vec<BatchOperation>,
}

/// One write of a batch, by `op`. A version is at most 2^63 - 1, as
/// Redis counts.
#[derive(Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum BatchOperation {
    /// Creates the item; fails (409) if it exists.
    Create {
        #[schema(
            min_length = 1,
            max_length = 1024,
            pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200e\\u200f\\u2028-\\u202e\\u2066-\\u2069]+$"
        )]
        key: String,
        /// Any JSON value.
        value: Value,
        /// Seconds.
        #[serde(default, deserialize_with = "whole")]
        #[schema(minimum = 1, maximum = 3_153_600_000_u64)]
        ttl: Option<u64>,
        #[serde(default)]
        metadata: Option<Map<String, Value>>,
    },
    /// Replaces the item, which must exist (at `if_version`, if given).
    Put {
        #[schema(
            min_length = 1,
            max_length = 1024,
            pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200e\\u200f\\u2028-\\u202e\\u2066-\\u2069]+$"
        )]
        key: String,
        /// Any JSON value.
        value: Value,
        /// Seconds.
        #[serde(default, deserialize_with = "whole")]
        #[schema(minimum = 1, maximum = 3_153_600_000_u64)]
        ttl: Option<u64>,
        #[serde(default)]
        metadata: Option<Map<String, Value>>,
        /// The version the item must have.
        #[serde(default, deserialize_with = "whole")]
        #[schema(minimum = 0)]
        if_version: Option<i64>,
    },
    /// Deletes the item, which must exist (at `if_version`, if given).
    Delete {
        #[schema(
            min_length = 1,
            max_length = 1024,
            pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200e\\u200f\\u2028-\\u202e\\u2066-\\u2069]+$"
        )]
        key: String,
        /// The version the item must have.
        #[serde(default, deserialize_with = "whole")]
        #[schema(minimum = 0)]
        if_version: Option<i64>,
    },
}

/// What each operation of a batch did, in order.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchResult {
    pub(crate) results: Vec<BatchOutcome>,
}

/// The item as stored, or its deletion.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum BatchOutcome {
    Stored(ItemView),
    Deleted(Deleted),
}

/// A scope of an API key.
#[derive(Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ScopeName {
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

impl From<ScopeName> for Scope {
    fn from(scope: ScopeName) -> Self {
        match scope {
            ScopeName::Read => Self::Read,
            ScopeName::Write => Self::Write,
            ScopeName::Delete => Self::Delete,
            ScopeName::List => Self::List,
            ScopeName::Admin => Self::Admin,
        }
    }
}

impl ScopeName {
    /// `None` for a scope this server does not name (the store's list is
    /// open to additions).
    fn of(scope: Scope) -> Option<Self> {
        [
            Self::Read,
            Self::Write,
            Self::Delete,
            Self::List,
            Self::Admin,
        ]
        .into_iter()
        .find(|name| Scope::from(*name) == scope)
    }
}

/// The settings of a new API key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "ci", "scopes": ["read", "list"], "key_prefix": "reports/", "ttl": 86400}))]
pub(crate) struct ApiKeyInput {
    /// For people to recognise the key by: 1 to 128 bytes.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200e\\u200f\\u2028-\\u202e\\u2066-\\u2069]+$"
    )]
    pub(crate) name: String,
    /// What it may do; `read`, `write`, `delete` and `list` without.
    #[serde(default)]
    #[schema(min_items = 1)]
    pub(crate) scopes: Option<Vec<ScopeName>>,
    /// The key may only touch items whose key starts with this.
    #[serde(default)]
    #[schema(
        max_length = 1024,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200e\\u200f\\u2028-\\u202e\\u2066-\\u2069]*$"
    )]
    pub(crate) key_prefix: Option<String>,
    /// Seconds until it expires (at most 100 years); never without.
    #[serde(default, deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 3_153_600_000_u64)]
    pub(crate) ttl: Option<u64>,
    /// Its own request rate, instead of the tenant's default for keys.
    #[serde(default, deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub(crate) requests_per_second: Option<u32>,
}

/// The body of a rotation, which may be left out.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateInput {
    /// Seconds the old secret stays valid (at most a day).
    #[serde(default, deserialize_with = "whole_required")]
    #[schema(minimum = 0, maximum = 86_400)]
    pub(crate) grace_seconds: u64,
}

/// An API key, without its secret but where it was just made.
#[derive(Serialize, ToSchema)]
#[schema(as = ApiKey)]
pub(crate) struct ApiKeyView {
    pub(crate) key_id: String,
    pub(crate) name: String,
    pub(crate) scopes: Vec<ScopeName>,
    pub(crate) key_prefix: Option<String>,
    /// The user the key acts for: disabling the user disables the key.
    pub(crate) owner: Option<String>,
    pub(crate) requests_per_second: Option<u32>,
    #[schema(value_type = String, format = DateTime)]
    pub(crate) created_at: Rfc3339,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub(crate) expires_at: Option<Rfc3339>,
    /// About when it was last used (updated at most once a minute).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub(crate) last_used: Option<Rfc3339>,
    /// The secret: only when the key is created or rotated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) api_key: Option<String>,
}

impl ApiKeyView {
    pub(crate) fn new(key: &ApiKey, secret: Option<&str>) -> Self {
        Self {
            key_id: key.id.clone(),
            name: key.name.clone(),
            scopes: key
                .scopes
                .iter()
                .copied()
                .filter_map(ScopeName::of)
                .collect(),
            key_prefix: key.key_prefix.clone(),
            owner: key.owner.clone(),
            requests_per_second: key.requests_per_second,
            created_at: Rfc3339(key.created_at),
            expires_at: key.expires_at.map(Rfc3339),
            last_used: key.last_used.map(Rfc3339),
            api_key: secret.map(str::to_owned),
        }
    }
}

/// A page of API keys, oldest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct ApiKeyPage {
    pub(crate) api_keys: Vec<ApiKeyView>,
    /// Pass it as `cursor` for the next page; `null` on the last one.
    pub(crate) cursor: Option<String>,
}

/// A revoked API key.
#[derive(Serialize, ToSchema)]
pub(crate) struct Revoked {
    pub(crate) key_id: String,
    /// Always `true`.
    pub(crate) revoked: bool,
}

/// The process is up.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// Always `ok`.
    pub(crate) status: String,
}

/// The Redis master answers.
#[derive(Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// Always `ready`.
    pub(crate) status: String,
    /// Where durable writes stand, when writes wait for replicas.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) writes: Option<WriteState>,
}

/// Where durable writes stand.
#[derive(Serialize, ToSchema)]
pub(crate) struct WriteState {
    /// `held` (too few replicas: writes refused), `degraded` or `ok`.
    pub(crate) state: String,
    pub(crate) replicas_asked: u32,
    pub(crate) replicas_online: Option<u32>,
    pub(crate) replicas_waited_for: u32,
}
