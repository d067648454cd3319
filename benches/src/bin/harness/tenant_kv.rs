//! The `tenant-kv` scenario (a tenant-kv write and read against raw Redis
//! and a hand-written audited write, with what each costs Redis) and the
//! `list` scenario (listing a tenant among a million other keys).

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use benches::{Settings, Variant, compare};
use redis::aio::MultiplexedConnection;
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;
use serde_json::{Value, json};
use tenant_kv::{Actor, NewItem, Precondition, TenantId, TenantKv};

use super::groups;

const TASKS: usize = 64;

pub(crate) async fn tenant_kv() -> Result<Value, Box<dyn Error>> {
    let settings = Settings::from_env();
    println!("tenant-kv: starting a local master");
    let topology = Topology::builder().replicas(0).sentinels(0).start().await?;
    let master = topology.initial_master();
    let mut raw = redis::Client::open(topology.connection_info(master))?
        .get_multiplexed_async_connection()
        .await?;
    let client = FailoverClient::candidates([NodeAddr::from(topology.addr(master))]).build()?;
    let store = TenantKv::builder(client).build()?;
    let tenant = store.tenant(TenantId::new("bench")?, Actor::system());
    let value = "v".repeat(62);
    for task in 0..TASKS {
        let item = NewItem::new(json!(value));
        tenant
            .put(&format!("k{task}"), item, Precondition::None)
            .await?;
    }
    let raw_value = Arc::new(format!("\"{value}\""));
    for task in 0..TASKS {
        let _: () = redis::cmd("SET")
            .arg(format!("raw:{task}"))
            .arg(raw_value.as_str())
            .query_async(&mut raw)
            .await?;
    }
    let writes = [
        raw_set(&raw, &raw_value),
        hand_written(&raw, &raw_value),
        Variant::new("(c) tenant-kv put, audited", {
            let tenant = tenant.clone();
            move |task| {
                let (tenant, value) = (tenant.clone(), value.clone());
                async move {
                    let item = NewItem::new(json!(value));
                    tenant
                        .put(&format!("k{task}"), item, Precondition::None)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            }
        }),
    ];
    let reads = [
        raw_get(&raw),
        Variant::new("(e) tenant-kv get", move |task| {
            let tenant = tenant.clone();
            async move {
                tenant
                    .get(&format!("k{task}"))
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }),
    ];
    println!(
        "tenant-kv: {TASKS} tasks; {} interleaved rounds of {:?} per variant",
        settings.rounds, settings.duration
    );
    let rows = groups(&[&writes, &reads], TASKS, settings, &[]).await;
    let ratio = |of: &str, to: &str| super::ratio(&rows, of, to);
    let ratios = json!({
        "put_to_hand_written": ratio("(c)", "(b)"),
        "put_to_raw_set": ratio("(c)", "(a)"),
        "get_to_raw_get": ratio("(e)", "(d)"),
    });
    let shown = |name: &str| super::shown(ratios[name].as_f64());
    println!(
        "ratios: (c)/(b) = {} (target >= 0.80), (c)/(a) = {} (target >= 0.35), (e)/(d) = {} (target >= 0.80)",
        shown("put_to_hand_written"),
        shown("put_to_raw_set"),
        shown("get_to_raw_get"),
    );
    let sent: [&[&str]; 5] = [
        &["set"],
        &["multi", "exec"],
        &["evalsha", "eval"],
        &["get"],
        &["get", "mget", "hmget"],
    ];
    let variants = writes.iter().chain(&reads);
    let mut costs = Vec::new();
    println!(
        "Redis cost per operation, each variant alone for {:?} ({TASKS} tasks):\n  {:<36} {:>9} {:>16} {:>26} {:>16}",
        settings.duration,
        "variant",
        "ops",
        "commands µs/op",
        "top command µs/call",
        "Redis CPU µs/op"
    );
    for (variant, sent) in variants.zip(sent) {
        let cost = redis_cost(&mut raw, variant, sent, settings).await?;
        println!(
            "  {:<36} {:>9} {:>16.2} {:>26} {:>16.2}",
            variant.name,
            cost.ops,
            cost.commands_us,
            format!("{} {:.2}", cost.top.0, cost.top.1),
            cost.cpu_us
        );
        costs.push(json!({
            "variant": variant.name,
            "ops": cost.ops,
            "commands_us_per_op": cost.commands_us,
            "top_command": cost.top.0,
            "top_command_usec_per_call": cost.top.1,
            "redis_cpu_us_per_op": cost.cpu_us,
        }));
    }
    println!("target: the put's script (evalsha) at most 8 µs per call");
    Ok(json!({ "scenario": "tenant-kv", "rounds": settings.rounds,
                "seconds": settings.duration.as_secs_f64(), "results": rows,
                "ratios": ratios, "redis_cost": costs }))
}

fn raw_set(raw: &MultiplexedConnection, value: &Arc<String>) -> Variant {
    let (raw, value) = (raw.clone(), Arc::clone(value));
    Variant::new("(a) redis-rs SET", move |task| {
        let (mut raw, value) = (raw.clone(), Arc::clone(&value));
        async move {
            let _: () = redis::cmd("SET")
                .arg(format!("raw:{task}"))
                .arg(value.as_str())
                .query_async(&mut raw)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
    })
}

/// The audited write a user would write by hand: the item, its index
/// entry and an audit record as tenant-kv writes it (one line of JSON),
/// in one `MULTI`/`EXEC`, over the raw connection.
fn hand_written(raw: &MultiplexedConnection, value: &Arc<String>) -> Variant {
    let (raw, value) = (raw.clone(), Arc::clone(value));
    let version = Arc::new(AtomicU64::new(0));
    Variant::new("(b) MULTI SET+ZADD+XADD, by hand", move |task| {
        let (mut raw, value) = (raw.clone(), Arc::clone(&value));
        let version = version.fetch_add(1, Ordering::Relaxed) + 1;
        async move {
            let key = format!("k{task}");
            let ns = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let size = key.len() + value.len();
            let record = format!(
                r#"{{"ts":"{ns}","action":"update_key","actor":"system","key":"{key}","size":"{size}","tenant":"bench","version":"{version}"}}"#
            );
            let _: () = redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(format!("hand:{{bench}}:data:{key}"))
                .arg(value.as_str())
                .ignore()
                .cmd("ZADD")
                .arg("hand:{bench}:index")
                .arg(0)
                .arg(&key)
                .ignore()
                .cmd("XADD")
                .arg("hand:{bench}:audit")
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*")
                .arg("records")
                .arg(record)
                .ignore()
                .query_async(&mut raw)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
    })
}

fn raw_get(raw: &MultiplexedConnection) -> Variant {
    let raw = raw.clone();
    Variant::new("(d) redis-rs GET", move |task| {
        let mut raw = raw.clone();
        async move {
            let _: Option<String> = redis::cmd("GET")
                .arg(format!("raw:{task}"))
                .query_async(&mut raw)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
    })
}

/// What one operation of a variant costs Redis.
struct Cost {
    ops: u64,
    /// µs per operation of the commands the variant sends, from `INFO
    /// commandstats` (a script's or a transaction's own time includes the
    /// commands it runs, which are also counted apart: not added again).
    commands_us: f64,
    /// The costliest command sent, and its `usec_per_call`.
    top: (String, f64),
    /// µs of Redis process CPU (user and system) per operation, from `INFO cpu`.
    cpu_us: f64,
}

/// Runs `variant` alone for one measurement and reads what it cost Redis.
/// `sent` names the commands the variant sends itself, as `INFO
/// commandstats` spells them.
async fn redis_cost(
    raw: &mut MultiplexedConnection,
    variant: &Variant,
    sent: &[&str],
    settings: Settings,
) -> Result<Cost, Box<dyn Error>> {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(raw)
        .await?;
    let cpu_before = redis_cpu_seconds(raw).await?;
    let once = Settings {
        duration: settings.duration,
        rounds: 1,
    };
    let measured = compare(std::slice::from_ref(variant), TASKS, once).await;
    let cpu = redis_cpu_seconds(raw).await? - cpu_before;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(raw)
        .await?;
    let ops = measured[0].latencies_us.len() as u64 + measured[0].errors;
    let (mut usec, mut top, mut top_usec) = (0.0, (String::from("-"), 0.0), 0.0);
    for line in info.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|rest| rest.split_once(':'))
        else {
            continue;
        };
        if !sent.contains(&name) {
            continue;
        }
        let field = |wanted: &str| {
            stats
                .split(',')
                .find_map(|pair| pair.strip_prefix(wanted)?.strip_prefix('='))
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        usec += field("usec");
        if field("usec") > top_usec {
            top_usec = field("usec");
            top = (name.to_owned(), field("usec_per_call"));
        }
    }
    let per_op = |total: f64| total / (ops.max(1) as f64);
    Ok(Cost {
        ops,
        commands_us: per_op(usec),
        top,
        cpu_us: per_op(cpu * 1e6),
    })
}

/// The Redis process's CPU time so far, user and system, in seconds.
pub(crate) async fn redis_cpu_seconds(
    raw: &mut MultiplexedConnection,
) -> Result<f64, Box<dyn Error>> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(raw).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(field("used_cpu_user") + field("used_cpu_sys"))
}

pub(crate) async fn list() -> Result<Value, Box<dyn Error>> {
    const OTHER_KEYS: usize = 1_000_000;
    let settings = Settings::from_env();
    println!("list: starting two local masters");
    let alone = Topology::builder().replicas(0).sentinels(0).start().await?;
    let crowded = Topology::builder().replicas(0).sentinels(0).start().await?;
    let mut tenants = Vec::new();
    for topology in [&alone, &crowded] {
        let master = NodeAddr::from(topology.addr(topology.initial_master()));
        let store = TenantKv::builder(FailoverClient::candidates([master]).build()?).build()?;
        let tenant = store.tenant(TenantId::new("mine")?, Actor::system());
        for i in 0..100 {
            let item = NewItem::new(json!(i));
            tenant.create(&format!("item/{i:03}"), item).await?;
        }
        tenants.push(tenant);
    }
    println!("list: writing {OTHER_KEYS} keys of 1,000 other tenants");
    let mut raw = redis::Client::open(crowded.connection_info(crowded.initial_master()))?
        .get_multiplexed_async_connection()
        .await?;
    for batch in 0..OTHER_KEYS / 10_000 {
        let mut pipe = redis::pipe();
        for i in batch * 10_000..(batch + 1) * 10_000 {
            pipe.cmd("SET")
                .arg(format!("tenant:{{t{}}}:data:item/{i:07}", i % 1000))
                .arg("1")
                .ignore()
                .cmd("ZADD")
                .arg(format!("tenant:{{t{}}}:index", i % 1000))
                .arg(0)
                .arg(format!("item/{i:07}"))
                .ignore();
        }
        let _: () = pipe.query_async(&mut raw).await?;
    }
    let variant = |name: &str, tenant: tenant_kv::Tenant| {
        Variant::new(name, move |_| {
            let tenant = tenant.clone();
            async move {
                let page = tenant
                    .list("item/", 100, None)
                    .await
                    .map_err(|e| e.to_string())?;
                if page.keys.len() == 100 {
                    Ok(())
                } else {
                    Err(format!("listed {} keys", page.keys.len()))
                }
            }
        })
    };
    let crowded_tenant = tenants.pop().expect("two tenants");
    let alone_tenant = tenants.pop().expect("two tenants");
    let variants = [
        variant("(a) 100 keys, tenant alone", alone_tenant),
        variant("(b) 100 keys among 1M others", crowded_tenant),
    ];
    let rows = groups(&[&variants], TASKS, settings, &[]).await;
    println!("target: (b) takes <= 2x the time of (a), i.e. (b)/(a) throughput >= 0.5");
    Ok(json!({ "scenario": "list", "rounds": settings.rounds,
                "seconds": settings.duration.as_secs_f64(), "results": rows }))
}
