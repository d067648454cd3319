//! Real local Redis topologies for tests, benchmarks, examples and dev mode.
//!
//! A [`Topology`] is a set of `redis-server` processes on this machine: one
//! master, its replicas, and (optionally) Sentinels watching them, each on a
//! free loopback port chosen at start, with its config and log in a
//! temporary directory of its own. Nothing is mocked: clients under test talk
//! to the same server binary they meet in production, and failures are
//! produced the way they happen there.
//!
//! # Model
//!
//! - **Start.** [`TopologyBuilder::start`] starts the master, then the
//!   replicas, then the sentinels, and returns only when every replica is
//!   online at the master and every sentinel sees the master, every replica
//!   and every other sentinel. A node that loses the race for its port is
//!   started again on another one.
//! - **Nodes** are named by [`NodeId`]: data nodes `redis-0` (the initial
//!   master), `redis-1`, ...; sentinels `sentinel-0`, .... A node keeps its
//!   name and port for the topology's life, whatever role it plays.
//! - **Faults** are real: [`Topology::kill`] (SIGKILL), [`Topology::pause`] /
//!   [`Topology::resume`] (SIGSTOP / SIGCONT, a hung node),
//!   [`Topology::restart`] (back on its old port, as a restarted pod),
//!   [`Topology::sentinel_failover`] and [`Topology::promote`] (promotion by
//!   hand, as an operator without Sentinel does).
//! - **Waits** ([`Topology::wait_for_new_master`],
//!   [`Topology::wait_for_replica_of`]) poll with a deadline; a timeout
//!   error names what was awaited, why the last attempt fell short, and the
//!   tail of the log of the node at fault.
//! - **Cleanup.** Dropping a topology SIGKILLs every process it started and
//!   removes its directory, including while a test unwinds from a panic.
//!   A process killed by SIGKILL runs no destructor; the next topology
//!   started on the machine finds its nodes and kills them.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use redis_topology::Topology;
//!
//! let topology = Topology::builder().replicas(2).sentinels(3).start().await?;
//! let old = topology.initial_master();
//! topology.kill(old)?;
//! let new = topology.wait_for_new_master(old, Duration::from_secs(30)).await?;
//! println!("{new} took over at {}", topology.addr(new));
//! # Ok(()) }
//! ```
//!
//! `redis-server` (Redis >= 6.2) must be on `PATH`; Sentinel runs as
//! `redis-server --sentinel`, so no separate binary is needed.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Errors carry log tails for diagnosis and occur off any hot path; keeping
// them unboxed lets callers match on their fields directly.
#![allow(clippy::result_large_err)]

mod builder;
mod error;
mod node;
mod orphans;
mod ports;
mod tls;
mod topology;

pub use builder::TopologyBuilder;
pub use error::{Error, Result};
pub use node::{NodeId, NodeKind};
/// The Redis client this crate speaks through; [`Role`] and connection types come from it.
pub use redis;
pub use redis::Role;
pub use topology::Topology;
