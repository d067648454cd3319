//! A Loki-compatible push receiver on a free loopback port, and helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use log_buffer::{Encoding, LokiSink, Offloader, OffloaderBuilder, Stream};
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// How the receiver answers a tenant's pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 204, and the push is recorded.
    Accept,
    /// This status, nothing recorded.
    Status(u16),
    /// 413 when the push holds more entries than this, else accept.
    MaxEntries(usize),
    /// Never answers.
    Hang,
    /// Closes the connection without answering.
    Refuse,
    /// Like Loki refusing some entries: stores the entries whose line lacks
    /// this text and, if any has it, answers 400.
    RejectLines(&'static str),
}

/// One push the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub tenant: String,
    pub content_type: String,
    pub streams: Vec<Stream>,
}

#[derive(Default)]
struct State {
    modes: HashMap<String, Mode>,
    default_mode: Option<Mode>,
    accepted: Vec<Received>,
    /// Every request, by tenant, whatever the answer.
    requests: HashMap<String, usize>,
}

/// A Loki push endpoint: decodes protobuf + snappy and JSON (gzip too),
/// requires `X-Scope-OrgID`, and answers as told per tenant.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    state: Arc<Mutex<State>>,
    _task: Arc<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { handle(&state, request).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("http://{addr}"),
            state,
            _task: Arc::new(task),
        }
    }

    /// How the receiver answers `tenant` (or every tenant without a mode
    /// of its own, for `None`).
    pub fn set_mode(&self, tenant: Option<&str>, mode: Mode) {
        let mut state = self.state.lock().unwrap();
        match tenant {
            Some(tenant) => {
                state.modes.insert(tenant.to_owned(), mode);
            }
            None => state.default_mode = Some(mode),
        }
    }

    pub fn accepted(&self) -> Vec<Received> {
        self.state.lock().unwrap().accepted.clone()
    }

    pub fn requests(&self, tenant: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .requests
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }

    /// Every accepted line of `tenant`, in arrival order, with its labels.
    pub fn lines(
        &self,
        tenant: &str,
    ) -> Vec<(u64, String, std::collections::BTreeMap<String, String>)> {
        self.accepted()
            .into_iter()
            .filter(|r| r.tenant == tenant)
            .flat_map(|r| r.streams)
            .flat_map(|s| {
                let labels = s.labels.clone();
                s.entries
                    .into_iter()
                    .map(move |e| (e.ts_ns, e.line, labels.clone()))
            })
            .collect()
    }

    /// Waits until `tenant` has at least `count` accepted lines.
    pub async fn wait_for_lines(&self, tenant: &str, count: usize) {
        let started = Instant::now();
        loop {
            let found = self.lines(tenant).len();
            if found >= count {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{tenant}: {found} of {count} lines after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An `Err` closes the connection without an answer.
async fn handle(
    state: &Mutex<State>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let reply = |status: StatusCode, body: &str| {
        let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
        *response.status_mut() = status;
        Ok(response)
    };
    if request.uri().path() != "/loki/api/v1/push" {
        return reply(StatusCode::NOT_FOUND, "404 page not found");
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let Some(tenant) = header("x-scope-orgid") else {
        return reply(StatusCode::UNAUTHORIZED, "no org id");
    };
    let content_type = header("content-type").unwrap_or_default();
    let encoding = header("content-encoding");
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let mode = {
        let mut state = state.lock().unwrap();
        *state.requests.entry(tenant.clone()).or_default() += 1;
        state
            .modes
            .get(&tenant)
            .copied()
            .or(state.default_mode)
            .unwrap_or(Mode::Accept)
    };
    let mut streams =
        match log_buffer::loki::decode_push_body(&content_type, encoding.as_deref(), &body) {
            Ok(streams) => streams,
            Err(error) => return reply(StatusCode::BAD_REQUEST, &error),
        };
    let entries: usize = streams.iter().map(|s| s.entries.len()).sum();
    match mode {
        Mode::Accept => {}
        Mode::MaxEntries(max) if entries <= max => {}
        Mode::MaxEntries(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, "too large"),
        Mode::Status(status) => {
            return reply(StatusCode::from_u16(status).unwrap(), "told to fail");
        }
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Refuse => return Err(std::io::Error::other("connection dropped on purpose")),
        Mode::RejectLines(marker) => {
            let mut refused = 0;
            for stream in &mut streams {
                let before = stream.entries.len();
                stream.entries.retain(|entry| !entry.line.contains(marker));
                refused += before - stream.entries.len();
            }
            if refused > 0 {
                state.lock().unwrap().accepted.push(Received {
                    tenant,
                    content_type,
                    streams,
                });
                let total = format!("total ignored: {refused} out of {entries}");
                return reply(StatusCode::BAD_REQUEST, &total);
            }
        }
    }
    state.lock().unwrap().accepted.push(Received {
        tenant,
        content_type,
        streams,
    });
    reply(StatusCode::NO_CONTENT, "")
}

/// A master with `replicas` replicas and no sentinel, and a client.
pub async fn start(replicas: usize) -> (Topology, FailoverClient) {
    let topology = Topology::builder()
        .replicas(replicas)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let nodes = topology
        .data_nodes()
        .into_iter()
        .map(|n| NodeAddr::from(topology.addr(n)));
    let client = FailoverClient::candidates(nodes).build().unwrap();
    (topology, client)
}

/// Polls `check` until it holds, failing after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The records buffered in `stream`, oldest first: every line of every
/// entry's `records` field (the log buffer packs records), as its fields.
pub async fn buffered(
    client: &FailoverClient,
    stream: &str,
) -> Vec<std::collections::BTreeMap<String, String>> {
    let entries: Vec<(String, HashMap<String, String>)> = client
        .query(redis::cmd("XRANGE").arg(stream).arg("-").arg("+"))
        .await
        .unwrap();
    entries
        .iter()
        .flat_map(|(_, fields)| fields["records"].lines())
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

pub fn sink(receiver: &Receiver, encoding: Encoding) -> LokiSink {
    LokiSink::builder(&receiver.url)
        .encoding(encoding)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

pub fn offloader(client: &FailoverClient, receiver: &Receiver) -> OffloaderBuilder<LokiSink> {
    Offloader::builder(client.clone(), sink(receiver, Encoding::Protobuf))
        .poll_interval(Duration::from_millis(20))
        .discovery_interval(Duration::from_millis(200))
        .backoff(
            redis_failover::Backoff::new(Duration::from_millis(50), Duration::from_millis(200))
                .unwrap(),
        )
}

/// An audit record's line as tenant-kv writes it.
fn audit_line(tenant: &str, ts_ns: u64, action: &str) -> String {
    format!(
        r#"{{"ts":"{ts_ns}","action":"{action}","actor":"user:alice","key":"doc","tenant":"{tenant}"}}"#
    )
}

/// The tenant's audit stream.
fn audit_stream(tenant: &str) -> String {
    format!("tenant:{{{tenant}}}:audit")
}

/// Appends an audit record as tenant-kv does: a packed entry of one line.
pub async fn audit_entry(client: &FailoverClient, tenant: &str, ts_ns: u64, action: &str) {
    let line = audit_line(tenant, ts_ns, action);
    append_audit(client, tenant, &[("records", &line)]).await;
}

/// Stages an audit record on the tenant's audit stream's staging list,
/// as tenant-kv's write script does.
pub async fn staged_audit_entry(client: &FailoverClient, tenant: &str, ts_ns: u64, action: &str) {
    let _: u64 = client
        .query(
            redis::cmd("RPUSH")
                .arg(log_buffer::staging_list(&audit_stream(tenant)))
                .arg(audit_line(tenant, ts_ns, action)),
        )
        .await
        .unwrap();
}

/// Appends an audit record as tenant-kv did before it packed them: an
/// entry of a field per name.
pub async fn legacy_audit_entry(client: &FailoverClient, tenant: &str, ts_ns: u64, action: &str) {
    let ts = ts_ns.to_string();
    let fields = [
        ("ts", ts.as_str()),
        ("tenant", tenant),
        ("actor", "user:alice"),
        ("action", action),
        ("key", "doc"),
    ];
    append_audit(client, tenant, &fields).await;
}

async fn append_audit(client: &FailoverClient, tenant: &str, fields: &[(&str, &str)]) {
    let _: String = client
        .query(
            redis::cmd("XADD")
                .arg(audit_stream(tenant))
                .arg("*")
                .arg(fields),
        )
        .await
        .unwrap();
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
