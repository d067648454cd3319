//! A tenant-isolated key-value store over [`redis_failover`].
//!
//! # Model
//!
//! Every item belongs to exactly one tenant and lives under the Redis key
//! `tenant:{<tenant_id>}:data:<key>`. A [`TenantId`] is 1 to 64 ASCII
//! letters, digits, `_` or `-` (never `:` nor a brace), and the key follows
//! a fixed `data:` part verbatim, so the mapping from (tenant, key) to
//! Redis key is injective whatever the key contains (`:`, `*`, braces, any
//! UTF-8 up to 1 KiB): no key of one tenant can name another tenant's
//! data, nor the tenant's own bookkeeping keys. Keys holding characters
//! that could act on a log viewer or terminal (controls, line separators,
//! bidirectional formatting: [`is_unsafe_char`]) are refused. Patterns
//! sent to Redis are escaped ([`escape_glob`]); [`tenant_acl_rules`]
//! confines a Redis ACL user to one tenant's keys, as defence in depth.
//!
//! # Storage layout
//!
//! Every key of a tenant (items, index, counters, quotas, audit and log
//! streams, data key, users, API keys, rate states) starts with
//! `tenant:{<tenant_id>}:`. The braces are a Redis Cluster hash tag, and
//! the first `{`…`}` of a key is always the tenant id, so all of a
//! tenant's keys hash to one slot: every script names only keys of that
//! slot and declares each of them in `KEYS`. A few keys are global
//! (usernames and API key ids to their tenant, the layout marker).
//!
//! An item is one string, its envelope: a fixed 45-byte header (version,
//! creation, update and expiry times, size, metadata length), then the
//! metadata, then the value. A get is one `GET`, [`Tenant::get_many`] one
//! `MGET`; the write script reads only the header of the item it
//! replaces (`GETRANGE`). Expired items are purged by the expiry watcher,
//! by the write that replaces one, or when a quota refusal needs the room
//! they hold, never by a scan on every write.
//!
//! The layout's version is kept in Redis (`tenant-kv:layout`,
//! [`STORAGE_LAYOUT`]); a store refuses a database it cannot serve with
//! [`Error::UnsupportedLayout`], naming the migration. A database of
//! layout 1 (`tenant:<id>:…`, one hash per item) moves to layout 2 while
//! servers run ([`TenantKv::migration`], `server migrate`): tenants'
//! bookkeeping keys are renamed first, then items are converted in
//! resumable batches while reads fall back to an item's layout 1 hash and
//! writes replace it, so clients see every value, version and TTL
//! throughout (see [`Migration`] for the one short pause).
//!
//! An item is any JSON value with optional metadata (a JSON object) and
//! TTL, plus a version and timestamps kept by the store. Versions come
//! from a per-tenant counter, so they only grow, also across a delete and
//! re-create: use them as `ETag`s and for compare-and-set
//! ([`Precondition::Version`]).
//!
//! # Atomic writes with their audit record
//!
//! Every write, or batch of writes ([`Tenant::batch`], all or nothing), is
//! one Lua script on the master (through the failover client's retry
//! handling; a new master that does not know the script gets it loaded):
//! it checks the preconditions and the quotas ([`Quotas`]: keys, bytes, and
//! a write rate kept in Redis so every instance shares it), writes the
//! items, updates the tenant's index and usage counters, and appends the
//! audit record (`create_key`, `update_key`, `delete_key`, with actor,
//! key, version and size, never the value) to the tenant's audit stream
//! `tenant:{<id>}:audit`, all or nothing. Reads are audited (`get_key`)
//! through a `tracing` event with target `audit`, never through a write.
//!
//! Users ([`TenantKv::users`]) have global usernames, belong to one
//! tenant, and log in against argon2id hashes (bcrypt hashes imported from
//! another system verify too). Logins are throttled per username and per
//! client address ([`LoginThrottle`], kept in Redis), and passwords are
//! checked on a fixed number of slots with a short queue, each slot
//! keeping its own argon2 memory; every attempt on a known user leaves a
//! `login_success` or `login_failed` record (`login_failed` at most at a
//! rate per tenant, the rest counted). API keys ([`TenantKv::api_keys`])
//! look like `tkv_<id>_<secret><crc>`: malformed ones are refused without a
//! Redis round trip, only a SHA-256 hash is stored and compared in constant
//! time, [`Scope`]s, a key prefix and a request rate limit them, a user
//! owns them (a disabled owner disables them), and a rotation keeps the old
//! secret valid for a grace period (at most [`MAX_ROTATION_GRACE`]).
//!
//! [`Quotas`] limit each tenant: items, bytes, write rate (in the write
//! script), request rates of the tenant and of each API key
//! ([`TenantKv::admit_request`], GCRA in Redis, shared by every instance),
//! and API keys. Defaults come from the builder; per-tenant overrides live
//! in Redis ([`TenantKv::set_quota`]) and reach every instance within
//! [`QUOTA_REFRESH`].
//!
//! With [`TenantKvBuilder::encryption_key`], values are encrypted at rest
//! (XChaCha20-Poly1305) under a data key per tenant, kept in Redis wrapped
//! by the master key; a value's tenant and key are its associated data, so
//! a ciphertext copied elsewhere does not decrypt, and
//! [`TenantKv::destroy_data_key`] makes a tenant's values unreadable, on
//! every instance within [`TenantKvBuilder::data_key_lifetime`] (at once
//! where the expiry watcher runs: it hears of the destruction).
//!
//! Listing reads the tenant's own sorted-set index by lexical range, so it
//! costs the same however many keys other tenants hold. Cursors are signed
//! for the tenant and prefix. Items whose TTL ran out are left out of
//! listings at once, and leave the index with a `key_expiration` audit
//! record as soon as Redis expires them if an expiry watcher runs
//! ([`TenantKv::watch_expirations`]: keyspace notifications, with periodic
//! sweeps for the notifications lost); without a watcher, only when a
//! write replaces one or a quota refusal needs its room.
//!
//! ```no_run
//! # async fn run(client: redis_failover::FailoverClient) -> tenant_kv::Result<()> {
//! use serde_json::json;
//! use tenant_kv::{Actor, NewItem, Precondition, TenantId, TenantKv};
//!
//! let store = TenantKv::builder(client).build()?;
//! let acme = store.tenant(TenantId::new("acme")?, Actor::user("alice"));
//! let created = acme.create("greeting", NewItem::new(json!({"text": "hello"}))).await?;
//! // Compare-and-set: fails with `Error::VersionConflict` if someone wrote since.
//! acme.put("greeting", NewItem::new(json!({"text": "hi"})), Precondition::Version(created.version))
//!     .await?;
//! let page = acme.list("greet", 100, None).await?;
//! assert_eq!(page.keys, vec!["greeting".to_owned()]);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api_keys;
mod crypto;
mod cursor;
mod envelope;
mod error;
mod expiry;
mod item;
mod keys;
mod layout;
mod limits;
mod migration;
mod passwords;
mod ratelimit;
mod reads;
mod scripts;
mod store;
mod tenant;
mod users;

pub use api_keys::{
    ApiKey, ApiKeyPage, ApiKeys, MAX_API_KEY_NAME_LEN, MAX_API_KEY_PAGE, MAX_ROTATION_GRACE,
    NewApiKey, Scope,
};
pub use error::{Error, Result};
pub use expiry::ExpiryWatcher;
pub use item::{Item, MAX_TTL, NewItem, Page, Precondition, Usage, Write, Written};
pub use keys::{
    MAX_KEY_LEN, MAX_TENANT_ID_LEN, TenantId, escape_glob, is_unsafe_char, tenant_acl_rules,
};
pub use layout::{LayoutStatus, STORAGE_LAYOUT};
pub use limits::{QUOTA_REFRESH, Quota, Quotas};
pub use migration::{Migration, MigrationProgress, MigrationReport};
pub use passwords::MAX_PASSWORD_LEN;
pub use ratelimit::{Rate, RateLimitStatus};
pub use store::{Actor, TenantKv, TenantKvBuilder};
pub use tenant::Tenant;
pub use users::{LoginThrottle, MAX_USERNAME_LEN, NewUser, User, Users};
