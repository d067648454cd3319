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
//! Every switch bumps a master generation; connections of an older
//! generation are never used for writes again. A write that meets
//! `READONLY`, a refused connection or `LOADING` is retried on the new
//! master within a retry budget measured in time, so a failover within that
//! budget surfaces no error to the caller. Reads can be routed to replicas
//! by read policy. Connections are multiplexed and shared; pooling decides
//! which connections exist, not who may use them.
//!
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod addr;
mod builder;
mod client;
mod error;
mod events;
mod node;
mod retry;

pub use addr::{DnsResolver, NodeAddr, Resolve, Resolving, StaticResolver};
pub use builder::FailoverClientBuilder;
pub use client::{FailoverClient, MasterConnection, MasterInfo};
pub use error::{Error, NodeFailure, Result};
pub use events::{Event, MetricsSnapshot, Trigger};
pub use node::{Credentials, MasterCheck};
