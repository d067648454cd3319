//! The benchmark harness: starts its own local Redis topology, runs one
//! scenario with progress on stdout, prints a table, and can write the
//! results as JSON.
//!
//! ```text
//! cargo run --release -p benches --bin harness -- kv [--json FILE]
//! cargo run --release -p benches --bin harness -- failover [--failovers N] [--json FILE]
//! cargo run --release -p benches --bin harness -- reads [--json FILE]
//! cargo run --release -p benches --bin harness -- tenant-kv [--json FILE]
//! cargo run --release -p benches --bin harness -- list [--json FILE]
//! cargo run --release -p benches --bin harness -- logs [--json FILE]
//! cargo run --release -p benches --bin harness -- http [--json FILE]
//! cargo build --release -p server && cargo run --release -p benches --bin harness -- abuse
//! cargo run --release -p benches --bin harness -- chaos [--rounds N] [--cluster] [--json FILE]
//! cargo run --release -p benches --bin harness -- cluster [--json FILE]
//! ```
//!
//! - `kv`: `SET` then `GET` of a 64-byte value from 1, 16, 64 and 256
//!   concurrent tasks, through (a) one shared redis-rs multiplexed
//!   connection, the baseline, (b) a bb8-redis pool with an exclusive
//!   checkout per operation, and (c) a redis-failover client; ratios are to
//!   (a). Targets: (c) >= 0.90x (a) at 64 and 256 tasks, and >= 4x (b).
//!   `BENCH_SECONDS` and `BENCH_ROUNDS` set the length of each measurement.
//!   In `reads`, `tenant-kv`, `http` and `cluster`, `BENCH_ONLY` (name
//!   prefixes separated by commas, such as `(b),(c)`) runs only the
//!   variants it names in the interleaved comparison, to profile one alone.
//! - `failover`: N (default 20) kill -9 failovers of the master while 8
//!   tasks write through a redis-failover client; for each, the time from
//!   the kill to the first `+switch-master`, the time from that notice to
//!   the client's first successful write, and the errors callers saw.
//!   Targets: 0 errors, p99 client delay <= 50 ms. The promotion is the
//!   earliest `+switch-master` of any sentinel; a negative delay means the
//!   client wrote to the new master before any notice arrived. Kills are spaced by twice Sentinel's failover timeout, the
//!   least time Sentinel leaves between two failovers of one master.
//! - `reads`: 64 tasks against a master with 2 replicas. `GET` through (a)
//!   one redis-rs multiplexed connection to the master, the baseline, and
//!   a redis-failover client with (b) `ReadPolicy::Master`, (c) `Replica`,
//!   (d) `Nearest`, (e) `ReplicaPreferred` in a read-your-writes session;
//!   then `SET` through (f) a plain redis-failover client, the writes'
//!   baseline, (g) a session (the write and a `ROLE`), (h)
//!   `Durability::Replicated { replicas: 1 }` (the write and a share of a
//!   `WAIT`: group commit).
//!   Read ratios are to (a), write ratios to (f).
//! - `tenant-kv`: 64 tasks against one master, updating and reading 64
//!   existing items of 64 bytes: (a) raw redis-rs `SET`, the baseline of
//!   writes, (b) the write a user would make by hand with the same
//!   guarantees (one `MULTI`: the item `SET`, the index `ZADD` and the
//!   audit `XADD`, then `EXEC`), (c) a tenant-kv `put`; then (d) raw `GET`,
//!   the baseline of reads, against (e) a tenant-kv `get`. Then each
//!   variant alone again, to read its Redis cost per operation from `INFO
//!   commandstats` (the commands it sends, nested ones included) and `INFO
//!   cpu`. Targets: (c)/(b) >= 0.8, (c)/(a) >= 0.35, (e)/(d) >= 0.8, and
//!   the put's script at most 8 µs per call.
//! - `list`: listing a tenant's 100 keys on a master that holds only them
//!   (the baseline) and on one that also holds 1,000,000 keys of other
//!   tenants. Target: <= 2x the time.
//! - `logs`: log-buffer with 16 tenants: the caller's cost per event with
//!   the buffer's layer against a bare `tracing` registry (p50, p99);
//!   records appended to Redis per second and lines offloaded per second
//!   to a local push receiver, for 200,000 events; and the rate at which a
//!   backlog of 200,000 lines built while the receiver answered 503
//!   drains. Targets: p99 emit <= 2 us, >= 100k records/s buffered,
//!   >= 50k lines/s offloaded.
//! - `http`: the server (dev mode: master, 2 replicas, 3 sentinels, JWT
//!   auth, audited writes, logs buffered and shipped) over 64 keep-alive
//!   connections: (a) a minimal hyper endpoint answering each request with
//!   one Redis `GET` on the same master, the baseline, (b) `GET
//!   /data/{key}`, (c) `PUT /data/{key}`, (d) and (e) webdis's `GET` and
//!   `SET` when it is installed, (f) `PUT` acknowledged by both replicas,
//!   (g) `GET` with one read in 100 audited. Targets: (b) >= 0.7x (a) and
//!   (d), (c) >= 0.5x (e), (f) >= 0.35x (e), p99 <= 5 ms.
//! - `abuse`: `server serve` as its own process; a quiet tenant's GETs over
//!   64 connections alone, then while (a) 512 clients guess passwords,
//!   (b) 200 clients pipeline requests and never read, (c) a noisy tenant
//!   sends ten times its request rate, in turn and together. Targets: the
//!   quiet tenant keeps >= 0.8x its throughput, p99 at most doubles, no
//!   5xx, and the server's resident memory peaks at <= 256 MiB.
//! - `chaos`: the whole system (topology, two servers, two offloaders, a
//!   Loki-compatible receiver) under PUT and GET traffic from three
//!   tenants, one fault per round cycling through kill -9 / SIGSTOP /
//!   `SENTINEL FAILOVER` of the master, a restart of every sentinel, an
//!   offloader killed, the receiver answering 500 or 429 or refusing
//!   connections, the master at `maxmemory`, unable to persist, out of
//!   client slots, or restarted at once with AOF, and (where network
//!   namespaces can be made) the master cut from the sentinels and the
//!   clients cut from the master; then acknowledged writes missing, audit
//!   records missing at the receiver, duplicate lines, client errors within
//!   the retry budget, writes refused at once, and recovery time per round.
//!   Then, on a system of its own, a master without persistence restarted
//!   at once: the data it loses. Targets for N = 20: 0 lost, 0 missing, 0
//!   errors within the budget. With `--cluster`, the system runs on a
//!   Redis Cluster of 3 shards (a master and a replica each; writes wait
//!   for their shard's replica), and the faults are a shard master killed
//!   (kill -9) or stopped (SIGSTOP), a `CLUSTER FAILOVER`, and a busy
//!   tenant's slot moved to another shard, each on a tenant's shard.
//! - `cluster`: tenant-kv over 12 tenants from 64 tasks, (a) put and (c)
//!   get on one master with a replica, the baselines, against (b) put and
//!   (d) get on a Redis Cluster of 3 such shards, on the same cores. Then
//!   (b) and (d) alone, with each shard master's operations per second and
//!   Redis CPU per operation (`INFO commandstats`, `INFO cpu`). Target:
//!   (b)/(a) and (d)/(c) >= 0.9 (at most 10% overhead).

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::{Settings, Variant, compare, report};
use redis_failover::{Durability, FailoverClient, NodeAddr, ReadPolicy};
use redis_topology::Topology;
use rows::{groups, ratio, shown};
use serde_json::{Value, json};

// The allocator `server` runs with, so that the scenarios running the
// server in this process (`http`, `tenant-kv`) measure what it does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod abuse;
mod cluster;
mod failover;
mod http;
mod logs;
mod rows;
mod tenant_kv;
mod webdis;

const USAGE: &str = "usage: harness <kv|failover|reads|tenant-kv|list|logs|http|abuse|chaos|cluster> [--failovers N] [--rounds N] [--cluster] [--json FILE]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(scenario) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let (mut json_path, mut failovers, mut rounds) = (None, 20usize, 20usize);
    let mut cluster = false;
    while let Some(arg) = args.next() {
        if arg == "--cluster" {
            cluster = true;
            continue;
        }
        match (arg.as_str(), args.next()) {
            ("--json", Some(path)) => json_path = Some(path),
            ("--failovers", Some(n)) if n.parse::<usize>().is_ok_and(|n| n > 0) => {
                failovers = n.parse().expect("checked");
            }
            ("--rounds", Some(n)) if n.parse::<usize>().is_ok_and(|n| n > 0) => {
                rounds = n.parse().expect("checked");
            }
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("harness: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match scenario.as_str() {
            "kv" => kv().await,
            "failover" => failover::failover(failovers).await,
            "reads" => reads().await,
            "tenant-kv" => tenant_kv::tenant_kv().await,
            "list" => tenant_kv::list().await,
            "logs" => logs::logs().await,
            "http" => http::http().await,
            "abuse" => abuse::abuse().await,
            "chaos" if cluster => chaos_cluster(rounds).await,
            "chaos" => chaos(rounds).await,
            "cluster" => cluster::cluster().await,
            _ => Err(USAGE.into()),
        }
    });
    match result {
        Ok(results) => {
            if let Some(path) = json_path {
                let text = serde_json::to_string_pretty(&results).expect("JSON values serialize");
                if let Err(error) = std::fs::write(&path, text + "\n") {
                    eprintln!("harness: cannot write {path}: {error}");
                    return ExitCode::FAILURE;
                }
                println!("results written to {path}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            let mut message = format!("harness: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

async fn kv() -> Result<Value, Box<dyn Error>> {
    let settings = Settings::from_env();
    println!("kv: starting a local master");
    let topology = Topology::builder().replicas(0).sentinels(0).start().await?;
    let master = topology.initial_master();
    let raw = redis::Client::open(topology.connection_info(master))?
        .get_multiplexed_async_connection()
        .await?;
    let pool = bb8::Pool::builder()
        .max_size(32)
        .build(bb8_redis::RedisConnectionManager::new(
            topology.connection_info(master),
        )?)
        .await?;
    let client = FailoverClient::candidates([NodeAddr::from(topology.addr(master))]).build()?;
    client.wait_for_master(Duration::from_secs(10)).await?;
    let failover = client.connection();

    let value = Arc::new("v".repeat(64));
    let variants = [
        Variant::new("(a) redis-rs multiplexed, shared", {
            let value = Arc::clone(&value);
            move |task| {
                let (mut connection, value) = (raw.clone(), Arc::clone(&value));
                async move { set_get(&mut connection, task, &value).await }
            }
        }),
        Variant::new("(b) bb8-redis, checkout per operation", {
            let value = Arc::clone(&value);
            move |task| {
                let (pool, value) = (pool.clone(), Arc::clone(&value));
                async move {
                    let mut connection = pool.get().await.map_err(|e| e.to_string())?;
                    set_get(&mut *connection, task, &value).await
                }
            }
        }),
        Variant::new("(c) redis-failover client", {
            let value = Arc::clone(&value);
            move |task| {
                let (mut connection, value) = (failover.clone(), Arc::clone(&value));
                async move { set_get(&mut connection, task, &value).await }
            }
        }),
    ];
    println!(
        "kv: SET+GET of 64 bytes; {} interleaved rounds of {:?} per variant",
        settings.rounds, settings.duration
    );
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for tasks in [1, 16, 64, 256] {
        let measurements = compare(&variants, tasks, settings).await;
        print!("{}", report(&variants, tasks, &measurements));
        let ops = |i: usize| measurements[i].ops_per_sec();
        ratios.push((tasks, ops(2) / ops(0), ops(2) / ops(1)));
        for (variant, m) in variants.iter().zip(&measurements) {
            rows.push(json!({
                "tasks": tasks,
                "variant": variant.name,
                "ops_per_sec": m.ops_per_sec(),
                "ratio_to_a": m.ops_per_sec() / ops(0),
                "p50_us": m.percentile(0.50).as_micros(),
                "p99_us": m.percentile(0.99).as_micros(),
                "p999_us": m.percentile(0.999).as_micros(),
                "errors": m.errors,
            }));
        }
    }
    println!("targets: (c)/(a) >= 0.90 at 64 and 256 tasks, (c)/(b) >= 4");
    for (tasks, to_a, to_b) in &ratios {
        println!("  {tasks:>3} tasks: (c)/(a) = {to_a:.2}, (c)/(b) = {to_b:.2}");
    }
    let transactions = kv_transactions(&topology, settings).await?;
    Ok(json!({ "scenario": "kv", "rounds": settings.rounds,
                "seconds": settings.duration.as_secs_f64(), "results": rows,
                "transactions": transactions }))
}

/// WATCH, GET, then MULTI SET EXEC on each task's own key: by hand on a
/// connection of its own from a bb8 pool, and through the client's
/// `transaction`, with as many connections each.
async fn kv_transactions(topology: &Topology, settings: Settings) -> Result<Value, Box<dyn Error>> {
    const CONNECTIONS: u32 = 32;
    let master = topology.initial_master();
    let pool = bb8::Pool::builder()
        .max_size(CONNECTIONS)
        .build(bb8_redis::RedisConnectionManager::new(
            topology.connection_info(master),
        )?)
        .await?;
    let client = FailoverClient::candidates([NodeAddr::from(topology.addr(master))])
        .dedicated_connections(CONNECTIONS)
        .build()?;
    client.wait_for_master(Duration::from_secs(10)).await?;
    let variants = [
        Variant::new(
            "(t1) redis-rs WATCH/MULTI/EXEC, bb8 checkout",
            move |task| {
                let pool = pool.clone();
                async move {
                    let mut connection = pool.get().await.map_err(|e| e.to_string())?;
                    let key = format!("bench:tx:{task}");
                    let fail = |e: redis::RedisError| e.to_string();
                    let _: () = redis::cmd("WATCH")
                        .arg(&key)
                        .query_async(&mut *connection)
                        .await
                        .map_err(fail)?;
                    let now: Option<u64> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut *connection)
                        .await
                        .map_err(fail)?;
                    let _: () = redis::pipe()
                        .atomic()
                        .set(&key, now.unwrap_or(0) + 1)
                        .ignore()
                        .query_async(&mut *connection)
                        .await
                        .map_err(fail)?;
                    Ok(())
                }
            },
        ),
        Variant::new("(t2) redis-failover transaction", move |task| {
            let client = client.clone();
            async move {
                let key = format!("bench:tx:{task}");
                let _: Option<()> = client
                    .transaction(&[&key], |mut watched| {
                        let key = key.clone();
                        async move {
                            let now: Option<u64> = watched.get(&key).await?;
                            let mut pipeline = redis::pipe();
                            pipeline.set(&key, now.unwrap_or(0) + 1).ignore();
                            Ok(Some(pipeline))
                        }
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        }),
    ];
    println!("kv transactions: WATCH + GET + MULTI/SET/EXEC on each task's own key");
    let mut rows = Vec::new();
    for tasks in [16, 64] {
        let measurements = compare(&variants, tasks, settings).await;
        print!("{}", report(&variants, tasks, &measurements));
        let ratio = measurements[1].ops_per_sec() / measurements[0].ops_per_sec();
        println!("  {tasks:>3} tasks: (t2)/(t1) = {ratio:.2}");
        for (variant, m) in variants.iter().zip(&measurements) {
            rows.push(json!({
                "tasks": tasks,
                "variant": variant.name,
                "ops_per_sec": m.ops_per_sec(),
                "p50_us": m.percentile(0.50).as_micros(),
                "p99_us": m.percentile(0.99).as_micros(),
                "errors": m.errors,
            }));
        }
    }
    Ok(json!(rows))
}

async fn reads() -> Result<Value, Box<dyn Error>> {
    const TASKS: usize = 64;
    let settings = Settings::from_env();
    println!("reads: starting a master with 2 replicas");
    let topology = Topology::builder().sentinels(0).start().await?;
    let master = topology.initial_master();
    let raw = redis::Client::open(topology.connection_info(master))?
        .get_multiplexed_async_connection()
        .await?;
    let nodes = topology
        .data_nodes()
        .into_iter()
        .map(|n| topology.addr(n).into());
    let client = FailoverClient::candidates(nodes).build()?;
    client.wait_for_master(Duration::from_secs(10)).await?;
    let value = "v".repeat(64);
    for task in 0..TASKS {
        topology
            .set_and_wait(master, &format!("bench:{task}"), &value, 2)
            .await?;
    }
    let started = Instant::now();
    while client
        .replicas()
        .iter()
        .filter(|r| r.unusable.is_none())
        .count()
        < 2
    {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("the replicas did not become usable within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let session = client
        .with_read_policy(ReadPolicy::ReplicaPreferred)
        .session();
    session.set("bench:session", &value).await?;
    let value = Arc::new(value);

    let key = |task: usize| format!("bench:{task}");
    let get = |name: &str, policy: ReadPolicy| {
        let client = client.with_read_policy(policy);
        Variant::new(name, move |task| {
            let client = client.clone();
            async move {
                let _: Option<String> = client.get(&key(task)).await.map_err(|e| e.to_string())?;
                Ok(())
            }
        })
    };
    let set = |name: &str, client: FailoverClient| {
        let value = Arc::clone(&value);
        Variant::new(name, move |task| {
            let (client, value) = (client.clone(), Arc::clone(&value));
            async move {
                client
                    .set(&key(task), value.as_str())
                    .await
                    .map_err(|e| e.to_string())
            }
        })
    };
    let reads = [
        Variant::new("(a) redis-rs multiplexed, master", move |task| {
            let mut connection = raw.clone();
            async move {
                let _: Option<String> = redis::cmd("GET")
                    .arg(key(task))
                    .query_async(&mut connection)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        }),
        get("(b) redis-failover, Master", ReadPolicy::Master),
        get("(c) redis-failover, Replica", ReadPolicy::Replica),
        get("(d) redis-failover, Nearest", ReadPolicy::Nearest),
        Variant::new("(e) session, ReplicaPreferred", {
            let session = session.clone();
            move |task| {
                let session = session.clone();
                async move {
                    let _: Option<String> =
                        session.get(&key(task)).await.map_err(|e| e.to_string())?;
                    Ok(())
                }
            }
        }),
    ];
    let durable = Durability::Replicated {
        replicas: 1,
        timeout: Duration::from_secs(1),
    };
    let writes = [
        set("(f) redis-failover SET", client.clone()),
        Variant::new("(g) session SET", {
            let value = Arc::clone(&value);
            move |task| {
                let (session, value) = (session.clone(), Arc::clone(&value));
                async move {
                    session
                        .set(&key(task), value.as_str())
                        .await
                        .map_err(|e| e.to_string())
                }
            }
        }),
        set(
            "(h) SET, Replicated { replicas: 1 }",
            client.with_durability(durable),
        ),
    ];
    println!(
        "reads: {TASKS} tasks; {} interleaved rounds of {:?} per variant",
        settings.rounds, settings.duration
    );
    let rows = groups(&[&reads, &writes], TASKS, settings, &[]).await;
    let metrics = client.metrics();
    println!(
        "replica reads {}, session reads sent to the master {}",
        metrics.replica_reads, metrics.session_fallbacks
    );
    Ok(json!({ "scenario": "reads", "rounds": settings.rounds,
                "seconds": settings.duration.as_secs_f64(), "results": rows }))
}

async fn set_get(
    connection: &mut impl redis::aio::ConnectionLike,
    task: usize,
    value: &str,
) -> Result<(), String> {
    let key = format!("bench:{task}");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(value)
        .query_async(connection)
        .await
        .map_err(|e| e.to_string())?;
    let _: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(connection)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Runs `rounds` chaos rounds cycling through `faults`, and prints the
/// totals, the table and the targets.
async fn chaos_rounds(
    rounds: usize,
    faults: &[e2e_tests::chaos::Fault],
) -> Result<e2e_tests::chaos::Report, Box<dyn Error>> {
    use e2e_tests::chaos;
    println!("chaos: {rounds} rounds, faults cycling through {faults:?}");
    let report = chaos::run(rounds, faults)
        .await
        .map_err(|e| e.to_string())?;
    chaos::print_totals(&report);
    chaos::print_table(&report);
    println!(
        "targets: 0 acknowledged writes lost or missed by a read, 0 audit records missing, 0 client errors within the retry budget or past it"
    );
    Ok(report)
}

/// The chaos run on a Redis Cluster: its faults only, on 3 shards.
async fn chaos_cluster(rounds: usize) -> Result<Value, Box<dyn Error>> {
    let report = chaos_rounds(rounds, &e2e_tests::chaos::Fault::CLUSTER).await?;
    Ok(json!({ "scenario": "chaos --cluster", "report": report.to_json() }))
}

async fn chaos(rounds: usize) -> Result<Value, Box<dyn Error>> {
    use e2e_tests::chaos::{self, Fault};
    let mut faults = Fault::ALL.to_vec();
    match redis_topology::check_network_namespaces() {
        Ok(()) => faults.extend(Fault::NETWORK),
        Err(error) => println!("chaos: no network faults ({error})"),
    }
    let report = chaos_rounds(rounds, &faults).await?;
    // Redis's documented hazard, on a system of its own: a master without
    // persistence restarted before Sentinel notices comes back empty.
    println!("\nchaos: a master without persistence restarted at once");
    let wipe = chaos::run(1, &[Fault::RestartMasterEmpty])
        .await
        .map_err(|e| e.to_string())?;
    chaos::print_totals(&wipe);
    chaos::print_table(&wipe);
    Ok(json!({ "scenario": "chaos", "report": report.to_json(), "empty_restart": wipe.to_json() }))
}
