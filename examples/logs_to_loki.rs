//! log-buffer wired into a `tracing` subscriber, shipping to Loki per tenant.
//!
//! Starts a local Redis master, installs a subscriber that prints to
//! stderr and feeds the log buffer, and logs a few events for two tenants
//! (the `tenant_id` field, on the event or its span, picks the tenant).
//! An offloader ships them to Loki with `X-Scope-OrgID: <tenant>`, or,
//! without a Loki URL, to `logs.ndjson` in the current directory. Shutdown
//! flushes the queue to Redis and lets the offloader finish.
//!
//! ```text
//! cargo run -p examples --bin logs-to-loki                          # to ./logs.ndjson
//! cargo run -p examples --bin logs-to-loki -- http://127.0.0.1:3100  # to a Loki
//! ```

use std::error::Error;
use std::time::Duration;

use log_buffer::{FileSink, LogBuffer, LogSink, LokiSink, Offloader};
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let topology = Topology::builder().replicas(0).sentinels(0).start().await?;
    let master = NodeAddr::from(topology.addr(topology.initial_master()));
    let client = FailoverClient::candidates([master]).build()?;

    let buffer = LogBuffer::builder(client.clone())
        .default_tenant("system")
        .start()?;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(buffer.layer())
        .init();

    let sink: Box<dyn LogSink> = match std::env::args().nth(1) {
        Some(url) => Box::new(LokiSink::builder(url).build()?),
        None => Box::new(FileSink::new("logs.ndjson")),
    };
    let offloader = Offloader::builder(client, sink).start()?;

    tracing::info!(tenant_id = "acme", user = "alice", "logged in");
    let request = tracing::info_span!("request", tenant_id = "globex", request_id = "r-7");
    request.in_scope(|| {
        tracing::warn!(status = 429, "rate limited");
        tracing::info!(status = 200, "retried and served");
    });
    tracing::info!("no tenant: goes to the default tenant");

    let metrics = buffer.shutdown(Duration::from_secs(5)).await;
    println!("buffered: {metrics:?}");
    // The offloader finds the new streams within its discovery interval.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while sent(&offloader) < metrics.appended && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("shipped {} lines", sent(&offloader));
    offloader.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

fn sent(offloader: &Offloader) -> u64 {
    offloader
        .metrics()
        .values()
        .map(|tenant| tenant.sent_lines)
        .sum()
}
