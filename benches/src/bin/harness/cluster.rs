//! The `cluster` scenario: tenant-kv's put and get on a 3-shard Redis
//! Cluster against the same on one master, in one run, with raw `GET`s
//! (one master, and routed by hand over the shards) as what sharding costs
//! any client on the machine; then what each shard served and what it
//! cost that shard's Redis and the harness, for a projection to one
//! machine per shard.

use std::error::Error;

use benches::{Settings, Variant, compare};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::{Cluster, Topology, slot_of};
use serde_json::{Value, json};
use tenant_kv::{Actor, NewItem, Precondition, Tenant, TenantId, TenantKv};

use super::groups;

const TASKS: usize = 64;
/// Tenants the tasks spread over: enough that every shard serves some.
const TENANTS: usize = 12;

pub(crate) async fn cluster() -> Result<Value, Box<dyn Error>> {
    let settings = Settings::from_env();
    println!("cluster: starting a master with a replica, and a cluster of 3 such shards");
    let topology = Topology::builder().replicas(1).sentinels(0).start().await?;
    let master = NodeAddr::from(topology.addr(topology.initial_master()));
    let single = FailoverClient::candidates([master]).build()?;
    let cluster = Cluster::builder()
        .shards(3)
        .replicas_per_shard(1)
        .start()
        .await?;
    let seeds: Vec<NodeAddr> = cluster
        .nodes()
        .into_iter()
        .map(|node| NodeAddr::from(cluster.addr(node)))
        .collect();
    let sharded = FailoverClient::cluster(seeds).build()?;
    let single = tenants(single).await?;
    let sharded = tenants(sharded).await?;
    let writes = [
        put("(a) put, one master", &single),
        put("(b) put, 3-shard cluster", &sharded),
    ];
    let reads = [
        get("(c) get, one master", &single),
        get("(d) get, 3-shard cluster", &sharded),
    ];
    let raw = raw_gets(&topology, &cluster).await?;
    println!(
        "cluster: {TASKS} tasks over {TENANTS} tenants; {} interleaved rounds of {:?} per variant",
        settings.rounds, settings.duration
    );
    let rows = groups(&[&writes, &reads, &raw], TASKS, settings, &[]).await;
    let ratios = json!({
        "put_cluster_to_single": super::ratio(&rows, "(b)", "(a)"),
        "get_cluster_to_single": super::ratio(&rows, "(d)", "(c)"),
        "raw_get_cluster_to_single": super::ratio(&rows, "(f)", "(e)"),
    });
    let ratio = |name: &str| super::shown(ratios[name].as_f64());
    println!(
        "ratios: (b)/(a) = {}, (d)/(c) = {} (target >= 0.90: at most 10% overhead); \
         (f)/(e) = {} (sharding's cost on this machine without tenant-kv's client)",
        ratio("put_cluster_to_single"),
        ratio("get_cluster_to_single"),
        ratio("raw_get_cluster_to_single"),
    );
    let mut masters = vec![(
        topology.addr(topology.initial_master()).to_string(),
        topology.connection(topology.initial_master()).await?,
    )];
    let mut shard_masters = Vec::new();
    for shard in cluster.shards().await? {
        let addr = cluster.addr(shard.master).to_string();
        shard_masters.push((addr, cluster.connection(shard.master).await?));
    }
    let mut shards = Vec::new();
    for (variant, masters) in [(&writes[0], &mut masters), (&writes[1], &mut shard_masters)] {
        shards.push(per_master(masters, variant, settings).await?);
    }
    for [single, sharded] in [&reads, &raw] {
        shards.push(per_master(&mut masters, single, settings).await?);
        shards.push(per_master(&mut shard_masters, sharded, settings).await?);
    }
    Ok(json!({ "scenario": "cluster", "rounds": settings.rounds,
                "seconds": settings.duration.as_secs_f64(), "results": rows,
                "ratios": ratios, "shards": shards }))
}

/// A handle per bench tenant on `client`'s store, each with the items the
/// tasks update and read.
async fn tenants(client: FailoverClient) -> Result<Vec<Tenant>, Box<dyn Error>> {
    let store = TenantKv::builder(client).build()?;
    let mut tenants = Vec::new();
    for n in 0..TENANTS {
        tenants.push(store.tenant(TenantId::new(format!("bench{n}"))?, Actor::system()));
    }
    for task in 0..TASKS {
        let item = NewItem::new(json!("v".repeat(62)));
        tenants[task % TENANTS]
            .put(&format!("k{task}"), item, Precondition::None)
            .await?;
    }
    Ok(tenants)
}

fn put(name: &str, tenants: &[Tenant]) -> Variant {
    let tenants = tenants.to_vec();
    Variant::new(name, move |task| {
        let tenant = tenants[task % TENANTS].clone();
        async move {
            let item = NewItem::new(json!("v".repeat(62)));
            tenant
                .put(&format!("k{task}"), item, Precondition::None)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
}

fn get(name: &str, tenants: &[Tenant]) -> Variant {
    let tenants = tenants.to_vec();
    Variant::new(name, move |task| {
        let tenant = tenants[task % TENANTS].clone();
        async move {
            tenant
                .get(&format!("k{task}"))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
}

/// The same GETs with redis-rs alone, on one master and routed by hand
/// over the cluster's shards: what sharding costs on this machine whatever
/// the client.
async fn raw_gets(topology: &Topology, cluster: &Cluster) -> Result<[Variant; 2], Box<dyn Error>> {
    let mut by_hand = vec![topology.connection(topology.initial_master()).await?];
    let mut owners = vec![0u8; usize::from(redis_topology::SLOT_COUNT)];
    for (index, shard) in cluster.shards().await?.into_iter().enumerate() {
        by_hand.push(cluster.connection(shard.master).await?);
        for slot in shard.slots.into_iter().flatten() {
            owners[usize::from(slot)] = index as u8 + 1;
        }
    }
    let one_master = [0; redis_topology::SLOT_COUNT as usize];
    Ok([
        raw_get("(e) GET by redis-rs, one master", &by_hand, &one_master).await?,
        raw_get(
            "(f) GET by redis-rs routed by hand, 3 shards",
            &by_hand,
            &owners,
        )
        .await?,
    ])
}

/// A raw `GET` of each task's own key on `connections[owners[slot]]`
/// (its slot's master), the keys written first.
async fn raw_get(
    name: &str,
    connections: &[MultiplexedConnection],
    owners: &[u8],
) -> Result<Variant, Box<dyn Error>> {
    let mut keys = Vec::new();
    for task in 0..TASKS {
        let key = format!("{{bench{}}}:raw:k{task}", task % TENANTS);
        let mut connection = connections[usize::from(owners[usize::from(slot_of(&key))])].clone();
        let _: () = connection.set(&key, "v".repeat(64)).await?;
        keys.push((key, connection));
    }
    Ok(Variant::new(name, move |task| {
        let (key, mut connection) = keys[task].clone();
        async move {
            connection
                .get::<_, Vec<u8>>(key)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }))
}

/// Runs `variant` alone and prints, for each of `masters` (an address and
/// a connection), the operations it served (script and `GET` calls) and
/// its Redis CPU per operation, with the throughput that CPU allows one
/// core.
async fn per_master(
    masters: &mut [(String, MultiplexedConnection)],
    variant: &Variant,
    settings: Settings,
) -> Result<Value, Box<dyn Error>> {
    let mut before = Vec::new();
    for (_, connection) in masters.iter_mut() {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(connection)
            .await?;
        before.push(super::tenant_kv::redis_cpu_seconds(connection).await?);
    }
    let once = Settings {
        duration: settings.duration,
        rounds: 1,
    };
    let harness_before = harness_cpu_seconds();
    let measured = compare(std::slice::from_ref(variant), TASKS, once).await;
    let total = measured[0].ops_per_sec();
    let harness_cpu = harness_cpu_seconds() - harness_before;
    let harness_us = harness_cpu * 1e6 / (total * settings.duration.as_secs_f64()).max(1.0);
    println!(
        "{} alone: {total:.0} ops/s, harness (client) CPU {harness_us:.2} µs/op; per master:\n  {:<22} {:>10} {:>16} {:>24}",
        variant.name, "master", "ops/s", "Redis CPU µs/op", "ops/s per core at that"
    );
    let mut rows = Vec::new();
    for ((addr, connection), cpu_before) in masters.iter_mut().zip(before) {
        let cpu = super::tenant_kv::redis_cpu_seconds(connection).await?;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(connection)
            .await?;
        let ops = calls(&stats, &["evalsha", "eval", "get"]);
        let seconds = settings.duration.as_secs_f64();
        let cpu_us = (cpu - cpu_before) * 1e6 / ops.max(1) as f64;
        let per_core = 1e6 / cpu_us.max(f64::MIN_POSITIVE);
        println!(
            "  {addr:<22} {:>10.0} {cpu_us:>16.2} {per_core:>24.0}",
            ops as f64 / seconds,
        );
        rows.push(json!({ "master": addr, "ops_per_sec": ops as f64 / seconds,
            "redis_cpu_us_per_op": cpu_us, "ops_per_sec_per_core": per_core }));
    }
    Ok(json!({ "variant": variant.name, "ops_per_sec": total,
               "harness_cpu_us_per_op": harness_us, "masters": rows }))
}

/// The CPU time (user and system) this process used so far, in seconds
/// (0 where `/proc` cannot tell).
fn harness_cpu_seconds() -> f64 {
    benches::own_cpu_time().map_or(0.0, |time| time.as_secs_f64())
}

/// How many calls of `commands` an `INFO commandstats` reply counts.
fn calls(stats: &str, commands: &[&str]) -> u64 {
    stats
        .lines()
        .filter_map(|line| line.strip_prefix("cmdstat_")?.split_once(':'))
        .filter(|(name, _)| commands.contains(name))
        .filter_map(|(_, fields)| {
            fields
                .split(',')
                .find_map(|pair| pair.strip_prefix("calls="))?
                .parse::<u64>()
                .ok()
        })
        .sum()
}
