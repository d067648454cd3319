//! The system a chaos run drives: a topology, two server instances as the
//! manifests run them, two offloaders and a Loki-compatible receiver.

use std::time::{Duration, Instant};

use log_buffer::{LokiSink, Offloader};
use redis_failover::FailoverClient;
use redis_topology::{NodeId, Topology};
use server::System;
use tenant_kv::{Actor, NewUser, TenantId};

use super::receiver::Receiver;
use super::{BoxError, DEADLINE, FAILOVER_TIMEOUT, PASSWORD, RETRY_BUDGET, TENANTS};
use crate::Http;

pub(super) struct Rig {
    pub(super) topology: Topology,
    pub(super) receiver: Receiver,
    pub(super) servers: [System; 2],
    pub(super) offloaders: Vec<Offloader>,
    next_offloader: usize,
}

impl Rig {
    /// Starts everything; with `network`, each node in a network namespace
    /// of its own, so that links can be cut.
    pub(super) async fn start(network: bool) -> Result<Self, BoxError> {
        let topology = Topology::builder()
            .network_namespaces(network)
            .down_after(Duration::from_millis(1000))
            .failover_timeout(FAILOVER_TIMEOUT)
            // The disk-full fault changes the snapshot file name at run time
            // (from the client, which is not on loopback with namespaces).
            .extra_config("enable-protected-configs yes")
            .start()
            .await?;
        let receiver = Receiver::start().await?;
        let (secret, cursor_secret): ([u8; 32], [u8; 32]) = (rand::random(), rand::random());
        let servers = [
            server_instance(&topology, &secret, &cursor_secret).await?,
            server_instance(&topology, &secret, &cursor_secret).await?,
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
            topology,
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

    /// The master as the sentinels name it.
    pub(super) async fn current_master(&self) -> Result<NodeId, BoxError> {
        for sentinel in self.topology.sentinels() {
            if let Ok(Some(addr)) = self.topology.sentinel_master_addr(sentinel).await
                && let Some(node) = self.topology.node_at(addr)
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
/// failover client: writes wait for both replicas, down to one once a
/// replica has been gone for 8 s, and a replaced master is made a replica
/// as soon as it answers.
async fn server_instance(
    topology: &Topology,
    secret: &[u8],
    cursor_secret: &[u8],
) -> Result<System, BoxError> {
    let env = [
        ("SERVER_LISTEN", "127.0.0.1:0".to_owned()),
        ("SERVER_ADMIN_LISTEN", "off".to_owned()),
        (
            "SERVER_REDIS_RETRY_BUDGET",
            format!("{}s", RETRY_BUDGET.as_secs()),
        ),
        ("SERVER_REDIS_WAIT_REPLICAS", "2".to_owned()),
        ("SERVER_REDIS_WAIT_REPLICAS_MIN", "1".to_owned()),
        ("SERVER_REDIS_REPLICA_LOST_AFTER", "8s".to_owned()),
        ("SERVER_REDIS_DEMOTE_STALE_MASTER", "true".to_owned()),
        // Audit records go to Redis streams from the store itself; this
        // process's own logs are not what the run checks.
        ("SERVER_LOG_BUFFER", "false".to_owned()),
    ];
    let env = env.map(|(name, value)| (name.to_owned(), value));
    let mut settings = server::dev::topology_settings(topology, env)?;
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
