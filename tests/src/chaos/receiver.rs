//! A Loki push endpoint that keeps every line it accepts, and can be told
//! to fail (an HTTP status) or to stop answering.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Accept,
    Status(u16),
    Down,
}

/// A line as the receiver got it: tenant, timestamp, text.
pub(super) type Line = (String, u64, String);

/// A Loki push endpoint that keeps every line it accepts.
pub(super) struct Receiver {
    pub(super) url: String,
    mode: Arc<Mutex<Mode>>,
    /// How often each line arrived.
    pub(super) lines: Arc<Mutex<HashMap<Line, u64>>>,
}

impl Receiver {
    pub(super) async fn start() -> Result<Self, BoxError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let mode = Arc::new(Mutex::new(Mode::Accept));
        let lines = Arc::new(Mutex::new(HashMap::new()));
        let (shared_mode, shared_lines) = (Arc::clone(&mode), Arc::clone(&lines));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if *shared_mode.lock().unwrap() == Mode::Down {
                    continue;
                }
                let (mode, lines) = (Arc::clone(&shared_mode), Arc::clone(&shared_lines));
                let service = hyper::service::service_fn(move |request| {
                    answer(request, Arc::clone(&mode), Arc::clone(&lines))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Ok(Self { url, mode, lines })
    }

    pub(super) fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

/// Answers one push as `mode` says, keeping its lines when it accepts.
async fn answer(
    request: hyper::Request<hyper::body::Incoming>,
    mode: Arc<Mutex<Mode>>,
    lines: Arc<Mutex<HashMap<Line, u64>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (tenant, content_type, encoding) = (
        header("x-scope-orgid"),
        header("content-type"),
        header("content-encoding"),
    );
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let status = match *mode.lock().unwrap() {
        Mode::Accept => StatusCode::NO_CONTENT,
        Mode::Status(status) => {
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
        Mode::Down => StatusCode::SERVICE_UNAVAILABLE,
    };
    let decoded = log_buffer::loki::decode_push_body(
        content_type.as_deref().unwrap_or_default(),
        encoding.as_deref(),
        &body,
    );
    let status = match (tenant, decoded) {
        (Some(tenant), Ok(streams)) if status.is_success() => {
            let mut lines = lines.lock().unwrap();
            for stream in streams {
                for entry in stream.entries {
                    *lines
                        .entry((tenant.clone(), entry.ts_ns, entry.line))
                        .or_default() += 1;
                }
            }
            status
        }
        (None, _) | (_, Err(_)) => StatusCode::BAD_REQUEST,
        _ => status,
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}
