//! `server offload`'s admin listener: the offloader's figures (and its
//! failover client's) on `/metrics`, so that Prometheus scrapes offloaders
//! as it scrapes servers, and `/healthz` for a liveness probe.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use log_buffer::Offloader;
use prometheus::Registry;
use redis_failover::FailoverClient;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::LogShipping;
use crate::error::Error;
use crate::metrics;

/// A running offloader with its admin listener.
#[derive(Debug)]
pub struct OffloaderAdmin {
    local_addr: SocketAddr,
    logs: Arc<Mutex<LogShipping>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl OffloaderAdmin {
    /// Serves `offloader`'s and `client`'s figures on `addr` until
    /// [`shutdown`](Self::shutdown).
    pub async fn bind(
        addr: SocketAddr,
        client: FailoverClient,
        offloader: Offloader,
    ) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let logs = Arc::new(Mutex::new(LogShipping {
            buffer: None,
            offloader: Some(offloader),
        }));
        let registry = metrics::pipeline(client, logs.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept(listener, registry, stop.clone()));
        Ok(Self {
            local_addr,
            logs,
            stop,
            task,
        })
    }

    /// The address the admin listener listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the listener, then the offloader (delivering what it holds
    /// within `grace`).
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        let _ = self.task.await;
        let logs = std::mem::take(&mut *self.logs.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(offloader) = logs.offloader {
            offloader.shutdown(grace).await;
        }
    }
}

/// Accepts until `stop`; each connection is served on a task of its own.
/// Scrapes are short and few, so connections are not tracked: one still
/// open at the stop ends with the process.
async fn accept(listener: TcpListener, registry: Registry, stop: CancellationToken) {
    let registry = Arc::new(registry);
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "admin listener: accept failed");
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let service = service_fn(move |request| {
            let answer = answer(&registry, &request);
            async move { Ok::<_, Infallible>(answer) }
        });
        tokio::spawn(async move {
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

fn answer<B>(registry: &Registry, request: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::render(registry),
        ),
        (&Method::GET, "/healthz") => (
            StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
