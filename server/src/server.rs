use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use log_buffer::{LogBuffer, Offloader};
use redis_failover::FailoverClient;
use tenant_kv::TenantKv;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::api::{App, LogShipping, handle};
use crate::auth::JwtConfig;
use crate::error::Error;
use crate::limits::Limits;

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
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("jwt", &self.jwt)
            .field("limits", &self.limits)
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

    /// Listens on `addr` and serves until [`ServerHandle::shutdown`] (or
    /// until the handle is dropped, which stops accepting at once).
    pub async fn bind(self, addr: SocketAddr) -> Result<ServerHandle, Error> {
        self.limits.validate()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let app = Arc::new(App {
            api_keys: self.store.api_keys(),
            store: self.store,
            client: self.client,
            jwt: self.jwt,
            limits: self.limits,
            metrics: Default::default(),
            logs: Mutex::new(self.logs),
        });
        let (stop, stopped) = watch::channel(());
        let task = tokio::spawn(accept(listener, app.clone(), stopped));
        tracing::info!(%local_addr, "listening");
        Ok(ServerHandle {
            local_addr,
            stop,
            task,
            app,
        })
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    stop: watch::Sender<()>,
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

    /// Stops accepting connections, lets in-flight requests finish within
    /// the grace period ([`Limits::shutdown_grace`]) while idle connections
    /// are closed, then flushes the log buffer and stops the offloader.
    pub async fn shutdown(self) -> ShutdownReport {
        let _ = self.stop.send(());
        let drained = self.task.await.unwrap_or(false);
        let logs = std::mem::take(&mut *self.app.logs.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(buffer) = logs.buffer {
            buffer.shutdown(LOG_FLUSH_DEADLINE).await;
        }
        if let Some(offloader) = logs.offloader {
            offloader.shutdown(LOG_FLUSH_DEADLINE).await;
        }
        ShutdownReport { drained }
    }
}

/// Accepts until told to stop; then waits for the open connections'
/// in-flight requests, and says whether they all finished in time.
async fn accept(listener: TcpListener, app: Arc<App>, mut stop: watch::Receiver<()>) -> bool {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(app.limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(app.limits.request_timeout)
        .max_buf_size(app.limits.max_header_bytes);
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.changed() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.changed() => break,
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
        let _ = stream.set_nodelay(true);
        let service_app = app.clone();
        let service = service_fn(move |request| {
            let app = service_app.clone();
            async move { Ok::<_, Infallible>(handle(app, request).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let app = app.clone();
        tokio::spawn(async move {
            app.metrics.open_connections.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            app.metrics.open_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("stopped accepting; draining in-flight requests");
    tokio::time::timeout(app.limits.shutdown_grace, graceful.shutdown())
        .await
        .is_ok()
}
