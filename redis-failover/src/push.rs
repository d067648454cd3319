//! Connections of the caller's own to the master (or to a node the caller
//! names: each master of a cluster), over RESP3 with push messages: for connection state the shared connections cannot hold,
//! such as `CLIENT TRACKING` (the server's invalidation messages of a
//! client-side cache arrive as pushes on the tracked connection itself).

use std::sync::Arc;

use redis::PushInfo;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc::UnboundedSender;

use crate::addr::NodeAddr;
use crate::backend::Backend;
use crate::client::{FailoverClient, MasterInfo, wait_for};
use crate::error::{NodeFailure, Result};

impl FailoverClient {
    /// Opens a connection of the caller's own to the master (found first,
    /// within the retry budget), with the client's credentials, TLS and
    /// timeouts, speaking RESP3: the server's push messages go to `pushes`,
    /// followed by one [`PushKind::Disconnection`](redis::PushKind) when
    /// the connection ends. Needs Redis 6 or later (or Valkey).
    ///
    /// The connection does not follow failovers: the [`MasterInfo`] says
    /// which master, and which generation, it reached, and
    /// [`events`](Self::events) and [`master`](Self::master) tell when
    /// another one is installed. Whatever state the caller sets on it is
    /// its own to set again on a new connection.
    pub async fn push_connection(
        &self,
        pushes: UnboundedSender<PushInfo>,
    ) -> Result<(MasterInfo, MultiplexedConnection)> {
        let shared = Arc::clone(self.replicated(
            "one push connection to the master (open one per master with push_connection_to)",
        )?);
        wait_for(shared.settings.retry_policy(), || async {
            let (master, _) = shared.current().await?;
            match shared.data.connect_push(&master.node, pushes.clone()).await {
                Ok(connection) => {
                    let info = MasterInfo {
                        node: master.node.clone(),
                        generation: master.generation,
                    };
                    Ok((info, connection))
                }
                Err(error) => Err(vec![master.failure(error.to_string())]),
            }
        })
        .await
    }

    /// Opens a connection of the caller's own to `node` (one of
    /// [`masters`](Self::masters), typically: on a cluster, one per master
    /// for state such as `CLIENT TRACKING` kept on each), as
    /// [`push_connection`](Self::push_connection) does: RESP3, with the
    /// client's credentials, TLS and timeouts, its pushes and a final
    /// `Disconnection` sent to `pushes`. Retried within the retry budget
    /// while `node` cannot be reached. The connection stays on `node`
    /// whatever becomes of it: [`masters_epoch`](Self::masters_epoch)
    /// tells when the masters change.
    pub async fn push_connection_to(
        &self,
        node: &NodeAddr,
        pushes: UnboundedSender<PushInfo>,
    ) -> Result<MultiplexedConnection> {
        let (connector, policy) = match self.backend() {
            Backend::Replicated(shared) => (&shared.data, shared.settings.retry_policy()),
            Backend::Cluster(cluster) => (cluster.connector(), cluster.settings.policy),
        };
        wait_for(policy, || async {
            connector
                .connect_push(node, pushes.clone())
                .await
                .map_err(|error| {
                    vec![NodeFailure {
                        node: node.clone(),
                        reason: error.to_string(),
                    }]
                })
        })
        .await
    }
}
