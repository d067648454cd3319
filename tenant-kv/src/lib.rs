//! A tenant-isolated key-value store over `redis-failover`.
//!
//! # Model
//!
//! Every item belongs to exactly one tenant and lives under the Redis key
//! `tenant:<tenant_id>:data:<key>`. The mapping from (tenant, key) to Redis
//! key is injective whatever the key contains, so no key of one tenant can
//! name another tenant's data, and every pattern sent to Redis is escaped.
//!
//! An item is a JSON value with optional metadata and TTL, plus a version
//! (monotonic per key) and timestamps kept by the store. Writes are atomic
//! scripts that update the item, the tenant's listing index, its quota
//! counters and its audit record in one step; reads are audited without a
//! write on the read path. Users and API keys of each tenant live in the same
//! namespace discipline.
//!
//! Status: this crate's API is not published yet.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
