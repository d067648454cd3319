//! The `http` scenario: the service's `GET /data/{key}` and `PUT
//! /data/{key}` over 64 keep-alive connections, against a minimal hyper
//! endpoint answering each request with one Redis `GET` and, when its
//! binary is on `PATH`, webdis's `GET` and `SET`, all measured in the same
//! interleaved rounds on the same Redis. The server logs as in production
//! (at `info`: audit records, and the access log's client and server
//! errors, into the log buffer) unless `BENCH_HTTP_LOGS=off`; after each
//! round of a server variant the harness waits until its logs are
//! shipped, in that variant's CPU time.
//! Two more servers on the same Redis serve the durable `PUT` (both
//! replicas acknowledge) and a `GET` with read audits sampled.

use std::convert::Infallible;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::{Settings, Variant};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use server::System;
use server::dev::{DevOptions, DevSystem};
use tokio::sync::Mutex;

use crate::webdis::Webdis;

const CONNECTIONS: usize = 64;
/// Variant (g)'s `read_audit_sample`: one read in this many is audited.
const READ_AUDIT_SAMPLE: &str = "100";

/// One keep-alive connection per task, opened on first use and again
/// after an error.
struct Connections {
    addr: SocketAddr,
    slots: Vec<Mutex<Option<SendRequest<Full<Bytes>>>>>,
}

impl Connections {
    fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            addr,
            slots: (0..CONNECTIONS).map(|_| Mutex::new(None)).collect(),
        })
    }

    /// Sends `request` on task `task`'s connection; the body of a 2xx answer.
    async fn send(&self, task: usize, request: Request<Full<Bytes>>) -> Result<Bytes, String> {
        let mut slot = self.slots[task].lock().await;
        if slot.as_ref().is_none_or(|sender| sender.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            *slot = Some(sender);
        }
        let sender = slot.as_mut().expect("connected above");
        let outcome = async {
            sender.ready().await.map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(body.to_bytes())
            } else {
                Err(format!("status {status}"))
            }
        }
        .await;
        if outcome.is_err() {
            *slot = None;
        }
        outcome
    }
}

/// The baseline: `GET /<key>` answered with the key's value from one
/// shared multiplexed Redis connection, and nothing else.
async fn minimal_endpoint(
    redis: redis::aio::MultiplexedConnection,
) -> Result<SocketAddr, Box<dyn Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let redis = redis.clone();
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let mut redis = redis.clone();
                    async move {
                        let key = request.uri().path().trim_start_matches('/').to_owned();
                        let value: Option<Vec<u8>> = redis::cmd("GET")
                            .arg(key)
                            .query_async(&mut redis)
                            .await
                            .unwrap_or(None);
                        let mut response =
                            Response::new(Full::new(Bytes::from(value.unwrap_or_default())));
                        response
                            .headers_mut()
                            .insert("content-type", "application/json".parse().expect("static"));
                        Ok::<_, Infallible>(response)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

pub(crate) async fn http() -> Result<Value, Box<dyn Error>> {
    let settings = Settings::from_env();
    println!("http: starting a master, 2 replicas, 3 sentinels and the server");
    let jwt_secret = rand::random::<[u8; 32]>().to_vec();
    let mut system = DevSystem::start(DevOptions {
        listen: "127.0.0.1:0".parse()?,
        jwt_secret: Some(jwt_secret.clone()),
        ..DevOptions::default()
    })
    .await?;
    // As `server dev` and `serve` run, at `info`: every operation's audit
    // record and the access log's client and server errors go to the log
    // buffer, unless BENCH_HTTP_LOGS=off (to measure what they cost).
    let logs = std::env::var("BENCH_HTTP_LOGS").map_or(true, |v| v != "off");
    if logs {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry()
            .with(system.take_log_layer())
            .with(tracing_subscriber::EnvFilter::new("info"));
        tracing::subscriber::set_global_default(subscriber)?;
    }
    println!("http: logs and audit records buffered: {logs}");
    let master = system.topology.initial_master();
    let redis = redis::Client::open(system.topology.connection_info(master))?
        .get_multiplexed_async_connection()
        .await?;

    let backlog = Backlog(redis.clone());
    let value = json!({"text": "v".repeat(50)});
    let body = Bytes::from(serde_json::to_vec(&json!({ "value": value }))?);
    let service = Connections::new(system.local_addr());
    let token = bearer_token(&service, &system.password).await?;

    seed_items(&service, &token, &body, &redis, &value).await?;

    // Writes waiting for both replicas, as the production manifests run them.
    let durable = second_server(&system, &jwt_secret, ("SERVER_REDIS_WAIT_REPLICAS", "2")).await?;
    let sampled = second_server(
        &system,
        &jwt_secret,
        ("SERVER_READ_AUDIT_SAMPLE", READ_AUDIT_SAMPLE),
    )
    .await?;
    let mut variants = vec![
        minimal_variant(minimal_endpoint(redis).await?),
        backlog.settles(get_variant("(b) server GET /data/{key}", &service, &token)),
        backlog.settles(put_variant(
            "(c) server PUT /data/{key}",
            &service,
            &token,
            &body,
        )),
    ];
    let redis_addr = system.topology.addr(master);
    let webdis = Webdis::start(system.topology.dir(), redis_addr).await?;
    if let Some(webdis) = &webdis {
        variants.extend(webdis_variants(webdis.addr, &value)?);
    }
    variants.push(backlog.settles(put_variant(
        "(f) server PUT, 2 replicas acked",
        &Connections::new(durable.local_addr()),
        &token,
        &body,
    )));
    variants.push(backlog.settles(get_variant(
        &format!("(g) server GET, 1 read in {READ_AUDIT_SAMPLE} audited"),
        &Connections::new(sampled.local_addr()),
        &token,
    )));
    // What the setup logged (the items seeded), shipped before the rounds.
    let started = Instant::now();
    let left = backlog.drained().await?;
    println!(
        "http: the setup's logs shipped in {:.1} s ({left} stream entries left)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "http: {CONNECTIONS} connections; {} interleaved rounds of {:?} per variant",
        settings.rounds, settings.duration
    );
    // CPU per request counts Redis (every node and sentinel) and webdis too.
    let topology = &system.topology;
    let nodes = topology
        .data_nodes()
        .into_iter()
        .chain(topology.sentinels());
    let others: Vec<u32> = nodes
        .filter_map(|node| topology.pid(node))
        .chain(webdis.as_ref().and_then(Webdis::pid))
        .collect();
    println!(
        "http: CPU per request: the harness's own, and with {} other processes (Redis, sentinels, webdis)",
        others.len()
    );
    let rows = crate::groups(&[&variants], CONNECTIONS, settings, &others).await;
    let ratio = |of: &str, to: &str| crate::ratio(&rows, of, to);
    let ratios = json!({
        "get_to_minimal": ratio("(b)", "(a)"),
        "get_to_webdis_get": ratio("(b)", "(d)"),
        "put_to_webdis_set": ratio("(c)", "(e)"),
        "durable_put_to_webdis_set": ratio("(f)", "(e)"),
        "sampled_get_to_minimal": ratio("(g)", "(a)"),
    });
    let shown = |name: &str| crate::shown(ratios[name].as_f64());
    println!(
        "ratios: GET (b)/(a) = {}, (b)/(d) webdis GET = {}; PUT (c)/(e) webdis SET = {}, durable PUT (f)/(e) = {}; \
         GET with 1 read in {READ_AUDIT_SAMPLE} audited (g)/(a) = {}",
        shown("get_to_minimal"),
        shown("get_to_webdis_get"),
        shown("put_to_webdis_set"),
        shown("durable_put_to_webdis_set"),
        shown("sampled_get_to_minimal"),
    );
    println!("targets: (b)/(a) and (b)/(d) >= 0.70, (c)/(e) >= 0.50, (f)/(e) >= 0.35, p99 <= 5 ms");
    let backlog = backlog.entries().await?;
    println!(
        "logs: {backlog} stream entries (of up to 64 records) and staged records left to offload after the rounds"
    );
    drop(webdis);
    durable.shutdown().await;
    sampled.shutdown().await;
    system.shutdown().await;
    Ok(json!({ "scenario": "http", "rounds": settings.rounds,
                "seconds": settings.duration.as_secs_f64(), "results": rows,
                "ratios": ratios, "log_backlog_entries": backlog }))
}

/// The longest wait for the logs to be shipped.
const SHIPPED_WITHIN: Duration = Duration::from_secs(30);

/// The tenants' log and audit streams, read on the master.
#[derive(Clone)]
struct Backlog(redis::aio::MultiplexedConnection);

impl Backlog {
    /// The streams' entries not yet shipped (delivered ranges are trimmed
    /// away), and the audit records staged to be packed into entries.
    async fn entries(&self) -> redis::RedisResult<u64> {
        let mut redis = self.0.clone();
        let mut entries = 0;
        for (pattern, length) in [
            ("tenant:*:logs", "XLEN"),
            ("tenant:*:audit", "XLEN"),
            ("tenant:*:audit:staged", "LLEN"),
        ] {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut redis)
                .await?;
            for key in keys {
                let len: u64 = redis::cmd(length).arg(key).query_async(&mut redis).await?;
                entries += len;
            }
        }
        Ok(entries)
    }

    /// Waits until nothing is left to ship, [`SHIPPED_WITHIN`] at most;
    /// the entries left. Empty means empty twice, 10 ms apart: the
    /// producer appends the last requests' records a few milliseconds
    /// after their answers.
    async fn drained(&self) -> redis::RedisResult<u64> {
        let started = Instant::now();
        let mut empty_before = false;
        loop {
            let entries = self.entries().await?;
            if (entries == 0 && empty_before) || started.elapsed() >= SHIPPED_WITHIN {
                return Ok(entries);
            }
            empty_before = entries == 0;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `variant`, waiting after each round until what it logged is
    /// shipped. Why: the offloader runs behind the requests it ships
    /// for, and without the wait the next variant would ship this one's
    /// logs.
    fn settles(&self, variant: Variant) -> Variant {
        let backlog = self.clone();
        let name = variant.name.clone();
        variant.settled_by(move || {
            let (backlog, name) = (backlog.clone(), name.clone());
            async move {
                match backlog.drained().await {
                    Ok(0) => {}
                    Ok(left) => eprintln!("http: {name}: {left} stream entries left unshipped"),
                    Err(error) => eprintln!("http: the log backlog cannot be read: {error}"),
                }
            }
        })
    }
}

/// `Bearer <token>` for the demo user `user1`, from `POST /token`.
async fn bearer_token(service: &Connections, password: &str) -> Result<String, Box<dyn Error>> {
    let login = format!("username=user1&password={password}");
    let request = Request::post("/token")
        .header("host", "bench")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(login)))?;
    let reply: Value = serde_json::from_slice(&service.send(0, request).await?)?;
    let token = reply["access_token"].as_str().ok_or("no token")?;
    Ok(format!("Bearer {token}"))
}

/// The same items for the service and the baseline: each connection's key
/// `k<n>`, created through the service and SET raw to what it returns.
async fn seed_items(
    service: &Connections,
    token: &str,
    body: &Bytes,
    redis: &redis::aio::MultiplexedConnection,
    value: &Value,
) -> Result<(), Box<dyn Error>> {
    for task in 0..CONNECTIONS {
        let create = Request::post(format!("/data?key=k{task}"))
            .header("host", "bench")
            .header("authorization", token)
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))?;
        service.send(task, create).await?;
        let _: () = redis::cmd("SET")
            .arg(format!("k{task}"))
            .arg(serde_json::to_vec(value)?)
            .query_async(&mut redis.clone())
            .await?;
    }
    Ok(())
}

/// A second server on the same Redis and tokens, with `setting` changed;
/// its records go to the same log buffer (the global subscriber's).
async fn second_server(
    system: &DevSystem,
    jwt_secret: &[u8],
    (name, value): (&str, &str),
) -> Result<System, Box<dyn Error>> {
    let setting = [(name.to_owned(), value.to_owned())];
    let mut settings = server::dev::topology_settings(&system.topology, setting)?;
    settings.listen = "127.0.0.1:0".parse()?;
    settings.admin_listen = None;
    settings.jwt.secret = Some(jwt_secret.to_vec());
    Ok(System::builder(settings).start().await?)
}

fn minimal_variant(addr: SocketAddr) -> Variant {
    let baseline = Connections::new(addr);
    Variant::new("(a) hyper + one Redis GET", move |task| {
        let baseline = Arc::clone(&baseline);
        async move {
            let request = Request::get(format!("/k{task}"))
                .header("host", "bench")
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            baseline.send(task, request).await.map(drop)
        }
    })
}

fn get_variant(name: &str, service: &Arc<Connections>, token: &str) -> Variant {
    let (service, token) = (Arc::clone(service), token.to_owned());
    Variant::new(name, move |task| {
        let (service, token) = (Arc::clone(&service), token.clone());
        async move {
            let request = Request::get(format!("/data/k{task}"))
                .header("host", "bench")
                .header("authorization", token)
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            service.send(task, request).await.map(drop)
        }
    })
}

fn put_variant(name: &str, service: &Arc<Connections>, token: &str, body: &Bytes) -> Variant {
    let (service, token, body) = (Arc::clone(service), token.to_owned(), body.clone());
    Variant::new(name, move |task| {
        let (service, token, body) = (Arc::clone(&service), token.clone(), body.clone());
        async move {
            let request = Request::put(format!("/data/k{task}"))
                .header("host", "bench")
                .header("authorization", token)
                .header("content-type", "application/json")
                .body(Full::new(body))
                .map_err(|e| e.to_string())?;
            service.send(task, request).await.map(drop)
        }
    })
}

/// webdis's `GET /GET/<key>` and `PUT /SET/<key>` (the body is the value),
/// on the keys the baseline reads.
fn webdis_variants(addr: SocketAddr, value: &Value) -> Result<[Variant; 2], Box<dyn Error>> {
    let webdis = Connections::new(addr);
    let value = Bytes::from(serde_json::to_vec(value)?);
    let get = Variant::new("(d) webdis GET /GET/{key}", {
        let webdis = Arc::clone(&webdis);
        move |task| {
            let webdis = Arc::clone(&webdis);
            async move {
                let request = Request::get(format!("/GET/k{task}"))
                    .header("host", "bench")
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| e.to_string())?;
                webdis.send(task, request).await.map(drop)
            }
        }
    });
    let set = Variant::new("(e) webdis PUT /SET/{key}", move |task| {
        let (webdis, value) = (Arc::clone(&webdis), value.clone());
        async move {
            let request = Request::put(format!("/SET/k{task}"))
                .header("host", "bench")
                .body(Full::new(value))
                .map_err(|e| e.to_string())?;
            webdis.send(task, request).await.map(drop)
        }
    });
    Ok([get, set])
}
