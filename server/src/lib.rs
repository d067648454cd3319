//! The multi-tenant key-value and API-key service.
//!
//! # Model
//!
//! A thin HTTP layer (hyper 1, HTTP/1.1) over three libraries:
//! `redis-failover` finds and follows the Redis master, `tenant-kv` stores
//! each tenant's items, users and API keys, and `log-buffer` buffers logs
//! and audit records in Redis and ships them to Loki per tenant.
//!
//! A request is authenticated by a JWT (`Authorization: Bearer`, from
//! `POST /token` or from another issuer sharing the key) or an API key
//! (`X-API-Key`). The tenant comes only from that verified credential,
//! never from the path or body. Tokens are checked against one pinned
//! algorithm with `exp`, `sub` and `tenant_id` required (`iss` and `aud`
//! too when configured) and `nbf` honoured; the user is looked up on every
//! request, so disabling a user or revoking a key takes effect at once. API
//! keys are limited by their scopes and key prefix, and go with the user
//! who owns them. Each request is then admitted against its tenant's and
//! API key's request rates (`tenant_kv::TenantKv::admit_request`), whose
//! state is in the `RateLimit-Policy` and `RateLimit` fields of the answer.
//!
//! Every answer is JSON; every error is `{"error": {"code", "message"}}`
//! with a precise status (400, 401, 403, 404, 405, 408, 409, 412, 413, 414,
//! 415, 429 with `Retry-After`, 503 when Redis stays unreachable past the
//! retry budget or passwords are being checked on every slot). Items carry their version as an `ETag`; `If-Match` and
//! `If-None-Match: *` make writes conditional. `GET /openapi.json`
//! describes every endpoint.
//!
//! [`Limits`] bound bodies, request heads, targets, time per request,
//! stalled bodies, answers the client does not read, and open connections
//! in total and per client address. Metrics, which name tenants, are served
//! on the admin listener only ([`ServerBuilder::admin`]).
//! [`ServerHandle::shutdown`] stops accepting, lets in-flight requests
//! finish within a grace period, and flushes the log buffer.
//!
//! ```no_run
//! # async fn run(client: redis_failover::FailoverClient) -> Result<(), server::Error> {
//! use server::{JwtConfig, Server};
//!
//! let store = tenant_kv::TenantKv::builder(client.clone()).build()?;
//! let jwt = JwtConfig::hs256(b"a secret of at least thirty-two bytes")?;
//! let server = Server::builder(store, client, jwt)
//!     .bind("127.0.0.1:8080".parse().unwrap())
//!     .await?;
//! tokio::signal::ctrl_c().await.ok();
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! [`System`] wires a whole server process from [`Settings`] (the failover
//! client, the store and its expiry watcher, the log buffer and offloader,
//! the server), once for every caller: the `server` binary's `serve` and
//! `dev` (on a local topology with demo users, the [`dev`] module, behind
//! the default `dev` cargo feature), the chaos run and the end-to-end
//! tests. `server offload` runs a log shipper only, and admin subcommands
//! manage users and tenants.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api;
mod api_keys;
mod auth;
mod conn;
#[cfg(feature = "dev")]
pub mod dev;
mod error;
mod http;
mod items;
mod limits;
mod metrics;
mod middleware;
mod offload;
mod openapi;
mod router;
mod schema;
mod server;
mod settings;
mod system;
mod verified_tokens;

pub use auth::JwtConfig;
pub use error::{Error, SettingError};
pub use limits::Limits;
pub use offload::OffloaderAdmin;
pub use router::routes;
pub use server::{Server, ServerBuilder, ServerHandle, ShutdownReport};
pub use settings::{
    Discovery, JwtSettings, RedisSettings, SETTINGS, Setting, Settings, settings_help,
};
pub use system::{System, SystemBuilder, log_client};
