//! tenant-kv used directly, with an audit consumer of your own.
//!
//! Starts a local Redis master, stores, replaces and deletes a few items of
//! tenant `acme` (each write and its audit record are one atomic step),
//! then reads the tenant's audit stream `tenant:{acme}:audit` through a
//! consumer group of its own, as a billing or SIEM exporter would, and
//! acknowledges what it printed. Rerun the consumer part and it gets only
//! records it has not acknowledged yet.
//!
//! ```text
//! cargo run -p examples --bin tenant-audit
//! ```

use std::collections::HashMap;
use std::error::Error;
use std::time::Duration;

use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;
use serde_json::json;
use tenant_kv::{Actor, NewItem, Precondition, TenantId, TenantKv};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let topology = Topology::builder().replicas(0).sentinels(0).start().await?;
    let master = NodeAddr::from(topology.addr(topology.initial_master()));
    let client = FailoverClient::candidates([master]).build()?;
    let store = TenantKv::builder(client.clone()).build()?;

    let acme = store.tenant(TenantId::new("acme")?, Actor::user("alice"));
    let item = acme
        .create(
            "invoice/42",
            NewItem::new(json!({"total": 120})).ttl(Duration::from_secs(3600)),
        )
        .await?;
    acme.put(
        "invoice/42",
        NewItem::new(json!({"total": 95})),
        Precondition::Version(item.version),
    )
    .await?;
    acme.create("invoice/43", NewItem::new(json!({"total": 10})))
        .await?;
    acme.delete("invoice/43", None).await?;

    // The consumer: a group of its own, so it never competes with the log
    // offloader's group for the same records. The offloader leaves in the
    // stream what any group has yet to acknowledge (the audit stream's
    // length cap still applies).
    let stream = "tenant:{acme}:audit";
    let created: Result<String, _> = client
        .query(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg("billing")
                .arg("0"),
        )
        .await;
    if let Err(error) = created
        && !error.to_string().contains("BUSYGROUP")
    {
        return Err(error.into());
    }
    let reply: redis::streams::StreamReadReply = client
        .query(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("billing")
                .arg("exporter-1")
                .arg("COUNT")
                .arg(100)
                .arg("STREAMS")
                .arg(stream)
                .arg(">"),
        )
        .await?;
    for key in reply.keys {
        for record in key.ids {
            let entry: HashMap<String, String> = record
                .map
                .iter()
                .filter_map(|(name, value)| {
                    redis::from_redis_value::<String>(value.clone())
                        .ok()
                        .map(|v| (name.clone(), v))
                })
                .collect();
            // Records are lines of JSON in the entry's `records` field.
            match tenant_kv::audit_records(entry) {
                Some(records) => {
                    for fields in records {
                        println!(
                            "{} {:<12} by {:<10} key {:<12} version {}",
                            record.id,
                            fields.get("action").map_or("?", String::as_str),
                            fields.get("actor").map_or("?", String::as_str),
                            fields.get("key").map_or("?", String::as_str),
                            fields.get("version").map_or("?", String::as_str),
                        );
                    }
                }
                None => println!("{} holds no audit record this version reads", record.id),
            }
            // Acknowledged once handled: a crash before this line gets it again.
            let _: u64 = client
                .query(
                    redis::cmd("XACK")
                        .arg(stream)
                        .arg("billing")
                        .arg(&record.id),
                )
                .await?;
        }
    }
    Ok(())
}
