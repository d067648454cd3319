//! Storage layout 1 datasets for the migration test: written by layout 1's
//! own write script (`fixtures/layout1_write.lua`), with users, quota
//! overrides and a log stream beside, and read back as layout 1 keeps them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

/// Tenants of the dataset.
pub const TENANTS: usize = 20;
/// Items each tenant holds.
pub const ITEMS: usize = 500;
/// The TTL of every fifth item: far longer than the test.
const LONG_TTL_MS: u64 = 2 * 3600 * 1000;

pub fn tenant(n: usize) -> String {
    format!("t{n:02}")
}

pub fn key(i: usize) -> String {
    format!("k{i:04}")
}

/// An item as layout 1 stored it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Original {
    pub value: String,
    pub metadata: Option<String>,
    pub version: u64,
    pub created: u64,
    pub updated: u64,
    pub expires: Option<u64>,
    pub size: u64,
    /// The key's expiry time in Redis (`PEXPIRETIME`, -1 for none).
    pub pexpiretime: i64,
}

/// A tenant as layout 1 stored it.
#[derive(Debug)]
pub struct Snapshot {
    pub items: BTreeMap<String, Original>,
    pub usage: BTreeMap<String, u64>,
    pub audit_len: u64,
}

/// One write for layout 1's script: op, key, value, metadata, TTL in ms.
type Write = (&'static str, String, String, String, String);

async fn run(connection: &mut MultiplexedConnection, tenant: &str, writes: &[Write]) {
    let script = redis::Script::new(include_str!("../fixtures/layout1_write.lua"));
    let prefix = format!("tenant:{tenant}:");
    let mut invocation = script.prepare_invoke();
    for name in [
        "index",
        "expiry",
        "expiring-sizes",
        "usage",
        "audit",
        "rate",
    ] {
        invocation.key(format!("{prefix}{name}"));
    }
    for (_, key, ..) in writes {
        invocation.key(format!("{prefix}data:{key}"));
    }
    invocation
        .arg("user:fixture")
        .arg(format!("{prefix}data:"))
        .arg("")
        .arg("")
        .arg(100_000)
        .arg(tenant)
        .arg("")
        .arg(1);
    for (op, key, value, metadata, ttl) in writes {
        invocation
            .arg(*op)
            .arg(key)
            .arg("")
            .arg(value)
            .arg(metadata)
            .arg(ttl);
    }
    let reply: Vec<redis::Value> = invocation.invoke_async(connection).await.unwrap();
    assert_eq!(
        reply.first(),
        Some(&redis::Value::BulkString(b"ok".to_vec())),
        "{reply:?}"
    );
}

/// The item `i` of `tenant` at its `revision`.
fn item(op: &'static str, tenant: &str, i: usize, revision: u32) -> Write {
    let value = serde_json::json!({"i": i, "tenant": tenant, "revision": revision}).to_string();
    let metadata = if i.is_multiple_of(3) {
        serde_json::json!({"n": i}).to_string()
    } else {
        String::new()
    };
    let ttl = if i.is_multiple_of(5) {
        LONG_TTL_MS.to_string()
    } else {
        String::new()
    };
    (op, key(i), value, metadata, ttl)
}

/// Writes the dataset: per tenant, [`ITEMS`] items (some with metadata,
/// some with a TTL, some written twice), ten items created and deleted,
/// and one item whose TTL runs out before the migration (left in the
/// index and counters, as layout 1 left them until its next write); a
/// user, a quota override, and a log stream with a consumer group.
pub async fn build(connection: &mut MultiplexedConnection) {
    for n in 0..TENANTS {
        let tenant = tenant(n);
        let creates: Vec<Write> = (0..ITEMS).map(|i| item("create", &tenant, i, 1)).collect();
        for batch in creates.chunks(50) {
            run(connection, &tenant, batch).await;
        }
        let updates: Vec<Write> = (0..ITEMS)
            .step_by(7)
            .map(|i| item("put", &tenant, i, 2))
            .collect();
        run(connection, &tenant, &updates).await;
        for j in 0..10 {
            let gone = format!("gone/{j}");
            let created = (
                "create",
                gone.clone(),
                "1".to_owned(),
                String::new(),
                String::new(),
            );
            run(connection, &tenant, &[created]).await;
            let deleted = ("delete", gone, String::new(), String::new(), String::new());
            run(connection, &tenant, &[deleted]).await;
        }
        let short = (
            "create",
            "short".to_owned(),
            "0".to_owned(),
            String::new(),
            "1".to_owned(),
        );
        run(connection, &tenant, &[short]).await;
        let _: () = redis::pipe()
            .hset_multiple(
                format!("user:user-{tenant}"),
                &[
                    ("tenant", tenant.as_str()),
                    (
                        "password_hash",
                        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
                    ),
                    ("disabled", "0"),
                    ("admin", "0"),
                ],
            )
            .ignore()
            .sadd(format!("tenant:{tenant}:users"), format!("user-{tenant}"))
            .ignore()
            .hset(format!("tenant:{tenant}:quotas"), "max_keys", 100_000)
            .ignore()
            .cmd("XADD")
            .arg(format!("tenant:{tenant}:logs"))
            .arg("*")
            .arg("ts")
            .arg(1)
            .arg("message")
            .arg("hello")
            .ignore()
            .cmd("XGROUP")
            .arg("CREATE")
            .arg(format!("tenant:{tenant}:logs"))
            .arg("offloader")
            .arg("0")
            .ignore()
            .query_async(connection)
            .await
            .unwrap();
    }
    // Gone from Redis, still in the index and counters.
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 0..TENANTS {
        let short = format!("tenant:{}:data:short", tenant(n));
        while redis::cmd("EXISTS")
            .arg(&short)
            .query_async::<u32>(connection)
            .await
            .unwrap()
            == 1
        {
            assert!(Instant::now() < deadline, "{short} never expired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A tenant's items, counters and audit stream's length, as layout 1 keeps them.
pub async fn snapshot(connection: &mut MultiplexedConnection, tenant: &str) -> Snapshot {
    let prefix = format!("tenant:{tenant}:");
    let keys: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}index"))
        .arg(0)
        .arg(-1)
        .query_async(connection)
        .await
        .unwrap();
    let mut items = BTreeMap::new();
    for key in keys {
        let redis_key = format!("{prefix}data:{key}");
        let (fields, pexpiretime): (BTreeMap<String, String>, i64) = redis::pipe()
            .hgetall(&redis_key)
            .cmd("PEXPIRETIME")
            .arg(&redis_key)
            .query_async(connection)
            .await
            .unwrap();
        let Some(value) = fields.get("value") else {
            continue;
        };
        let number = |name: &str| fields.get(name).map(|n| n.parse::<u64>().unwrap());
        items.insert(
            key,
            Original {
                value: value.clone(),
                metadata: fields.get("metadata").cloned(),
                version: number("version").unwrap(),
                created: number("created").unwrap(),
                updated: number("updated").unwrap(),
                expires: number("expires"),
                size: number("size").unwrap(),
                pexpiretime,
            },
        );
    }
    let usage: BTreeMap<String, u64> = redis::cmd("HGETALL")
        .arg(format!("{prefix}usage"))
        .query_async(connection)
        .await
        .unwrap();
    let audit_len: u64 = redis::cmd("XLEN")
        .arg(format!("{prefix}audit"))
        .query_async(connection)
        .await
        .unwrap();
    Snapshot {
        items,
        usage,
        audit_len,
    }
}
