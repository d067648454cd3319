//! Blocking commands in cluster mode (`BLPOP`, `XREAD BLOCK`...): on a
//! connection of their own to the master of their slot, so that they hold
//! no connection other requests share, with their own timeout added to
//! the command timeout as with one master. A slot that moves away while
//! one blocks needs no unblocking by the client: Redis answers the
//! blocked command with `MOVED` (or `UNBLOCKED`) itself, nothing ran, and
//! it is resent to the slot's new master.

use std::time::Duration;

use crate::addr::NodeAddr;
use crate::cluster_state::ClusterShared;
use crate::dedicated::{all_failed, checkout, send_marked_on, wait_on};
use crate::durable::Ack;
use crate::events::Counter;
use crate::request::{Request, Sent};
use crate::retry::Block;

impl ClusterShared {
    /// Sends `request` on a dedicated connection to `node` (after `ASKING`
    /// when `asking`), giving it `block` more than the command timeout to
    /// answer; a durable write is `WAIT`ed for there after it ran.
    pub(crate) async fn send_dedicated(
        &self,
        node: &NodeAddr,
        request: Request<'_>,
        idempotent: bool,
        asking: bool,
        (block, ack): (Block, Option<Ack>),
    ) -> Sent {
        let exclusive = self.nodes.of(node, &self.connector);
        let limit = self.nodes.dedicated_connections;
        let mut pooled = match checkout(&exclusive.dedicated, limit).await {
            Ok(pooled) => pooled,
            Err(sent) => return sent,
        };
        let connection = &mut *pooled;
        let timeout = self.connector.response_timeout();
        let patience = match block {
            Block::For(block) => block.saturating_add(timeout),
            Block::Forever => Duration::MAX,
        };
        connection.multiplexed.set_response_timeout(patience);
        let reply = send_marked_on(connection, request, asking).await;
        connection.multiplexed.set_response_timeout(timeout);
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => return Sent::Failed(error),
        };
        if let Some((refusal, _)) = request.refusal(&reply, idempotent) {
            return Sent::Failed(refusal);
        }
        let Some(ack) = ack.filter(|_| !all_failed(&reply)) else {
            return Sent::Done(reply);
        };
        let acked = wait_on(connection, ack, timeout).await;
        match ack.outcome(node, &acked) {
            Ok(()) => Sent::Done(reply),
            Err(error) => {
                self.telemetry.add(Counter::UnreplicatedWrites);
                Sent::Unreplicated(error)
            }
        }
    }
}
