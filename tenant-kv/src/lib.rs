#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api_keys;
mod audit;
mod auth_cache;
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
mod slots;
mod store;
mod tenant;
mod users;

pub use api_keys::{
    ApiKey, ApiKeyPage, ApiKeys, MAX_API_KEY_NAME_LEN, MAX_API_KEY_PAGE, MAX_ROTATION_GRACE,
    NewApiKey, Scope,
};
pub use audit::audit_records;
pub use auth_cache::{AuthCache, AuthCacheStats, DEFAULT_AUTH_CACHE_CAPACITY};
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
