//! Opening connections to one node and checking its role; the master's
//! shared connection, and the bb8 manager of its dedicated ones.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisConnectionInfo,
    RedisError, RedisResult, Role,
};

use crate::addr::{NodeAddr, Resolve};

/// Username and password for a group of nodes (data nodes or sentinels).
#[derive(Clone, Default)]
pub struct Credentials {
    username: Option<String>,
    password: Option<String>,
}

impl Credentials {
    /// No authentication. This is the default.
    pub fn none() -> Self {
        Self::default()
    }

    /// `AUTH <password>` (the `default` user, or `requirepass`).
    pub fn password(password: impl Into<String>) -> Self {
        Self {
            username: None,
            password: Some(password.into()),
        }
    }

    /// `AUTH <username> <password>` (an ACL user).
    pub fn user(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: Some(username.into()),
            password: Some(password.into()),
        }
    }

    fn redis_settings(&self) -> RedisConnectionInfo {
        let mut settings = RedisConnectionInfo::default();
        if let Some(username) = &self.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        settings
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// TLS for a group of nodes (data nodes or sentinels). A server's
/// certificate is verified against the node's configured name (or IP),
/// while the address connected to still comes from the client's
/// [`Resolve`]; only a sentinel's pub/sub connection over TLS resolves the
/// name with the system resolver.
#[derive(Clone)]
pub struct Tls {
    root_cert: Option<Vec<u8>>,
    client_cert: Option<(Vec<u8>, Vec<u8>)>,
}

impl Tls {
    /// Trust the system's root certificates.
    pub fn system_roots() -> Self {
        Self {
            root_cert: None,
            client_cert: None,
        }
    }

    /// Trust the CA certificate `pem` (PEM).
    pub fn root_cert(pem: impl Into<Vec<u8>>) -> Self {
        Self {
            root_cert: Some(pem.into()),
            client_cert: None,
        }
    }

    /// Present this client certificate and key (PEM), for servers with
    /// `tls-auth-clients yes`.
    pub fn client_cert(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client_cert
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.root_cert.clone(),
        }
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("root_cert", &self.root_cert.as_ref().map(|_| "<pem>"))
            .field(
                "client_cert",
                &self.client_cert.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Hands redis-rs the one address already resolved, so that a TLS
/// connection made by name goes where the [`Resolve`] implementation said.
struct ResolvedAddr(SocketAddr);

impl redis::io::AsyncDNSResolver for ResolvedAddr {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        _host: &'b str,
        _port: u16,
    ) -> redis::RedisFuture<'a, Box<dyn Iterator<Item = SocketAddr> + Send + 'a>> {
        let addr = self.0;
        Box::pin(async move {
            Ok(Box::new(std::iter::once(addr)) as Box<dyn Iterator<Item = SocketAddr> + Send>)
        })
    }
}

/// Opens connections to nodes of one kind (data nodes or sentinels):
/// resolves the name afresh, then connects with the kind's credentials and
/// timeouts.
#[derive(Clone, Debug)]
pub(crate) struct Connector {
    resolver: Arc<dyn Resolve>,
    credentials: Credentials,
    tls: Option<Tls>,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Sends `READONLY` on each new connection: a cluster replica answers
    /// reads only on connections that asked for it (else `MOVED`).
    read_only: bool,
}

impl Connector {
    pub(crate) fn new(
        resolver: Arc<dyn Resolve>,
        credentials: Credentials,
        tls: Option<Tls>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        Self {
            resolver,
            credentials,
            tls,
            connect_timeout,
            response_timeout,
            read_only: false,
        }
    }

    /// This connector for the replicas of a cluster: each connection it
    /// opens sends `READONLY` once first.
    pub(crate) fn read_only(&self) -> Self {
        Self {
            read_only: true,
            ..self.clone()
        }
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How long a reply may take (the command timeout).
    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// The addresses `node` resolves to now, the lookup bounded by the
    /// connect timeout.
    pub(crate) async fn resolve(&self, node: &NodeAddr) -> RedisResult<Vec<SocketAddr>> {
        match tokio::time::timeout(self.connect_timeout, self.resolver.resolve(node)).await {
            Ok(resolved) => Ok(resolved?),
            Err(elapsed) => Err(std::io::Error::from(elapsed).into()),
        }
    }

    /// Resolves `node` afresh and returns the first address `open` succeeds on.
    async fn first_address<T, F>(
        &self,
        node: &NodeAddr,
        open: impl Fn(SocketAddr) -> F,
    ) -> RedisResult<T>
    where
        F: Future<Output = RedisResult<T>>,
    {
        let mut last_error = RedisError::from((ErrorKind::Io, "name resolved to no address"));
        for addr in self.resolve(node).await? {
            match open(addr).await {
                Ok(opened) => return Ok(opened),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// A multiplexed connection to `node`.
    pub(crate) async fn connect(&self, node: &NodeAddr) -> RedisResult<MultiplexedConnection> {
        let mut connection = self
            .first_address(node, |addr| async move {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.response_timeout))
                    .set_dns_resolver(ResolvedAddr(addr));
                self.client(node, addr)?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
            })
            .await?;
        if self.read_only {
            redis::cmd("READONLY")
                .query_async::<()>(&mut connection)
                .await?;
        }
        Ok(connection)
    }

    /// A multiplexed connection to `node` over RESP3, its push messages
    /// (and a `Disconnection` when it ends) sent to `pushes`.
    pub(crate) async fn connect_push(
        &self,
        node: &NodeAddr,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> RedisResult<MultiplexedConnection> {
        self.first_address(node, |addr| {
            let pushes = pushes.clone();
            async move {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.response_timeout))
                    .set_dns_resolver(ResolvedAddr(addr))
                    .set_push_sender(pushes);
                self.client_with(node, addr, redis::ProtocolVersion::RESP3)?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
            }
        })
        .await
    }

    /// How long subscribing may take: connecting, then the answer, since a
    /// pub/sub connection has no reply timeout of its own.
    pub(crate) fn subscribe_limit(&self) -> Duration {
        self.connect_timeout + self.response_timeout
    }

    /// A pub/sub connection to `node`. (Over TLS, redis-rs resolves the
    /// name itself, with the system resolver.)
    pub(crate) async fn pubsub(&self, node: &NodeAddr) -> RedisResult<redis::aio::PubSub> {
        self.first_address(node, |addr| async move {
            let client = self.client(node, addr)?;
            match tokio::time::timeout(self.connect_timeout, client.get_async_pubsub()).await {
                Ok(pubsub) => pubsub,
                Err(elapsed) => Err(std::io::Error::from(elapsed).into()),
            }
        })
        .await
    }

    /// A client for `node` at `addr`: by address in plain TCP, by name over
    /// TLS so that the certificate is checked against the name.
    fn client(&self, node: &NodeAddr, addr: SocketAddr) -> RedisResult<redis::Client> {
        self.client_with(node, addr, redis::ProtocolVersion::RESP2)
    }

    /// [`client`](Self::client) speaking `protocol`.
    fn client_with(
        &self,
        node: &NodeAddr,
        addr: SocketAddr,
        protocol: redis::ProtocolVersion,
    ) -> RedisResult<redis::Client> {
        let settings = self.credentials.redis_settings().set_protocol(protocol);
        match &self.tls {
            None => {
                let info = ConnectionAddr::Tcp(addr.ip().to_string(), addr.port())
                    .into_connection_info()?
                    .set_redis_settings(settings);
                redis::Client::open(info)
            }
            Some(tls) => {
                let info = ConnectionAddr::TcpTls {
                    host: node.host().to_owned(),
                    port: addr.port(),
                    insecure: false,
                    tls_params: None,
                }
                .into_connection_info()?
                .set_redis_settings(settings);
                redis::Client::build_with_tls(info, tls.certificates())
            }
        }
    }
}

/// A shared multiplexed connection, and whether it is known to have failed.
pub(crate) struct Connection {
    pub(crate) multiplexed: MultiplexedConnection,
    /// Set on the first timeout or connection error: later requests do not
    /// send on it (it would fail without sending) but wait for a new one.
    failed: AtomicBool,
}

impl Connection {
    pub(crate) fn new(multiplexed: MultiplexedConnection) -> Arc<Self> {
        Arc::new(Self {
            multiplexed,
            failed: AtomicBool::new(false),
        })
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// It timed out or broke: nothing more is sent on it.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }
}

/// How a node proves it is the master.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MasterCheck {
    /// `ROLE` must say `master`. This is the default.
    #[default]
    Role,
    /// A throw-away write must succeed: `SET <unique key> 1 PX <ttl>`, then
    /// `DEL`. For servers where `ROLE` is not allowed; costs a write.
    WriteProbe {
        /// How long the probe key may live if the `DEL` is lost.
        ttl: Duration,
    },
}

static PROBE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique token, for PING echoes and probe keys.
pub(crate) fn unique_token() -> String {
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        PROBE_COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u64>()
    )
}

/// Fails unless the node on `connection` is a master, by `check`.
pub(crate) async fn verify_master(
    connection: &mut MultiplexedConnection,
    check: MasterCheck,
) -> RedisResult<()> {
    match check {
        MasterCheck::Role => match redis::cmd("ROLE").query_async::<Role>(connection).await? {
            Role::Primary { .. } => Ok(()),
            role => Err(not_master(&role)),
        },
        MasterCheck::WriteProbe { ttl } => {
            let key = format!("redis-failover:probe:{}", unique_token());
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            redis::pipe()
                .cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(ttl_ms)
                .ignore()
                .del(&key)
                .ignore()
                .query_async::<()>(connection)
                .await
        }
    }
}

/// Declares `CLIENT CAPA redirect` (Valkey 8 and later): once demoted,
/// the node answers a write (or a read: the connection is not `READONLY`)
/// with `-REDIRECT host:port`, the new master, instead of `READONLY`, and
/// the client goes straight there. Only connections to the master declare
/// it: a replica would redirect the reads it is meant to serve. A server
/// without it (Redis, an older Valkey, an ACL that denies it) answers an
/// error, which is ignored: `READONLY` is handled as before. Only a lost
/// connection fails.
async fn ask_for_redirects(connection: &mut MultiplexedConnection) -> RedisResult<()> {
    let declared = redis::cmd("CLIENT")
        .arg("CAPA")
        .arg("redirect")
        .query_async::<()>(connection)
        .await;
    match declared {
        Err(error) if error.clone().into_server_errors().is_none() => Err(error),
        _ => Ok(()),
    }
}

fn not_master(role: &Role) -> RedisError {
    let what = match role {
        Role::Replica {
            primary_ip,
            primary_port,
            ..
        } => format!("ROLE says replica of {primary_ip}:{primary_port}"),
        Role::Sentinel { .. } => "ROLE says sentinel".to_owned(),
        _ => format!("ROLE says {role:?}"),
    };
    redis::make_extension_error("READONLY".to_owned(), Some(what))
}

/// Opens connections to one master, checking on each that the node is
/// master: its shared connection (again once it failed) and, through
/// [`DedicatedManager`], those a request holds alone.
#[derive(Clone, Debug)]
pub(crate) struct MasterManager {
    pub(crate) connector: Connector,
    pub(crate) node: NodeAddr,
    pub(crate) check: MasterCheck,
}

impl MasterManager {
    pub(crate) async fn connect(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut connection = self.connector.connect(&self.node).await?;
        ask_for_redirects(&mut connection).await?;
        verify_master(&mut connection, self.check).await?;
        Ok(connection)
    }

    /// A unique token catches a connection whose replies are out of step.
    async fn ping(&self, connection: &mut MultiplexedConnection) -> Result<(), RedisError> {
        let token = unique_token();
        let echoed: String = redis::cmd("PING")
            .arg(&token)
            .query_async(connection)
            .await?;
        if echoed == token {
            Ok(())
        } else {
            Err(RedisError::from((
                ErrorKind::Client,
                "PING echoed another token",
                echoed,
            )))
        }
    }
}

/// A connection a blocking command, transaction or durable write's `WAIT`
/// holds alone.
pub(crate) struct Dedicated {
    pub(crate) multiplexed: MultiplexedConnection,
    /// Its `CLIENT ID`, to unblock it from another connection (`None`
    /// where `CLIENT ID` is not allowed).
    pub(crate) id: Option<u64>,
    /// Set after a connection error or timeout: bb8 then drops it rather
    /// than hand it out again.
    pub(crate) broken: bool,
}

/// bb8's view of the master's dedicated connections: opened like the
/// shared one (with the master check), dropped once broken.
#[derive(Clone, Debug)]
pub(crate) struct DedicatedManager(pub(crate) MasterManager);

impl bb8::ManageConnection for DedicatedManager {
    type Connection = Dedicated;
    type Error = RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let mut multiplexed = self.0.connect().await?;
        let id = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut multiplexed)
            .await
            .ok();
        Ok(Dedicated {
            multiplexed,
            id,
            broken: false,
        })
    }

    async fn is_valid(&self, connection: &mut Self::Connection) -> Result<(), Self::Error> {
        self.0.ping(&mut connection.multiplexed).await
    }

    fn has_broken(&self, connection: &mut Self::Connection) -> bool {
        connection.broken
    }
}
