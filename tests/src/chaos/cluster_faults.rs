//! The faults of a chaos run on a Redis Cluster, each aimed at the shard
//! of one of the run's tenants, so that it lands under traffic.

use redis_topology::{Cluster, FailoverMode, NodeId, slot_of};

use super::fault::Fault;
use super::{BoxError, DEADLINE, OUTAGE, TENANTS};

/// Injects `fault` and returns once the cluster is stable again (every
/// node agreeing on the map, the old master back as a replica).
pub(super) async fn inject(cluster: &Cluster, fault: Fault) -> Result<(), BoxError> {
    match fault {
        Fault::KillShardMaster => {
            let old = master_of_tenant(cluster, TENANTS[0]).await?;
            cluster.kill(old)?;
            cluster.wait_for_failover(old, DEADLINE).await?;
            // It knows from its nodes.conf it was a master; the cluster
            // tells it that its slots have a newer owner, which it follows.
            cluster.restart(old).await?;
        }
        Fault::PauseShardMaster => {
            let old = master_of_tenant(cluster, TENANTS[1]).await?;
            cluster.pause(old)?;
            let failed_over = cluster.wait_for_failover(old, DEADLINE).await;
            cluster.resume(old)?;
            failed_over?;
        }
        Fault::ClusterFailover => {
            let master = master_of_tenant(cluster, TENANTS[2]).await?;
            let replica = replica_of(cluster, master).await?;
            cluster.failover(replica, FailoverMode::Default).await?;
        }
        Fault::MoveTenantSlot => {
            let slot = tenant_slot(TENANTS[0]);
            let from = master_of_tenant(cluster, TENANTS[0]).await?;
            let shards = cluster.shards().await?;
            let to = shards
                .iter()
                .map(|shard| shard.master)
                .find(|&master| master != from)
                .ok_or("chaos: a cluster of one shard")?;
            cluster.move_slot(slot, to).await?;
        }
        other => return Err(format!("chaos: {} is no cluster fault", other.name()).into()),
    }
    // A moved slot or a new master takes the other nodes a moment to agree on.
    cluster.wait_stable(DEADLINE + OUTAGE).await?;
    Ok(())
}

/// The slot of every key of `tenant` (its hash tag `{tenant}`).
fn tenant_slot(tenant: &str) -> u16 {
    slot_of(tenant.as_bytes())
}

/// The master serving `tenant`'s slot now.
async fn master_of_tenant(cluster: &Cluster, tenant: &str) -> Result<NodeId, BoxError> {
    let slot = tenant_slot(tenant);
    Ok(cluster
        .master_of_slot(slot)
        .await?
        .ok_or_else(|| format!("chaos: no master serves slot {slot}"))?)
}

/// A replica of `master`.
async fn replica_of(cluster: &Cluster, master: NodeId) -> Result<NodeId, BoxError> {
    let shards = cluster.shards().await?;
    let shard = shards
        .iter()
        .find(|shard| shard.master == master)
        .ok_or("chaos: the master is in no shard")?;
    Ok(*shard
        .replicas
        .first()
        .ok_or("chaos: a shard without replica")?)
}
