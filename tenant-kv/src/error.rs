use std::time::Duration;

use thiserror::Error;

/// Why an operation of the store failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A tenant id that is not 1 to 64 ASCII letters, digits, `_` or `-`.
    #[error("invalid tenant id: {reason}")]
    InvalidTenantId {
        /// What is wrong with it.
        reason: String,
    },

    /// An item key that is empty or too long.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },

    /// A value or its metadata is larger than the store allows, or the
    /// metadata is not a JSON object.
    #[error("invalid item: {reason}")]
    InvalidItem {
        /// What is wrong with it.
        reason: String,
    },

    /// A store setting cannot work.
    #[error("invalid setting `{setting}`: {reason}")]
    InvalidConfig {
        /// The setting at fault.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// No item has this key.
    #[error("no item with key {key:?}")]
    NotFound {
        /// The key asked for.
        key: String,
    },

    /// `create` found an item with this key.
    #[error("an item with key {key:?} exists (version {version})")]
    AlreadyExists {
        /// The key.
        key: String,
        /// The existing item's version.
        version: u64,
    },

    /// The item's version is not the one the write expected.
    #[error("item {key:?} is at version {current:?}, not the {expected} expected")]
    VersionConflict {
        /// The key.
        key: String,
        /// The version the write expected.
        expected: u64,
        /// The item's version now, `None` if it does not exist.
        current: Option<u64>,
    },

    /// The write would take the tenant past one of its quotas.
    #[error("quota exceeded: {what} would reach {would_be}, the limit is {limit}")]
    QuotaExceeded {
        /// `keys`, `bytes`, `api_keys`, or `write_burst` (a batch of more
        /// writes than the write rate lets through at once).
        what: &'static str,
        /// The limit.
        limit: u64,
        /// What the write would have made it.
        would_be: u64,
    },

    /// A username that is not 1 to 64 ASCII letters, digits or `_.@-`, or
    /// an unusable password or hash.
    #[error("invalid user: {reason}")]
    InvalidUser {
        /// What is wrong.
        reason: String,
    },

    /// The username is taken (usernames are unique across tenants).
    #[error("user {username:?} exists")]
    UserExists {
        /// The username.
        username: String,
    },

    /// No user has this name.
    #[error("no user {username:?}")]
    UnknownUser {
        /// The username.
        username: String,
    },

    /// A login failed: unknown user, wrong password, or disabled user (not
    /// told apart, so as not to help guessing).
    #[error("invalid username or password")]
    InvalidCredentials,

    /// An API key that is malformed, unknown, revoked, expired, or whose
    /// secret does not match (not told apart).
    #[error("invalid API key")]
    InvalidApiKey,

    /// The tenant has no API key with this id.
    #[error("no API key {id:?}")]
    UnknownApiKey {
        /// The key id.
        id: String,
    },

    /// The API key changed (revoked, or rotated by another caller) between
    /// reading it and rotating it: nothing was done.
    #[error("API key {id:?} changed meanwhile; read it again")]
    ApiKeyChanged {
        /// The key id.
        id: String,
    },

    /// An API key cannot be created as asked.
    #[error("invalid API key settings: {reason}")]
    InvalidApiKeySettings {
        /// What is wrong.
        reason: String,
    },

    /// The tenant writes faster than its `writes_per_second` quota allows.
    #[error("write rate quota exceeded: retry after {retry_after:?}")]
    RateLimited {
        /// When the write would be allowed.
        retry_after: Duration,
    },

    /// A request past the tenant's or the API key's request rate
    /// ([`TenantKv::admit_request`](crate::TenantKv::admit_request)).
    #[error("request rate limit `{}` exceeded: retry after {:?}", status.policy, status.retry_after.unwrap_or_default())]
    RequestRateLimited {
        /// The limit that refused the request.
        status: crate::RateLimitStatus,
    },

    /// Too many login attempts for this username or from this address
    /// lately; no password was checked.
    #[error("too many login attempts: retry after {retry_after:?}")]
    LoginThrottled {
        /// When an attempt would be taken.
        retry_after: Duration,
    },

    /// Every password hashing slot and its queue are taken: the attempt
    /// was refused at once instead of waiting.
    #[error("too many passwords being checked: retry after {retry_after:?}")]
    Overloaded {
        /// When to try again.
        retry_after: Duration,
    },

    /// A write of a batch could not be done, so none was.
    #[error("write {index} of the batch failed; no write of the batch was done")]
    BatchFailed {
        /// Its position in the batch, from 0.
        index: usize,
        /// Why.
        #[source]
        source: Box<Error>,
    },

    /// A listing cursor that this store did not issue for this tenant and
    /// prefix, or that was altered.
    #[error("invalid cursor")]
    InvalidCursor,

    /// A stored item that cannot be read back (written by something else).
    #[error("item {key:?} is stored in a form this store cannot read: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },

    /// Redis holds the store's data in a storage layout this version does
    /// not serve: layout 1, to migrate first ([`TenantKv::migration`]), or
    /// a newer one. Nothing was read or written.
    ///
    /// [`TenantKv::migration`]: crate::TenantKv::migration
    #[error(
        "Redis holds tenant-kv data in storage layout {found}, and this version serves layout 2 only{}",
        layout_advice(found)
    )]
    UnsupportedLayout {
        /// The layout found: `1`, or the marker's value.
        found: String,
    },

    /// Redis could not be reached within the retry budget, or answered
    /// with an error.
    #[error("redis request failed")]
    Redis(#[from] redis_failover::Error),
}

fn layout_advice(found: &str) -> &'static str {
    if found == "1" {
        ": migrate it first (`TenantKv::migration`)"
    } else {
        ""
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
