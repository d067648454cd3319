//! The `logs` scenario: log-buffer's caller-side cost per event, records
//! buffered per second, lines offloaded per second to a local receiver,
//! and the drain rate of a backlog after a receiver outage.

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use log_buffer::{LogBuffer, LokiSink, Offloader};
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;
use serde_json::{Value, json};
use tracing_subscriber::layer::SubscriberExt;

const TENANTS: [&str; 16] = [
    "t00", "t01", "t02", "t03", "t04", "t05", "t06", "t07", "t08", "t09", "t10", "t11", "t12",
    "t13", "t14", "t15",
];
const EVENTS: u64 = 200_000;

/// A push endpoint that decodes each body and counts its lines, or
/// answers 503 while `down`.
struct Receiver {
    url: String,
    lines: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
}

async fn receiver() -> Result<Receiver, Box<dyn Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (lines, down) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (counted, outage) = (Arc::clone(&lines), Arc::clone(&down));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (counted, outage) = (Arc::clone(&counted), Arc::clone(&outage));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let (counted, outage) = (Arc::clone(&counted), Arc::clone(&outage));
                        async move {
                            let content_type = request
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            let body = request.into_body().collect().await?.to_bytes();
                            let mut response = hyper::Response::new(Full::new(Bytes::new()));
                            if outage.load(Ordering::Relaxed) {
                                *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                return Ok::<_, hyper::Error>(response);
                            }
                            match log_buffer::loki::decode_push_body(&content_type, None, &body) {
                                Ok(streams) => {
                                    let n: usize = streams.iter().map(|s| s.entries.len()).sum();
                                    counted.fetch_add(n as u64, Ordering::Relaxed);
                                    *response.status_mut() = hyper::StatusCode::NO_CONTENT;
                                }
                                Err(_) => *response.status_mut() = hyper::StatusCode::BAD_REQUEST,
                            }
                            Ok(response)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    Ok(Receiver { url, lines, down })
}

fn emit(i: u64) {
    tracing::info!(
        tenant_id = TENANTS[(i % 16) as usize],
        i,
        route = "/data/{key}",
        status = 200,
        "request handled"
    );
}

/// Nanoseconds per `emit` under `dispatch`, one sample per event.
fn emit_costs(dispatch: &tracing::Dispatch, events: u64) -> Vec<u64> {
    tracing::dispatcher::with_default(dispatch, || {
        (0..events)
            .map(|i| {
                let started = Instant::now();
                emit(i);
                started.elapsed().as_nanos() as u64
            })
            .collect()
    })
}

fn percentile(samples: &mut [u64], q: f64) -> u64 {
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * q) as usize]
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    done: impl Fn() -> bool,
) -> Result<Duration, Box<dyn Error>> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > timeout {
            return Err(format!("{what}: not within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

pub async fn logs() -> Result<Value, Box<dyn Error>> {
    println!("logs: starting a local master");
    let topology = Topology::builder().replicas(0).sentinels(0).start().await?;
    let master = NodeAddr::from(topology.addr(topology.initial_master()));
    let client = FailoverClient::candidates([master]).build()?;
    let receiver = receiver().await?;
    let buffer = LogBuffer::builder(client.clone())
        .queue_capacity(1 << 20)
        .start()?;

    // (a) caller-side cost: a registry alone (the baseline) against one
    // with the buffer's layer, interleaved.
    let baseline = tracing::Dispatch::new(tracing_subscriber::registry());
    let buffered = tracing::Dispatch::new(tracing_subscriber::registry().with(buffer.layer()));
    let (mut base_costs, mut layer_costs) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        base_costs.extend(emit_costs(&baseline, 25_000));
        layer_costs.extend(emit_costs(&buffered, 25_000));
        let target = buffer.metrics().queued;
        wait_until("the cost round appended", Duration::from_secs(60), || {
            buffer.metrics().appended >= target
        })
        .await?;
    }
    let (base_p50, base_p99) = (
        percentile(&mut base_costs, 0.5),
        percentile(&mut base_costs, 0.99),
    );
    let (p50, p99) = (
        percentile(&mut layer_costs, 0.5),
        percentile(&mut layer_costs, 0.99),
    );
    println!(
        "emit cost per event (ns): registry alone p50 {base_p50} p99 {base_p99}; with the buffer layer p50 {p50} p99 {p99}"
    );
    let _: () = client.query(&redis::cmd("FLUSHALL")).await?;

    // (b) records buffered per second and (c) lines offloaded per second,
    // the offloader running alongside.
    let offloader = Offloader::builder(client.clone(), LokiSink::builder(&receiver.url).build()?)
        .poll_interval(Duration::from_millis(10))
        .discovery_interval(Duration::from_millis(100))
        .backoff(redis_failover::Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        )?)
        .start()?;
    let appended_before = buffer.metrics().appended;
    let started = Instant::now();
    tracing::dispatcher::with_default(&buffered, || (0..EVENTS).for_each(emit));
    wait_until("records appended", Duration::from_secs(120), || {
        buffer.metrics().appended >= appended_before + EVENTS
    })
    .await?;
    let buffered_rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    wait_until("lines offloaded", Duration::from_secs(120), || {
        receiver.lines.load(Ordering::Relaxed) >= EVENTS
    })
    .await?;
    let offloaded_rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    println!(
        "buffered {buffered_rate:.0} records/s; offloaded {offloaded_rate:.0} lines/s ({EVENTS} events, 16 tenants)"
    );

    // (d) a backlog built while the receiver answers 503, then drained.
    receiver.down.store(true, Ordering::Relaxed);
    let appended_before = buffer.metrics().appended;
    tracing::dispatcher::with_default(&buffered, || (0..EVENTS).for_each(emit));
    wait_until("backlog appended", Duration::from_secs(120), || {
        buffer.metrics().appended >= appended_before + EVENTS
    })
    .await?;
    let before = receiver.lines.load(Ordering::Relaxed);
    receiver.down.store(false, Ordering::Relaxed);
    let drained = wait_until("backlog drained", Duration::from_secs(300), || {
        receiver.lines.load(Ordering::Relaxed) >= before + EVENTS
    })
    .await?;
    let drain_rate = EVENTS as f64 / drained.as_secs_f64();
    println!(
        "drained a backlog of {EVENTS} lines at {drain_rate:.0} lines/s (including the tenants' backoff after the outage)"
    );
    println!("targets: p99 emit <= 2000 ns, >= 100k records/s buffered, >= 50k lines/s offloaded");
    offloader.shutdown(Duration::from_secs(5)).await;
    let metrics = buffer.shutdown(Duration::from_secs(5)).await;
    println!("producer: {metrics:?}");
    Ok(json!({
        "scenario": "logs",
        "emit_ns": { "registry_p50": base_p50, "registry_p99": base_p99, "layer_p50": p50, "layer_p99": p99 },
        "buffered_records_per_sec": buffered_rate,
        "offloaded_lines_per_sec": offloaded_rate,
        "drain_lines_per_sec": drain_rate,
        "dropped": metrics.dropped_queue_full + metrics.dropped_redis_failed,
    }))
}
