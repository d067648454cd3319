#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Errors carry log tails for diagnosis and occur off any hot path; keeping
// them unboxed lets callers match on their fields directly.
#![allow(clippy::result_large_err)]

mod builder;
mod cluster;
mod error;
mod faults;
mod network;
mod node;
mod orphans;
mod ports;
mod server;
mod tls;
mod topology;
mod waits;

pub use builder::TopologyBuilder;
pub use cluster::{Cluster, ClusterBuilder, FailoverMode, SLOT_COUNT, Shard, slot_of};
pub use error::{Error, Result};
pub use network::{Endpoint, check_network_namespaces};
pub use node::{NodeId, NodeKind};
/// The Redis client this crate speaks through; [`Role`] and connection types come from it.
pub use redis;
pub use redis::Role;
pub use server::{Server, ServerKind};
pub use topology::Topology;
