//! The system a chaos run drives: a Sentinel topology or a Redis Cluster,
//! two server instances as the manifests run them, two offloaders and a
//! Loki-compatible receiver.

use std::time::{Duration, Instant};

use log_buffer::{LokiSink, Offloader};
use redis_failover::FailoverClient;
use redis_topology::{Cluster, NodeId, Topology};
use server::System;
use tenant_kv::{Actor, NewUser, TenantId};

use super::receiver::Receiver;
use super::{BoxError, DEADLINE, FAILOVER_TIMEOUT, PASSWORD, RETRY_BUDGET, TENANTS};
use crate::Http;

/// The Redis a run's servers use.
pub(super) enum Deployment {
    /// A master, 2 replicas and 3 sentinels.
    Sentinel(Topology),
    /// 3 shards of a master and a replica.
    Cluster(Cluster),
}

pub(super) struct Rig {
    pub(super) deployment: Deployment,
    pub(super) receiver: Receiver,
    pub(super) servers: [System; 2],
    pub(super) offloaders: Vec<Offloader>,
    next_offloader: usize,
}

impl Rig {
    /// Starts everything: on a Redis Cluster with `cluster`, else on a
    /// Sentinel topology, each node in a network namespace of its own with
    /// `network`, so that links can be cut.
    pub(super) async fn start(network: bool, cluster: bool) -> Result<Self, BoxError> {
        let deployment = if cluster {
            let cluster = Cluster::builder()
                .shards(3)
                .replicas_per_shard(1)
                .start()
                .await?;
            Deployment::Cluster(cluster)
        } else {
            let topology = Topology::builder()
                .network_namespaces(network)
                .down_after(Duration::from_millis(1000))
                .failover_timeout(FAILOVER_TIMEOUT)
                // The disk-full fault changes the snapshot file name at run
                // time (from the client, which is not on loopback with
                // namespaces).
                .extra_config("enable-protected-configs yes")
                .start()
                .await?;
            Deployment::Sentinel(topology)
        };
        let receiver = Receiver::start().await?;
        let (secret, cursor_secret): ([u8; 32], [u8; 32]) = (rand::random(), rand::random());
        let servers = [
            server_instance(&deployment, &secret, &cursor_secret).await?,
            server_instance(&deployment, &secret, &cursor_secret).await?,
        ];
        for tenant in TENANTS {
            let user = NewUser {
                username: format!("{tenant}-user"),
                tenant: TenantId::new(tenant)?,
                email: None,
                full_name: None,
                admin: false,
            };
            servers[0]
                .store()
                .users()
                .create(user, PASSWORD, &Actor::system())
                .await?;
        }
        let mut rig = Self {
            deployment,
            receiver,
            servers,
            offloaders: Vec::new(),
            next_offloader: 1,
        };
        rig.add_offloader()?;
        rig.add_offloader()?;
        Ok(rig)
    }

    /// The first server's failover client.
    pub(super) fn client(&self) -> &FailoverClient {
        self.servers[0].client()
    }

    /// A client of each server, logged in as `tenant`'s user.
    pub(super) async fn clients(&self, tenant: &str) -> Vec<Http> {
        let mut clients = Vec::new();
        for server in &self.servers {
            let http = Http::new(server.local_addr());
            clients.push(http.login(&format!("{tenant}-user"), PASSWORD).await);
        }
        clients
    }

    /// One more offloader, as `server offload` runs it.
    pub(super) fn add_offloader(&mut self) -> Result<(), BoxError> {
        let name = format!("offloader-{}", self.next_offloader);
        self.next_offloader += 1;
        let sink = LokiSink::builder(&self.receiver.url).build()?;
        let offloader = Offloader::builder(server::log_client(self.client()), sink)
            .consumer(name)
            .poll_interval(Duration::from_millis(50))
            .discovery_interval(Duration::from_millis(500))
            .claim_idle(Duration::from_secs(2))
            .backoff(redis_failover::Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(1),
            )?)
            .start()?;
        self.offloaders.push(offloader);
        Ok(())
    }

    /// The Sentinel topology, for the faults made for it.
    pub(super) fn topology(&self) -> Result<&Topology, BoxError> {
        match &self.deployment {
            Deployment::Sentinel(topology) => Ok(topology),
            Deployment::Cluster(_) => Err("chaos: a Sentinel fault on a cluster run".into()),
        }
    }

    /// The Redis Cluster, for the faults made for it.
    pub(super) fn cluster(&self) -> Result<&Cluster, BoxError> {
        match &self.deployment {
            Deployment::Cluster(cluster) => Ok(cluster),
            Deployment::Sentinel(_) => Err("chaos: a cluster fault on a Sentinel run".into()),
        }
    }

    /// The Redis server's kind and version.
    pub(super) fn server_version(&self) -> String {
        let server = match &self.deployment {
            Deployment::Sentinel(topology) => topology.server(),
            Deployment::Cluster(cluster) => cluster.server(),
        };
        let (major, minor) = server.version();
        format!("{:?} {major}.{minor}", server.kind())
    }

    /// The master as the sentinels name it.
    pub(super) async fn current_master(&self) -> Result<NodeId, BoxError> {
        let topology = self.topology()?;
        for sentinel in topology.sentinels() {
            if let Ok(Some(addr)) = topology.sentinel_master_addr(sentinel).await
                && let Some(node) = topology.node_at(addr)
            {
                return Ok(node);
            }
        }
        Err("no sentinel names a master".into())
    }

    pub(super) async fn shutdown(self) {
        for offloader in self.offloaders {
            offloader.shutdown(Duration::from_secs(5)).await;
        }
        for server in self.servers {
            server.shutdown().await;
        }
    }
}

/// One server as the manifests run it (`deploy/k8s`), with its own
/// failover client. On Sentinel, writes wait for both replicas, down to one
/// once a replica has been gone for 8 s, and a replaced master is made a
/// replica as soon as it answers; on a cluster (the `cluster` overlay),
/// writes wait for their shard's replica.
async fn server_instance(
    deployment: &Deployment,
    secret: &[u8],
    cursor_secret: &[u8],
) -> Result<System, BoxError> {
    let mut env = vec![
        ("SERVER_LISTEN", "127.0.0.1:0".to_owned()),
        ("SERVER_ADMIN_LISTEN", "off".to_owned()),
        (
            "SERVER_REDIS_RETRY_BUDGET",
            format!("{}s", RETRY_BUDGET.as_secs()),
        ),
        // Audit records go to Redis streams from the store itself; this
        // process's own logs are not what the run checks.
        ("SERVER_LOG_BUFFER", "false".to_owned()),
    ];
    match deployment {
        Deployment::Sentinel(_) => env.extend([
            ("SERVER_REDIS_WAIT_REPLICAS", "2".to_owned()),
            ("SERVER_REDIS_WAIT_REPLICAS_MIN", "1".to_owned()),
            ("SERVER_REDIS_REPLICA_LOST_AFTER", "8s".to_owned()),
            ("SERVER_REDIS_DEMOTE_STALE_MASTER", "true".to_owned()),
        ]),
        Deployment::Cluster(_) => env.push(("SERVER_REDIS_WAIT_REPLICAS", "1".to_owned())),
    }
    let env = env
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value));
    let mut settings = match deployment {
        Deployment::Sentinel(topology) => server::dev::topology_settings(topology, env)?,
        Deployment::Cluster(cluster) => server::dev::cluster_settings(cluster, env)?,
    };
    settings.jwt.secret = Some(secret.to_vec());
    settings.cursor_secret = Some(cursor_secret.to_vec());
    let system = System::builder(settings).start().await?;
    system
        .client()
        .wait_for_master(Duration::from_secs(10))
        .await?;
    Ok(system)
}

/// Polls `done` until it holds, for at most [`DEADLINE`].
pub(super) async fn wait_until(
    what: &str,
    mut done: impl AsyncFnMut() -> bool,
) -> Result<(), BoxError> {
    let started = Instant::now();
    while !done().await {
        if started.elapsed() > DEADLINE {
            return Err(format!("chaos: {what} not within {DEADLINE:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
