//! A failover-aware connection manager for Redis deployed as one master with
//! replicas, watched by Sentinel or not (typically on Kubernetes).
//!
//! # Model
//!
//! The manager keeps one answer to "which node is the master now?" and
//! routes every write to it. It learns the answer in one of two ways:
//!
//! - **Ordered candidates**: a list of stable node names (for example the
//!   pods `redis-0.redis-headless`, `redis-1...` of a StatefulSet), resolved
//!   afresh on every connect so that a pod's new IP is never missed. The
//!   master is the first candidate whose `ROLE` says master (or, optionally,
//!   which accepts a throw-away write). A last-resort service address is
//!   tried only when no candidate is a master.
//! - **Sentinel**: the sentinels are asked for the master's address, their
//!   answers must agree, and the node's `ROLE` confirms it before any switch.
//!   `+switch-master` notifications, periodic polling and a refresh after
//!   every sentinel reconnect keep the answer current.
//!
//! Data nodes and sentinels each have their own credentials and TLS
//! settings ([`Credentials`], [`Tls`]).
//!
//! Every master installed gets a new generation with connections of its
//! own; once a newer master is installed, requests no longer pick the old
//! one's connections (a request already sent on one finishes there).
//!
//! One owner holds that state: the master and its generation, the
//! discovery epoch (bumped whenever a request saw the master fail), the
//! newest Sentinel config epoch any sentinel named, and the replicas
//! serving reads, under one lock. They change only through named
//! transitions, each emitting its [`Event`]: *install* a master found by a
//! discovery (refused if a newer discovery or epoch superseded it),
//! *lose* it when a request saw it fail, *fence* it when a sentinel names
//! another in a newer epoch, *publish* a probed read set. Requests read a
//! snapshot without waiting, and a discovery started before a failure
//! was seen cannot install over it.
//!
//! # Failures and retries
//!
//! - A request the master refused without running it (`READONLY`,
//!   `LOADING`, `MASTERDOWN`, `NOREPLICAS`, ...; a connection known to have
//!   failed) makes the client find the master again and resend it.
//! - A request whose outcome is unknown (a timeout, or the connection lost
//!   after sending) is resent only if it is read-only or the caller marked
//!   it idempotent ([`FailoverClient::idempotent_connection`],
//!   [`FailoverClient::query_idempotent`]); otherwise the caller gets
//!   [`Error::OutcomeUnknown`]: it may or may not have run.
//! - A timeout also checks the master: a hung master is left for a new one.
//!   On a master that is fine, an idempotent request is resent at most
//!   twice, since a slow request runs again each time.
//! - Retries go on, with jittered backoff cut short when a new master is
//!   installed, until the retry budget (a time, counted from the first
//!   failure) is spent; then [`Error::RetryBudgetExhausted`] names each node
//!   tried and why it failed.
//!
//! Every retry loop (plain requests, durable writes, blocking commands,
//! transactions) asks one pure policy what a try came to: not sent, held
//! back, refused unrun, maybe run, unreplicated or a conflict, and it
//! answers resend after a delay, find the master first, or fail with an
//! error. [`Error::kind`] classifies every error into an [`ErrorKind`] so
//! callers decide on kinds (unavailable, outcome unknown, not replicated,
//! no script, ...), never on Redis's error strings, and [`Backoff`] is the
//! one jittered exponential backoff for callers' own retries.
//!
//! One discovery runs at a time: a burst of failed requests waits for a
//! single one. Requests share one multiplexed connection per master,
//! opened with a check of the node's role; once it fails, the next
//! discovery that finds the same master opens another.
//!
//! # Reads from replicas
//!
//! Reads ([`FailoverClient::read`], [`get`](FailoverClient::get),
//! [`read_connection`](FailoverClient::read_connection)) are routed by a
//! [`ReadPolicy`]: `Master` (the default), `MasterPreferred`, `Replica`,
//! `ReplicaPreferred`, `Nearest` or `RoundRobin`, set per client and
//! overridden per call with [`FailoverClient::with_read_policy`]; replicas
//! a [`prefer_replicas`](FailoverClientBuilder::prefer_replicas) filter
//! picks are tried first.
//!
//! A background task, started with the first read that may use replicas
//! (or at build time when the read policy or `min_replicas` needs it),
//! probes the master and every replica with `INFO replication` every
//! [`replica_probe_interval`](FailoverClientBuilder::replica_probe_interval)
//! (500 ms). Replicas come from `SENTINEL REPLICAS` (those Sentinel does
//! not think down), or, with candidates, from the other candidates and
//! what the master lists. A replica serves reads only while it replicates
//! the current master (same replication ID), its link to it is up, it
//! answers, and it is at most
//! [`max_staleness`](FailoverClientBuilder::max_staleness) behind. The lag
//! is derived from replication offsets, not from
//! `master_last_io_seconds_ago` (whole seconds, and reset by pings): the
//! master's offset is sampled with the time each probe was sent, and a
//! replica whose offset has reached a sample has every write acknowledged
//! before that time, so its staleness is the time since the latest sample
//! it reached. A replica that stops answering ages out by itself. So a
//! promoted replica leaves the read set at the next probe, and a demoted
//! master joins it once it replicates the new master.
//!
//! ```no_run
//! # async fn run(sentinels: Vec<redis_failover::NodeAddr>) -> redis_failover::Result<()> {
//! use std::time::Duration;
//! use redis_failover::{FailoverClient, ReadPolicy};
//!
//! let client = FailoverClient::sentinel("mymaster", sentinels)
//!     .read_policy(ReadPolicy::ReplicaPreferred)
//!     .max_staleness(Duration::from_secs(2))
//!     .build()?;
//! // A replica at most 2 s behind, else the master.
//! let _: Option<String> = client.get("greeting").await?;
//! // Replicas only: `Error::NoReplicaAvailable` names each and why when none qualifies.
//! let replicas_only = client.with_read_policy(ReadPolicy::Replica);
//! let _: Vec<String> = replicas_only.read(redis::cmd("LRANGE").arg("log").arg(0).arg(9)).await?;
//! # Ok(()) }
//! ```
//!
//! # Read-your-writes sessions
//!
//! A [`Session`] records the master's replication offset after each of
//! its writes (a `ROLE` pipelined behind the write) and sends `ROLE` ahead
//! of each read on a replica: a replica that has not applied the session's
//! writes is skipped for the master. Cost: a `ROLE` with every write and
//! every replica read, and a master read whenever the replica is behind.
//!
//! ```no_run
//! # async fn run(client: redis_failover::FailoverClient) -> redis_failover::Result<()> {
//! let session = client.session();
//! session.set("cart:7", "3 items").await?;
//! let cart: String = session.get("cart:7").await?; // never older than the write
//! // The position can travel, say in a cookie, to resume the session elsewhere.
//! let resumed = client.session_after(session.position());
//! # let _ = resumed; Ok(()) }
//! ```
//!
//! # Durable writes and fencing
//!
//! With [`Durability::Replicated`] (per client, or per call through
//! [`FailoverClient::with_durability`]) a write is followed by `WAIT` on a
//! connection of its own; fewer acknowledgements than asked give
//! [`Error::NotReplicated`] ([`Error::ReplicationUnknown`] if `WAIT`
//! itself failed): the write ran on the master and is not rolled back, but
//! it may not survive a failover. Sentinel promotes the replica
//! it last saw furthest ahead, from an `INFO` that may be seconds old: only
//! a write every replica acknowledged is sure to be on the one promoted.
//!
//! A replica that is gone for good (its node lost) would hold every such
//! write; [`lost_replica_grace`](FailoverClientBuilder::lost_replica_grace)
//! lets writes wait for the replicas online once the master has been
//! short for longer than a failover takes, never for fewer than a floor,
//! while a replica that drops out to be promoted is still waited for.
//! [`FailoverClient::replication_status`] tells where writes stand.
//!
//! [`min_replicas`](FailoverClientBuilder::min_replicas) holds writes back
//! while the master reports fewer healthy replicas than asked, so a master
//! cut off from its replicas takes no writes from this client. And once
//! any sentinel names another master in a newer config epoch, the old
//! master is fenced: no request of this client goes to it again, even if
//! it still accepts writes (partitioned from the sentinels, not from the
//! client), and requests wait for the new master.
//!
//! Writes that wait for every replica need the replaced master back as a
//! replica. Sentinel demotes it only once it has answered for 8 s (after a
//! `SENTINEL FAILOVER`, or a master that hung and resumed); with
//! [`demote_stale_masters`](FailoverClientBuilder::demote_stale_masters)
//! the client sends it `REPLICAOF <new master>` as soon as it answers,
//! while as many sentinels as a switch needs name the new master.
//!
//! ```no_run
//! # async fn run(sentinels: Vec<redis_failover::NodeAddr>) -> redis_failover::Result<()> {
//! use std::time::Duration;
//! use redis_failover::{Durability, Error, FailoverClient};
//!
//! let client = FailoverClient::sentinel("mymaster", sentinels)
//!     .min_replicas(1, Duration::from_secs(10))
//!     .build()?;
//! let durable = client.with_durability(Durability::Replicated {
//!     replicas: 2,
//!     timeout: Duration::from_millis(500),
//! });
//! match durable.set("order:42", "paid").await {
//!     Ok(()) => {}
//!     Err(Error::NotReplicated { acked, .. }) => {
//!         eprintln!("written, but only {acked} replicas have it");
//!     }
//!     Err(other) => return Err(other),
//! }
//! # Ok(()) }
//! ```
//!
//! # Blocking commands, transactions and subscriptions
//!
//! Requests share one multiplexed connection per master. What must not
//! share it gets an exclusive connection from a small pool per master
//! ([`dedicated_connections`](FailoverClientBuilder::dedicated_connections)),
//! emptied at every switch.
//!
//! Blocking commands (`BLPOP`, `BRPOP`, `BLMOVE`, `BRPOPLPUSH`, `BLMPOP`,
//! `BZPOPMIN`, `BZPOPMAX`, `BZMPOP`, `XREAD`/`XREADGROUP` with `BLOCK`,
//! `WAIT`, `WAITAOF`) are recognised by name, alone or in a pipeline, and
//! wait there, their own timeout added to the command timeout. When
//! another master is installed while one blocks, the client unblocks it on
//! the old master with `CLIENT UNBLOCK … ERROR`: refused, it provably did
//! not run and is sent to the new master. A connection lost while it
//! blocks leaves its outcome unknown: resent only if declared idempotent.
//!
//! ```no_run
//! # async fn run(client: redis_failover::FailoverClient) -> redis_failover::Result<()> {
//! // Waits up to 5 s for a job, on the master of the moment.
//! let job: Option<(String, String)> =
//!     client.query(redis::cmd("BLPOP").arg("jobs").arg(5)).await?;
//! # let _ = job; Ok(()) }
//! ```
//!
//! [`FailoverClient::transaction`] runs `WATCH`, the body's reads (on the
//! same connection, through [`Watched`]) and the pipeline it returns in
//! `MULTI`/`EXEC`. A conflict, or a failover before `EXEC`, runs it all
//! again within the retry budget, then [`Error::TransactionConflict`]; an
//! `EXEC` cut off by a failover is [`Error::OutcomeUnknown`] unless the
//! transaction is declared idempotent
//! ([`idempotent_transaction`](FailoverClient::idempotent_transaction)),
//! so a transaction is never applied twice.
//!
//! ```no_run
//! # async fn run(client: redis_failover::FailoverClient) -> redis_failover::Result<()> {
//! let key = "stock:42".to_owned();
//! // `None`: out of stock, nothing run; `Some((left,))`: one taken.
//! let left: Option<(i64,)> = client
//!     .transaction(&[&key], |mut watched| {
//!         let key = key.clone();
//!         async move {
//!             let stock = watched.get::<Option<i64>>(&key).await?.unwrap_or(0);
//!             if stock == 0 {
//!                 return Ok(None);
//!             }
//!             let mut pipeline = redis::pipe();
//!             pipeline.decr(&key, 1);
//!             Ok(Some(pipeline))
//!         }
//!     })
//!     .await?;
//! # let _ = left; Ok(()) }
//! ```
//!
//! [`FailoverClient::subscribe`] is a [`Subscription`], a `Stream` that
//! subscribes again on every new master and after every lost connection,
//! and yields [`Delivery::Gap`] wherever messages may have been missed
//! (pub/sub keeps nothing for an absent subscriber), also when the
//! subscriber falls [`SUBSCRIPTION_BUFFER`] deliveries behind: the rest
//! are dropped, never buffered without bound.
//!
//! ```no_run
//! # async fn run(client: redis_failover::FailoverClient) -> redis_failover::Result<()> {
//! use futures_util::StreamExt;
//! use redis_failover::Delivery;
//!
//! let mut news = client.subscribe(["news"], Vec::<String>::new()).await?;
//! while let Some(delivery) = news.next().await {
//!     match delivery {
//!         Delivery::Message(message) => println!("{:?}", message.get_payload::<String>()),
//!         Delivery::Gap(gap) => println!("may have missed some: {}", gap.reason),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Background tasks (the re-check, the sentinel watchers, the replica
//! probes, demotions, subscriptions) end when the client's last handle is
//! dropped.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use redis_failover::{FailoverClient, NodeAddr};
//!
//! let sentinels = ["sentinel-0.sentinel:26379", "sentinel-1.sentinel:26379"]
//!     .iter()
//!     .map(|s| s.parse::<NodeAddr>())
//!     .collect::<Result<Vec<_>, _>>()?;
//! let client = FailoverClient::sentinel("mymaster", sentinels).build()?;
//! client.set("greeting", "hello").await?;
//! let greeting: Option<String> = client.get("greeting").await?;
//!
//! // Any redis-rs command or pipeline, through the same failover handling:
//! let mut connection = client.idempotent_connection();
//! let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut connection).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod addr;
mod backoff;
mod builder;
mod client;
mod dedicated;
mod discovery;
mod durable;
mod epochs;
mod error;
mod events;
mod execute;
mod node;
mod policy;
mod pubsub;
mod read;
mod replica_set;
mod replicas;
mod replicated;
mod request;
mod retry;
mod routing;
mod session;
mod shared;
mod state;
mod tasks;
mod transaction;

pub use addr::{DnsResolver, NodeAddr, Resolve, Resolving, StaticResolver};
pub use backoff::Backoff;
pub use builder::FailoverClientBuilder;
pub use client::{FailoverClient, MasterConnection, MasterInfo, ReadConnection, ReplicaStatus};
pub use durable::ReplicationStatus;
pub use error::{Error, ErrorKind, NodeFailure, Result};
pub use events::{Event, MetricsSnapshot, Trigger};
pub use node::{Credentials, MasterCheck, Tls};
pub use pubsub::{Delivery, Gap, SUBSCRIPTION_BUFFER, Subscription};
pub use routing::{Durability, ReadPolicy};
pub use session::Session;
pub use transaction::Watched;
