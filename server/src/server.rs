use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::HeaderName;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use log_buffer::{LogBuffer, Offloader};
use redis_failover::FailoverClient;
use tenant_kv::TenantKv;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::api::{App, LogShipping};
use crate::auth::JwtConfig;
use crate::conn::{PerAddress, SendTimeout};
use crate::error::Error;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::middleware::connection_service;
use crate::router::Surface;

/// Open connections the admin listener takes at most (probes, scrapers).
const ADMIN_CONNECTIONS: usize = 64;

/// Time the log buffer and offloader get to flush on shutdown.
const LOG_FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// The HTTP service; see [`Server::builder`].
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A server over `store` (whose failover client is `client`),
    /// verifying and issuing tokens as `jwt` says.
    pub fn builder(store: TenantKv, client: FailoverClient, jwt: JwtConfig) -> ServerBuilder {
        ServerBuilder {
            store,
            client,
            jwt,
            limits: Limits::default(),
            logs: LogShipping::default(),
            admin: None,
            client_address_header: None,
        }
    }
}

/// Sets up a [`Server`].
pub struct ServerBuilder {
    store: TenantKv,
    client: FailoverClient,
    jwt: JwtConfig,
    limits: Limits,
    logs: LogShipping,
    admin: Option<SocketAddr>,
    client_address_header: Option<HeaderName>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("jwt", &self.jwt)
            .field("limits", &self.limits)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// Request and connection limits. Defaults to [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The log buffer this process writes to (its layer installed in the
    /// process's subscriber): its figures go to `/metrics`, and shutdown
    /// flushes it after the last request.
    pub fn log_buffer(mut self, buffer: LogBuffer) -> Self {
        self.logs.buffer = Some(buffer);
        self
    }

    /// An offloader running in this process: its figures go to
    /// `/metrics`, and shutdown stops it.
    pub fn offloader(mut self, offloader: Offloader) -> Self {
        self.logs.offloader = Some(offloader);
        self
    }

    /// Serves `/metrics` (which names tenants) and the probes
    /// (`/healthz`, `/readyz`) on `addr` as well, never on the public
    /// listener. Defaults to none: no metrics at all.
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.admin = Some(addr);
        self
    }

    /// The header a trusted proxy in front of the servers puts the
    /// client's address in (`x-forwarded-for`, whose last address is the
    /// one the proxy saw, or `x-real-ip`): logins are throttled by it.
    /// Only set it when every request comes through such a proxy, as a
    /// client could send it too. Defaults to none: the peer's address.
    pub fn client_address_header(mut self, name: HeaderName) -> Self {
        self.client_address_header = Some(name);
        self
    }

    /// Listens on `addr` (and the admin address, if any) and serves until
    /// [`ServerHandle::shutdown`] (or until the handle is dropped, which
    /// stops accepting at once).
    pub async fn bind(self, addr: SocketAddr) -> Result<ServerHandle, Error> {
        self.limits.validate()?;
        let listener = listen(addr).await?;
        let admin = match self.admin {
            Some(admin) => Some(listen(admin).await?),
            None => None,
        };
        let local_addr = local(&listener, addr)?;
        let admin_addr = admin.as_ref().map(|l| local(l, addr)).transpose()?;
        let logs = Arc::new(Mutex::new(self.logs));
        let app = Arc::new(App {
            api_keys: self.store.api_keys(),
            metrics: Metrics::new(self.client.clone(), self.store.clone(), logs.clone()),
            store: self.store,
            client: self.client,
            jwt: self.jwt,
            limits: self.limits,
            client_address_header: self.client_address_header,
            logs,
        });
        let stop = CancellationToken::new();
        let graceful = Arc::new(GracefulShutdown::new());
        let mut listeners = vec![(listener, Surface::Public)];
        listeners.extend(admin.map(|admin| (admin, Surface::Admin)));
        let task = tokio::spawn(serve(listeners, app.clone(), stop.clone(), graceful));
        tracing::info!(%local_addr, ?admin_addr, "listening");
        Ok(ServerHandle {
            local_addr,
            admin_addr,
            stop: stop.drop_guard(),
            task,
            app,
        })
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    /// Stops the server when the handle is dropped.
    stop: DropGuard,
    task: JoinHandle<bool>,
    app: Arc<App>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

/// How a shutdown went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Every in-flight request finished within the grace period.
    pub drained: bool,
}

impl ServerHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address, if it has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Stops accepting connections, lets in-flight requests finish within
    /// the grace period ([`Limits::shutdown_grace`]) while idle connections
    /// are closed, then flushes the log buffer and stops the offloader.
    pub async fn shutdown(self) -> ShutdownReport {
        let Self {
            stop, task, app, ..
        } = self;
        drop(stop);
        let drained = task.await.unwrap_or(false);
        let logs = std::mem::take(&mut *app.logs.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(buffer) = logs.buffer {
            buffer.shutdown(LOG_FLUSH_DEADLINE).await;
        }
        if let Some(offloader) = logs.offloader {
            offloader.shutdown(LOG_FLUSH_DEADLINE).await;
        }
        ShutdownReport { drained }
    }
}

async fn listen(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

fn local(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, Error> {
    listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })
}

/// Accepts on every listener until told to stop; then waits for the open
/// connections' in-flight requests, and says whether they all finished
/// in time.
async fn serve(
    listeners: Vec<(TcpListener, Surface)>,
    app: Arc<App>,
    stop: CancellationToken,
    graceful: Arc<GracefulShutdown>,
) -> bool {
    let mut accepting = tokio::task::JoinSet::new();
    for (listener, surface) in listeners {
        // The admin listener has caps of its own: a flood of the public
        // port must not keep the probes and Prometheus out.
        let (permits, per_address) = match surface {
            Surface::Public => (
                app.limits.max_connections,
                app.limits.max_connections_per_address,
            ),
            Surface::Admin => (ADMIN_CONNECTIONS, 0),
        };
        let shared = Shared {
            app: Arc::clone(&app),
            graceful: Arc::clone(&graceful),
            permits: Arc::new(Semaphore::new(permits)),
            per_address: PerAddress::new(per_address),
        };
        accepting.spawn(accept(listener, surface, shared, stop.clone()));
    }
    accepting.join_all().await;
    tracing::info!("stopped accepting; draining in-flight requests");
    let graceful = Arc::into_inner(graceful).expect("every accept loop has ended");
    tokio::time::timeout(app.limits.shutdown_grace, graceful.shutdown())
        .await
        .is_ok()
}

/// What every accept loop shares.
struct Shared {
    app: Arc<App>,
    graceful: Arc<GracefulShutdown>,
    permits: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
}

/// Accepts connections on one listener until told to stop.
async fn accept(listener: TcpListener, surface: Surface, shared: Shared, stop: CancellationToken) {
    let app = &shared.app;
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(app.limits.request_timeout)
        .max_buf_size(app.limits.max_header_bytes);
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            permit = shared.permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(counted) = shared.per_address.admit(peer.ip()) else {
            // Closed at once: the client's address holds its share already.
            app.metrics.http.connections_refused.inc();
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = SendTimeout::new(stream, app.limits.send_timeout);
        let connection = shared.graceful.watch(http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(connection_service(app, surface, peer.ip())),
        ));
        let app = app.clone();
        tokio::spawn(async move {
            app.metrics.http.open_connections.inc();
            if let Err(error) = connection.await {
                if timed_out(&error) {
                    app.metrics.http.send_timeouts.inc();
                }
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            app.metrics.http.open_connections.dec();
            drop((counted, permit));
        });
    }
}

/// Whether a connection ended because an answer made no progress.
fn timed_out(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = cause.source();
    }
    false
}
