//! End-to-end tests of the workspace: the crates composed as the service
//! composes them, run against real Redis master/replica/Sentinel processes
//! started by `redis-topology`, with faults injected while traffic flows.
//!
//! The tests live in this crate's `tests/` directory; each starts its own
//! topology on free loopback ports, so they run in parallel.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
