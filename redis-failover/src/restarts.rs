//! Telling a restarted master from the same master reconnected.
//!
//! A master killed and started again before Sentinel notices keeps its
//! address, and clients reconnect to it as if nothing happened. Without
//! persistence it comes back empty, and its replicas empty themselves to
//! follow it (Redis documents this hazard): it is not the dataset it was.
//! Every start draws a new run id, and a start without the old history a
//! new replication id, both in `INFO`. The client reads them whenever it
//! opens a master's shared connection and compares them with what the
//! last master it opened said, if that was the same node: a change is
//! reported ([`Event::MasterRestarted`]) and the node is installed as a
//! new master, in a new generation, so nothing learnt of the old process
//! (replicas counted, the durable-writes lane, the persistence check) is
//! kept. Only the last master counts: a node that was master, lost the
//! role in a failover, restarted as a replica and was promoted again is
//! a failover's work, not a restart. (Behind one load-balanced address,
//! another process answering counts as a restart: it is another dataset.)

use std::sync::Mutex;

use redis::aio::MultiplexedConnection;

use crate::addr::NodeAddr;
use crate::events::{Counter, Event, Telemetry};

/// Who a master process is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Identity {
    /// New at every start (`run_id`).
    run_id: String,
    /// New when the process starts without its old replication history
    /// (`master_replid`).
    replication_id: String,
}

/// Who the last master opened was.
#[derive(Debug, Default)]
pub(crate) struct Restarts {
    last: Mutex<Option<(NodeAddr, Identity)>>,
}

impl Restarts {
    /// Reads who `node` is on `connection` and whether it restarted since
    /// it was last opened as master, with no other master opened since
    /// (reporting it if so). A node that cannot say (`INFO` refused, say by
    /// an ACL) counts as not restarted.
    pub(crate) async fn check(
        &self,
        node: &NodeAddr,
        connection: &mut MultiplexedConnection,
        telemetry: &Telemetry,
    ) -> bool {
        let Some(identity) = identity(connection).await else {
            return false;
        };
        let before = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .replace((node.clone(), identity.clone()));
        let Some((_, before)) =
            before.filter(|(last, before)| last == node && before.run_id != identity.run_id)
        else {
            return false;
        };
        let replication_id_changed = before.replication_id != identity.replication_id;
        tracing::warn!(
            %node,
            replication_id_changed,
            "the master restarted: installed as a new master"
        );
        telemetry.add(Counter::MasterRestarts);
        telemetry.emit(Event::MasterRestarted {
            node: node.clone(),
            replication_id_changed,
        });
        true
    }
}

async fn identity(connection: &mut MultiplexedConnection) -> Option<Identity> {
    let (server, replication): (String, String) = redis::pipe()
        .cmd("INFO")
        .arg("server")
        .cmd("INFO")
        .arg("replication")
        .query_async(connection)
        .await
        .inspect_err(|error| tracing::debug!(%error, "INFO refused: restarts go unseen"))
        .ok()?;
    Some(Identity {
        run_id: field(&server, "run_id")?,
        replication_id: field(&replication, "master_replid")?,
    })
}

fn field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_info_sections() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\nrun_id_x:no\r\n";
        assert_eq!(field(info, "run_id").as_deref(), Some("abc123"));
        assert_eq!(field(info, "missing"), None);
    }
}
