//! The multi-tenant key-value and API-key service.
//!
//! # Model
//!
//! A thin HTTP layer (hyper) over three libraries: `redis-failover` finds
//! and follows the Redis master, `tenant-kv` stores each tenant's items,
//! users and API keys, and `log-buffer` ships logs and audit records to Loki
//! per tenant. A request is authenticated by a JWT or an API key; the tenant
//! comes only from that verified credential, never from the path or body.
//!
//! Status: the HTTP service is not published yet; until it is,
//! `cargo run --release -p redis-topology` starts the local Redis topology
//! the service's dev mode will run on.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
