#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod addr;
mod backend;
mod backoff;
mod builder;
mod client;
mod cluster;
mod cluster_exec;
mod cluster_state;
mod connections;
mod dedicated;
mod discovery;
mod durable;
mod epochs;
mod error;
mod events;
mod execute;
mod group_commit;
mod lane;
mod node;
mod persisted;
mod policy;
mod pubsub;
mod pubsub_each;
mod pubsub_source;
mod push;
mod read;
mod replica_set;
mod replicas;
mod replicated;
mod request;
mod restarts;
mod retry;
mod routing;
mod session;
mod shared;
mod slots;
mod state;
mod tasks;
mod transaction;

pub use addr::{DnsResolver, NodeAddr, Resolve, Resolving, StaticResolver};
pub use backoff::Backoff;
pub use builder::FailoverClientBuilder;
pub use client::{FailoverClient, MasterInfo, ReplicaStatus};
pub use cluster::ClusterClientBuilder;
pub use connections::{MasterConnection, ReadConnection};
pub use durable::ReplicationStatus;
pub use error::{Error, ErrorKind, NodeFailure, Result};
pub use events::{Event, MetricsSnapshot, Trigger};
pub use node::{Credentials, MasterCheck, Tls};
pub use pubsub::{Delivery, Gap, SUBSCRIPTION_BUFFER, Subscription};
pub use routing::{Durability, ReadPolicy};
pub use session::Session;
pub use transaction::Watched;
