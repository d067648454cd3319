//! The faults a chaos round injects, and how each is injected.
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis_topology::{Endpoint, NodeId};

use super::receiver::Mode;
use super::rig::{Rig, wait_until};
use super::{BoxError, DEADLINE, OUTAGE};

/// One fault injected in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of the master (it comes back as a replica afterwards).
    KillMaster,
    /// SIGSTOP of the master past Sentinel's down-after, then SIGCONT.
    PauseMaster,
    /// `SENTINEL FAILOVER`.
    SentinelFailover,
    /// Every sentinel killed and restarted.
    RestartSentinels,
    /// One offloader aborted mid-work; another takes its place.
    KillOffloader,
    /// The receiver answers 500 for a while.
    Receiver500,
    /// The receiver answers 429 for a while.
    Receiver429,
    /// The receiver drops every connection for a while.
    ReceiverDown,
    /// The master at `maxmemory` (no eviction) for a while: writes get
    /// `OOM`.
    OutOfMemory,
    /// The master unable to persist, as on a full disk: a snapshot fails
    /// and writes get `MISCONF` until Sentinel, whose pings get it too,
    /// has replaced the master.
    DiskFull,
    /// The master accepts no new connection for a while (`maxclients`
    /// reached) and every client connection but the sentinels' is closed.
    MaxClients,
    /// kill -9 of the master and an immediate restart, before Sentinel
    /// notices, with persistence on (AOF, fsync at every write).
    RestartMaster,
    /// The same without persistence: the master comes back empty and its
    /// replicas empty themselves to follow it. Loses acknowledged writes by
    /// design (Redis's documented hazard); runs on its own.
    RestartMasterEmpty,
    /// The master cut from every sentinel (a network partition) while the
    /// clients still reach it: Sentinel promotes a replica; healed once the
    /// old master is replaced.
    CutMasterFromSentinels,
    /// The clients (both servers) cut from the master for a while, the
    /// sentinels still reaching it, then healed.
    CutClientFromMaster,
    /// Redis Cluster: kill -9 of the master of the first tenant's shard;
    /// restarted once its replica took over, it rejoins as a replica.
    KillShardMaster,
    /// Redis Cluster: SIGSTOP of the master of the second tenant's shard
    /// past the node timeout, then SIGCONT.
    PauseShardMaster,
    /// Redis Cluster: `CLUSTER FAILOVER` on the replica of the third
    /// tenant's shard.
    ClusterFailover,
    /// Redis Cluster: the first tenant's slot (all its keys) moved to
    /// another shard under its traffic.
    MoveTenantSlot,
}

impl Fault {
    /// Every fault that loses nothing, in the order rounds cycle through
    /// them: master faults are spaced by others, as Sentinel waits between
    /// two failovers.
    pub const ALL: [Fault; 12] = [
        Fault::KillMaster,
        Fault::KillOffloader,
        Fault::Receiver500,
        Fault::PauseMaster,
        Fault::OutOfMemory,
        Fault::RestartSentinels,
        Fault::Receiver429,
        Fault::SentinelFailover,
        Fault::DiskFull,
        Fault::ReceiverDown,
        Fault::MaxClients,
        Fault::RestartMaster,
    ];

    /// The network faults: they need the nodes in network namespaces
    /// (root, or the capabilities to create them).
    pub const NETWORK: [Fault; 2] = [Fault::CutMasterFromSentinels, Fault::CutClientFromMaster];

    /// The Redis Cluster faults, in the order rounds cycle through them.
    pub const CLUSTER: [Fault; 4] = [
        Fault::KillShardMaster,
        Fault::MoveTenantSlot,
        Fault::PauseShardMaster,
        Fault::ClusterFailover,
    ];

    /// Whether the fault is made for a Redis Cluster: a run with one runs
    /// on a cluster (and only such faults).
    pub fn needs_cluster(self) -> bool {
        Self::CLUSTER.contains(&self)
    }

    /// Whether the fault needs the nodes in network namespaces.
    pub fn needs_network(self) -> bool {
        Self::NETWORK.contains(&self)
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Fault::KillMaster => "kill -9 master",
            Fault::PauseMaster => "SIGSTOP master",
            Fault::SentinelFailover => "SENTINEL FAILOVER",
            Fault::RestartSentinels => "restart sentinels",
            Fault::KillOffloader => "kill offloader",
            Fault::Receiver500 => "receiver 500",
            Fault::Receiver429 => "receiver 429",
            Fault::ReceiverDown => "receiver down",
            Fault::OutOfMemory => "maxmemory (OOM)",
            Fault::DiskFull => "disk full (MISCONF)",
            Fault::MaxClients => "maxclients reached",
            Fault::RestartMaster => "restart master, AOF",
            Fault::RestartMasterEmpty => "restart master, empty",
            Fault::CutMasterFromSentinels => "master cut from sentinels",
            Fault::CutClientFromMaster => "clients cut from master",
            Fault::KillShardMaster => "kill -9 shard master",
            Fault::PauseShardMaster => "SIGSTOP shard master",
            Fault::ClusterFailover => "CLUSTER FAILOVER",
            Fault::MoveTenantSlot => "tenant's slot moved",
        }
    }

    /// Whether the fault may make Sentinel fail over: rounds wait before
    /// the next such fault, as Sentinel refuses a new failover sooner.
    pub(super) fn changes_master(self) -> bool {
        matches!(
            self,
            Fault::KillMaster
                | Fault::PauseMaster
                | Fault::SentinelFailover
                | Fault::DiskFull
                | Fault::RestartMaster
                | Fault::RestartMasterEmpty
                | Fault::CutMasterFromSentinels
        )
    }

    /// Whether the master refuses writes at once while the fault lasts
    /// (answered 503 with a code of their own, not retried).
    pub fn refuses_writes(self) -> bool {
        matches!(self, Fault::OutOfMemory | Fault::DiskFull)
    }
}

/// Injects `fault`, and returns once it is over (the old master back as a
/// replica, the receiver answering again, limits lifted).
pub(super) async fn inject(rig: &mut Rig, fault: Fault) -> Result<(), BoxError> {
    match fault {
        Fault::KillOffloader => {
            // Dropped mid-work: its pending entries are claimed by the others.
            drop(rig.offloaders.remove(0));
            rig.add_offloader()
        }
        Fault::Receiver500 | Fault::Receiver429 | Fault::ReceiverDown => {
            rig.receiver.set(match fault {
                Fault::Receiver500 => Mode::Status(500),
                Fault::Receiver429 => Mode::Status(429),
                _ => Mode::Down,
            });
            tokio::time::sleep(OUTAGE).await;
            rig.receiver.set(Mode::Accept);
            Ok(())
        }
        _ if fault.needs_cluster() => super::cluster_faults::inject(rig.cluster()?, fault).await,
        _ => sentinel_fault(rig, fault).await,
    }
}

/// Injects a fault of the Sentinel topology.
async fn sentinel_fault(rig: &Rig, fault: Fault) -> Result<(), BoxError> {
    let topology = rig.topology()?;
    match fault {
        Fault::KillMaster => {
            let old = rig.current_master().await?;
            topology.kill(old)?;
            let new = topology.wait_for_new_master(old, DEADLINE).await?;
            topology.restart(old).await?;
            topology.replicate(old, new, DEADLINE).await?;
        }
        Fault::PauseMaster => {
            let old = rig.current_master().await?;
            topology.pause(old)?;
            let new = topology.wait_for_new_master(old, DEADLINE).await;
            topology.resume(old)?;
            topology.wait_for_replica_of(old, new?, DEADLINE).await?;
        }
        Fault::SentinelFailover => {
            let old = rig.current_master().await?;
            topology.sentinel_failover().await?;
            let new = topology.wait_for_new_master(old, DEADLINE).await?;
            topology.wait_for_replica_of(old, new, DEADLINE).await?;
        }
        Fault::RestartSentinels => {
            for sentinel in topology.sentinels() {
                topology.kill(sentinel)?;
            }
            for sentinel in topology.sentinels() {
                topology.restart(sentinel).await?;
            }
        }
        Fault::OutOfMemory => out_of_memory(rig).await?,
        Fault::DiskFull => disk_full(rig).await?,
        Fault::MaxClients => max_clients(rig).await?,
        Fault::RestartMaster | Fault::RestartMasterEmpty => {
            restart_master(rig, fault == Fault::RestartMaster).await?;
        }
        Fault::CutMasterFromSentinels => {
            let old = rig.current_master().await?;
            for sentinel in topology.sentinels() {
                topology.cut(old, sentinel)?;
            }
            let new = topology.wait_for_new_master(old, DEADLINE).await;
            for sentinel in topology.sentinels() {
                topology.heal(old, sentinel)?;
            }
            topology.wait_for_replica_of(old, new?, DEADLINE).await?;
        }
        Fault::CutClientFromMaster => {
            let master = rig.current_master().await?;
            topology.cut(Endpoint::Client, master)?;
            tokio::time::sleep(OUTAGE).await;
            topology.heal(Endpoint::Client, master)?;
        }
        other => return Err(format!("chaos: {} is no Sentinel fault", other.name()).into()),
    }
    Ok(())
}

/// A connection of its own to the master, for the commands that set a
/// fault up and lift it.
async fn master_connection(rig: &Rig) -> Result<(NodeId, MultiplexedConnection), BoxError> {
    let master = rig.current_master().await?;
    Ok((master, rig.topology()?.connection(master).await?))
}

async fn config_set(
    conn: &mut MultiplexedConnection,
    name: &str,
    value: &str,
) -> Result<(), BoxError> {
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async(conn)
        .await?;
    Ok(())
}

/// Polls `INFO persistence` until `done` holds.
async fn wait_for_persistence(
    conn: &mut MultiplexedConnection,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> Result<(), BoxError> {
    wait_until(what, async || {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(conn)
            .await
            .unwrap_or_default();
        done(&info)
    })
    .await
}

async fn out_of_memory(rig: &Rig) -> Result<(), BoxError> {
    let (_, mut conn) = master_connection(rig).await?;
    // Any dataset is over one byte; the default policy evicts nothing.
    config_set(&mut conn, "maxmemory", "1").await?;
    tokio::time::sleep(OUTAGE).await;
    config_set(&mut conn, "maxmemory", "0").await
}

/// A failed snapshot stops writes (`stop-writes-on-bgsave-error`, on by
/// default, while snapshots are configured), as when a full disk fails its
/// write: here the snapshot cannot take its file name, which a non-empty
/// directory holds. The master then answers `MISCONF` to writes and to
/// Sentinel's pings, so Sentinel fails over; the disk is mended once it
/// has.
async fn disk_full(rig: &Rig) -> Result<(), BoxError> {
    let (old, mut conn) = master_connection(rig).await?;
    let blocked = format!("no-room-{}", rand::random::<u32>());
    let (_, dir): (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("dir")
        .query_async(&mut conn)
        .await?;
    let dir = std::path::Path::new(&dir).join(&blocked);
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("keep"), "")?;
    config_set(&mut conn, "dbfilename", &blocked).await?;
    config_set(&mut conn, "save", "3600 1").await?;
    let () = redis::cmd("BGSAVE").query_async(&mut conn).await?;
    wait_for_persistence(&mut conn, "the snapshot failing", |info| {
        info.contains("rdb_last_bgsave_status:err")
    })
    .await?;
    // The disk stays full until Sentinel has replaced the master: it
    // answers Sentinel's pings with `MISCONF`, and is seen as down.
    let new = rig.topology()?.wait_for_new_master(old, DEADLINE).await?;
    // Without snapshots configured, a failed one no longer stops writes.
    config_set(&mut conn, "save", "").await?;
    config_set(&mut conn, "dbfilename", "dump.rdb").await?;
    std::fs::remove_dir_all(&dir)?;
    rig.topology()?
        .wait_for_replica_of(old, new, DEADLINE)
        .await?;
    Ok(())
}

async fn max_clients(rig: &Rig) -> Result<(), BoxError> {
    let (_, mut conn) = master_connection(rig).await?;
    let (_, limit): (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxclients")
        .query_async(&mut conn)
        .await?;
    config_set(&mut conn, "maxclients", "1").await?;
    // The sentinels keep theirs, so that no failover follows.
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await?;
    let own: u64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await?;
    for line in list.lines() {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_default()
        };
        let replica = field("flags").contains('S');
        if field("id") == own.to_string() || replica || field("name").starts_with("sentinel-") {
            continue;
        }
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(field("id"))
            .query_async(&mut conn)
            .await?;
    }
    tokio::time::sleep(OUTAGE).await;
    config_set(&mut conn, "maxclients", &limit).await
}

/// kill -9 and restart at once; with `persist`, AOF with an fsync per
/// write is turned on (and written to the node's config) first.
async fn restart_master(rig: &Rig, persist: bool) -> Result<(), BoxError> {
    let (master, mut conn) = master_connection(rig).await?;
    let topology = rig.topology()?;
    if persist {
        config_set(&mut conn, "appendfsync", "always").await?;
        config_set(&mut conn, "appendonly", "yes").await?;
        wait_for_persistence(&mut conn, "the AOF written", |info| {
            info.contains("aof_enabled:1")
                && info.contains("aof_rewrite_in_progress:0")
                && info.contains("aof_rewrite_scheduled:0")
        })
        .await?;
        let () = redis::cmd("CONFIG")
            .arg("REWRITE")
            .query_async(&mut conn)
            .await?;
    }
    drop(conn);
    topology.kill(master)?;
    topology.restart(master).await?;
    settled(rig).await
}

/// Waits until the master the sentinels name has every other data node as
/// an online replica, naming it afresh at each try: a failover may be
/// under way (a restart that took longer than Sentinel's down-after).
async fn settled(rig: &Rig) -> Result<(), BoxError> {
    let topology = rig.topology()?;
    wait_until("the topology settled", async || {
        let Ok(master) = rig.current_master().await else {
            return false;
        };
        for node in topology.data_nodes() {
            let online = topology
                .wait_for_replica_of(node, master, Duration::from_secs(2))
                .await;
            if node != master && online.is_err() {
                return false;
            }
        }
        true
    })
    .await
}
