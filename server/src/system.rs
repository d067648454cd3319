//! The composition root: one server process wired from its [`Settings`],
//! the same way for `server serve`, the dev mode, the chaos run and the
//! end-to-end tests.

use std::net::SocketAddr;

use log_buffer::{BufferLayer, LogBuffer, LogSink, LokiSink, Offloader};
use redis_failover::{Durability, FailoverClient};
use tenant_kv::{AuthCache, ExpiryWatcher, TenantKv};

use crate::error::Error;
use crate::{JwtConfig, Server, ServerHandle, Settings, ShutdownReport};

/// The client the log buffer and the offloader use: `client` without
/// waiting for replicas. A log record, or the acknowledgement of a shipped
/// one, is worth less than the request it would hold back while a replica
/// is gone; only the data's writes wait for `redis_wait_replicas`.
pub fn log_client(client: &FailoverClient) -> FailoverClient {
    client.with_durability(Durability::Master)
}

/// Everything one server process runs: the failover client, the store, its
/// expiry watcher and authentication cache, the log buffer and an offloader when the settings
/// ask for them, and the HTTP server. See [`System::builder`].
#[derive(Debug)]
pub struct System {
    client: FailoverClient,
    store: TenantKv,
    server: ServerHandle,
    expiry: ExpiryWatcher,
    /// `None` with `auth_cache_records = 0`.
    auth_cache: Option<AuthCache>,
    layer: Option<BufferLayer>,
}

/// Sets up a [`System`].
pub struct SystemBuilder {
    settings: Settings,
    sink: Option<Box<dyn LogSink>>,
    install_log_layer: Option<Box<dyn FnOnce(BufferLayer) + Send>>,
}

impl std::fmt::Debug for SystemBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl System {
    /// A system as `settings` describe it.
    pub fn builder(settings: Settings) -> SystemBuilder {
        SystemBuilder {
            settings,
            sink: None,
            install_log_layer: None,
        }
    }

    /// The failover client of the data's requests.
    pub fn client(&self) -> &FailoverClient {
        &self.client
    }

    /// The store the server serves.
    pub fn store(&self) -> &TenantKv {
        &self.store
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The address serving `/metrics` and the probes, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr()
    }

    /// The layer feeding the log buffer (none with `log_buffer = false`),
    /// to install in the process's `tracing` subscriber; later calls
    /// return `None`.
    pub fn take_log_layer(&mut self) -> Option<BufferLayer> {
        self.layer.take()
    }

    /// Stops the expiry watcher, then shuts the server down (draining
    /// requests, then flushing the logs of both), then stops the
    /// authentication cache (the last requests may still use it).
    pub async fn shutdown(self) -> ShutdownReport {
        self.expiry.shutdown().await;
        let report = self.server.shutdown().await;
        if let Some(cache) = self.auth_cache {
            cache.shutdown().await;
        }
        report
    }
}

impl SystemBuilder {
    /// Ships logs and audit records from this process to `sink` instead of
    /// to `loki_url` (the dev mode's file). Defaults to `loki_url`'s Loki,
    /// if set; otherwise other processes (`server offload`) ship them.
    pub fn log_sink(mut self, sink: Box<dyn LogSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Hands the log buffer's layer to `install` (which puts it in the
    /// process's `tracing` subscriber) before the server takes its first
    /// request, so that no request's log or audit record is missed.
    /// Defaults to keeping it for [`System::take_log_layer`].
    pub fn install_log_layer(mut self, install: impl FnOnce(BufferLayer) + Send + 'static) -> Self {
        self.install_log_layer = Some(Box::new(install));
        self
    }

    /// Connects, checks the storage layout and starts serving.
    pub async fn start(self) -> Result<System, Error> {
        let Self {
            settings,
            sink,
            install_log_layer,
        } = self;
        let jwt = JwtConfig::from_settings(&settings.jwt)?;
        let client = settings.redis.client()?;
        let store = settings.store(client.clone())?;
        check_layout(&store).await?;
        let mut builder =
            Server::builder(store.clone(), client.clone(), jwt).limits(settings.limits.clone());
        if let Some(admin) = settings.admin_listen {
            builder = builder.admin(admin);
        }
        if let Some(header) = &settings.protection.client_address_header {
            builder = builder.client_address_header(header.clone());
        }
        let mut layer = None;
        if settings.log_buffer {
            let buffer = LogBuffer::builder(log_client(&client)).start()?;
            match install_log_layer {
                Some(install) => install(buffer.layer()),
                None => layer = Some(buffer.layer()),
            }
            builder = builder.log_buffer(buffer);
        }
        let sink: Option<Box<dyn LogSink>> = match (sink, &settings.loki_url) {
            (Some(sink), _) => Some(sink),
            (None, Some(url)) => Some(Box::new(LokiSink::builder(url.clone()).build()?)),
            (None, None) => None,
        };
        if let Some(sink) = sink {
            let offloader = Offloader::builder(log_client(&client), sink)
                .job(settings.loki_job.clone())
                .tenant_bytes_per_second(settings.loki_tenant_bytes_per_second)
                .start()?;
            builder = builder.offloader(offloader);
        }
        let auth_cache = if settings.auth_cache_records > 0 {
            Some(store.cache_auth().map_err(|e| Error::Store(Box::new(e)))?)
        } else {
            None
        };
        let expiry = store.watch_expirations();
        let server = builder.bind(settings.listen).await?;
        Ok(System {
            client,
            store,
            server,
            expiry,
            auth_cache,
            layer,
        })
    }
}

/// Refuses to serve a storage layout the store does not serve (a new
/// Redis is marked as this version's). Redis out of reach is no reason
/// not to start: the store checks again before its first operation, and
/// refuses then.
async fn check_layout(store: &TenantKv) -> Result<(), Error> {
    match store.check_layout().await {
        Ok(_) => Ok(()),
        Err(tenant_kv::Error::Redis(error)) => {
            tracing::warn!(%error, "cannot check the storage layout in Redis yet");
            Ok(())
        }
        Err(error) => Err(Error::from_layout(error)),
    }
}
