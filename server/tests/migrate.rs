//! `server migrate` on a live storage layout 1 dataset (10,000 items of 20
//! tenants): nothing of this version serves layout 1 before; servers of
//! this version read and write meanwhile; the migration is killed with
//! SIGKILL half-way and run again; in the end every item keeps its value,
//! metadata, version, times and TTL (or holds what was written since),
//! and the counters, audit streams, users, quotas and log streams follow.

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;
use serde_json::{Value, json};
use tenant_kv::{Actor, Error, Item, Precondition, Quota, TenantId, TenantKv};
use tokio::sync::mpsc;

mod layout1;

use layout1::{ITEMS, Original, Snapshot, TENANTS, key, tenant};

const BINARY: &str = env!("CARGO_BIN_EXE_server");
const DEADLINE: Duration = Duration::from_secs(120);
/// Writers touch the keys `k<i>` with `i % 10` below this; readers check
/// the others, which must read exactly as layout 1 stored them.
const WRITERS: usize = 4;

/// SIGKILLs the process if the test fails while it runs.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `server migrate` with small batches, its stdout's lines sent to a channel.
fn migrate(env: &[(&str, &str)]) -> (KillOnDrop, mpsc::UnboundedReceiver<String>) {
    let mut child = Command::new(BINARY)
        .args(["migrate", "--batch-size", "50", "--pause-ms", "2"])
        .env_remove("SERVER_CONFIG")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (KillOnDrop(child), received)
}

async fn next_line(lines: &mut mpsc::UnboundedReceiver<String>) -> Option<String> {
    tokio::time::timeout(DEADLINE, lines.recv())
        .await
        .expect("the migration went silent")
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BINARY)
        .args(args)
        .env_remove("SERVER_CONFIG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Nothing of this version serves layout 1: the store, the admin
/// commands and `serve` refuse, naming the migration.
async fn everything_refuses_layout_1(env: &[(&str, &str)], store: &TenantKv) {
    let t00 = store.tenant(TenantId::new("t00").unwrap(), Actor::system());
    match t00.get(&key(1)).await {
        Err(Error::UnsupportedLayout { found }) => assert_eq!(found, "1"),
        other => panic!("layout 1 served: {other:?}"),
    }
    let mut serve_env = env.to_vec();
    serve_env.extend([
        ("SERVER_JWT_SECRET", "a secret of at least thirty-two bytes"),
        ("SERVER_LISTEN", "127.0.0.1:0"),
    ]);
    for args in [&["serve"][..], &["user", "list", "--tenant", "t00"]] {
        let output = run(args, &serve_env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("server migrate"), "{args:?}: {stderr}");
    }
}

/// What writers had acknowledged: each key's last state (`None`: deleted).
type Acked = HashMap<(String, String), Option<(u64, Value)>>;
/// How many writes each tenant acknowledged.
type Writes = HashMap<String, u64>;

/// Puts, deletes and creates of writer `w` until `stop`, one tenant after
/// the other; returns what was acknowledged.
async fn writer(store: TenantKv, w: usize, stop: Arc<AtomicBool>) -> (Acked, Writes) {
    let (mut acked, mut writes) = (Acked::new(), Writes::new());
    let mut step = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let name = tenant(step % TENANTS);
        let view = store.tenant(TenantId::new(name.as_str()).unwrap(), Actor::user("writer"));
        let j = (step / TENANTS) % (ITEMS / 10);
        let k = key(w + 10 * j);
        let value = json!({"writer": w, "step": step});
        let first_visit = step < TENANTS * (ITEMS / 10);
        let outcome = if j.is_multiple_of(10) && first_visit {
            view.delete(&k, None).await.map(|_| None)
        } else {
            let item = tenant_kv::NewItem::new(value.clone());
            let put = view.put(&k, item, Precondition::None).await;
            put.map(|item| Some((item.version, value.clone())))
        };
        match outcome {
            Ok(state) => {
                acked.insert((name.clone(), k), state);
                *writes.entry(name.clone()).or_default() += 1;
            }
            Err(Error::NotFound { .. }) => {}
            Err(error) => panic!("writer {w}, {name}/{k}: {error}"),
        }
        if step.is_multiple_of(10) {
            let new = format!("new/{w}/{step}");
            let item = tenant_kv::NewItem::new(value.clone());
            let created = view.create(&new, item).await.unwrap();
            *writes.entry(name.clone()).or_default() += 1;
            acked.insert((name, new), Some((created.version, value)));
        }
        step += 1;
    }
    (acked, writes)
}

/// Whether `item` is `original`, to the millisecond.
fn same(item: &Item, original: &Original) -> Result<(), String> {
    let ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
    };
    let value: Value = serde_json::from_str(&original.value).unwrap();
    let metadata = original
        .metadata
        .as_deref()
        .map(|m| serde_json::from_str::<serde_json::Map<String, Value>>(m).unwrap());
    let found = (
        &item.value,
        &item.metadata,
        item.version,
        ms(item.created_at),
        ms(item.updated_at),
        item.expires_at.map(ms),
    );
    let expected = (
        &value,
        &metadata,
        original.version,
        original.created,
        original.updated,
        original.expires,
    );
    if found == expected {
        Ok(())
    } else {
        Err(format!("{}: {found:?}, not {expected:?}", item.key))
    }
}

/// Reads of the keys writers leave alone until `stop`: each must be
/// exactly as layout 1 stored it, and listed; returns the reads done.
async fn reader(
    store: TenantKv,
    r: usize,
    before: Arc<BTreeMap<String, Snapshot>>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut reads = 0u64;
    let mut step = r;
    while !stop.load(Ordering::Relaxed) {
        let name = tenant(step % TENANTS);
        let view = store.tenant(TenantId::new(name.as_str()).unwrap(), Actor::user("reader"));
        let items = &before[&name].items;
        let i = WRITERS + (step * 7) % (ITEMS - WRITERS);
        if i % 10 >= WRITERS {
            let item = view.get(&key(i)).await.unwrap();
            same(&item, &items[&key(i)]).unwrap();
            reads += 1;
        }
        if step.is_multiple_of(25) {
            let keys: Vec<String> = (WRITERS..10).map(|d| key(10 * (step % 50) + d)).collect();
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            for (k, item) in keys.iter().zip(view.get_many(&refs).await.unwrap()) {
                same(&item.unwrap(), &items[k]).unwrap();
            }
            let listed = view.list("k", ITEMS + 1, None).await.unwrap().keys;
            let untouched = items
                .keys()
                .filter(|k| k[1..].parse::<usize>().unwrap() % 10 >= WRITERS);
            for k in untouched {
                assert!(listed.contains(k), "{name}: {k} not listed");
            }
            reads += 2;
        }
        step += 2;
    }
    reads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_dataset_migrates_under_reads_and_writes_and_through_a_kill() {
    let topology = Topology::builder()
        .replicas(0)
        .sentinels(0)
        .start()
        .await
        .unwrap();
    let master = topology.initial_master();
    let addr = topology.addr(master).to_string();
    let env = [("SERVER_REDIS_NODES", addr.as_str())];
    let mut raw = redis::Client::open(topology.connection_info(master))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    layout1::build(&mut raw).await;
    let mut before = BTreeMap::new();
    for n in 0..TENANTS {
        before.insert(tenant(n), layout1::snapshot(&mut raw, &tenant(n)).await);
    }
    let before = Arc::new(before);
    let items: usize = before.values().map(|s| s.items.len()).sum();
    assert_eq!(items, TENANTS * ITEMS);
    let client = FailoverClient::candidates([NodeAddr::from(topology.addr(master))])
        .build()
        .unwrap();
    let store = TenantKv::builder(client).build().unwrap();
    everything_refuses_layout_1(&env, &store).await;

    // The migration; servers of this version start once it says so.
    let started = Instant::now();
    let (mut first, mut lines) = migrate(&env);
    while !next_line(&mut lines).await.unwrap().starts_with("prepared") {}
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = store.watch_expirations();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(store.clone(), w, Arc::clone(&stop))))
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|r| {
            tokio::spawn(reader(
                store.clone(),
                r,
                Arc::clone(&before),
                Arc::clone(&stop),
            ))
        })
        .collect();

    // Killed once 3,000 items are converted, then run again to the end.
    let mut converted: BTreeMap<String, u64> = BTreeMap::new();
    while converted.values().sum::<u64>() < 3_000 {
        let line = next_line(&mut lines)
            .await
            .expect("the migration ended before the kill");
        if let Some((name, rest)) = line.split_once(": ")
            && let Some(count) = rest
                .strip_suffix(" walked")
                .and_then(|r| r.split(' ').next())
        {
            converted.insert(name.to_owned(), count.parse().unwrap());
        }
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let killed_at = converted.values().sum::<u64>();
    let marker: String = redis::cmd("GET")
        .arg("tenant-kv:layout")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(marker, "migrating");
    let resumed = Instant::now();
    let (mut second, mut lines) = migrate(&env);
    let mut last = String::new();
    while let Some(line) = next_line(&mut lines).await {
        last = line;
    }
    assert!(second.0.wait().unwrap().success(), "{last}");
    assert!(last.starts_with("done:"), "{last}");
    let (total, resumed) = (started.elapsed(), resumed.elapsed());
    stop.store(true, Ordering::Relaxed);
    let (mut acked, mut writes) = (Acked::new(), Writes::new());
    for writer in writers {
        let (theirs, counts) = writer.await.unwrap();
        acked.extend(theirs);
        for (name, count) in counts {
            *writes.entry(name).or_default() += count;
        }
    }
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.unwrap();
    }
    watcher.shutdown().await;
    eprintln!(
        "migrated {items} items of {TENANTS} tenants in {total:?}: killed after {killed_at} were converted, \
         the second run took {resumed:?}; meanwhile {} writes and {reads} reads; last line: {last}",
        writes.values().sum::<u64>()
    );
    check_layout_2(&mut raw).await;
    for n in 0..TENANTS {
        let name = tenant(n);
        let written = writes.get(&name).copied().unwrap_or(0);
        check_tenant(&store, &mut raw, &name, &before[&name], &acked, written).await;
    }
}

/// Redis holds layout 2 only: the marker says so, no migration state is
/// left, and of layout 1 only the fences at `expiry` remain.
async fn check_layout_2(raw: &mut MultiplexedConnection) {
    let marker: String = redis::cmd("GET")
        .arg("tenant-kv:layout")
        .query_async(raw)
        .await
        .unwrap();
    assert_eq!(marker, "2");
    let pending: u64 = redis::cmd("EXISTS")
        .arg("tenant-kv:migration:pending")
        .query_async(raw)
        .await
        .unwrap();
    assert_eq!(pending, 0);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tenant:[^{]*")
        .query_async(raw)
        .await
        .unwrap();
    for key in &keys {
        let kind: String = redis::cmd("TYPE").arg(key).query_async(raw).await.unwrap();
        assert!(
            key.ends_with(":expiry") && kind == "string",
            "{key} ({kind}) left"
        );
    }
    assert_eq!(keys.len(), TENANTS);
    let progress: Vec<String> = redis::cmd("KEYS")
        .arg("tenant:{*}:migration")
        .query_async(raw)
        .await
        .unwrap();
    assert!(progress.is_empty(), "{progress:?}");
}

/// One tenant after the migration: every item as layout 1 stored it (TTL
/// to the ms) or as last written since, the counters true to them, one
/// audit record per write, the expired item purged once, and its users,
/// quotas and log stream (with its consumer group) kept.
async fn check_tenant(
    store: &TenantKv,
    raw: &mut MultiplexedConnection,
    name: &str,
    before: &Snapshot,
    acked: &Acked,
    written: u64,
) {
    let id = TenantId::new(name).unwrap();
    let view = store.tenant(id.clone(), Actor::system());
    view.purge_expired().await.unwrap();
    let (mut keys, mut bytes, mut top) = (0u64, 0u64, 0u64);
    for (k, original) in &before.items {
        let found = view.get(k).await;
        match acked.get(&(name.to_owned(), k.clone())) {
            None => {
                same(&found.unwrap(), original).unwrap();
                let redis_key = format!("tenant:{{{name}}}:data:{k}");
                let expiry: i64 = redis::cmd("PEXPIRETIME")
                    .arg(&redis_key)
                    .query_async(raw)
                    .await
                    .unwrap();
                assert_eq!(expiry, original.pexpiretime, "{name}/{k}: the TTL moved");
                (keys, bytes) = (keys + 1, bytes + original.size);
                top = top.max(original.version);
            }
            Some(None) => assert!(matches!(found, Err(Error::NotFound { .. })), "{name}/{k}"),
            Some(Some(_)) => {}
        }
    }
    let mine = acked.iter().filter(|((t, _), _)| t == name);
    for ((_, k), state) in mine {
        let Some((version, value)) = state else {
            continue;
        };
        let item = view.get(k).await.unwrap();
        assert_eq!((item.version, &item.value), (*version, value), "{name}/{k}");
        assert_eq!((item.metadata, item.expires_at), (None, None), "{name}/{k}");
        (keys, bytes) = (keys + 1, bytes + (k.len() + value.to_string().len()) as u64);
        top = top.max(*version);
    }
    let usage = view.usage().await.unwrap();
    assert_eq!((usage.keys, usage.bytes), (keys, bytes), "{name}: counters");
    let listed = view.list("", 2 * ITEMS, None).await.unwrap().keys;
    assert_eq!(listed.len() as u64, keys, "{name}: listing");
    let audit = format!("tenant:{{{name}}}:audit");
    let records: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(&audit)
        .arg("-")
        .arg("+")
        .query_async(raw)
        .await
        .unwrap();
    // One record per acknowledged write, and the expired item's.
    assert_eq!(
        records.len() as u64,
        before.audit_len + written + 1,
        "{name}: audit records"
    );
    let records: Vec<_> = records
        .into_iter()
        .flat_map(|(_, fields)| tenant_kv::audit_records(fields).unwrap())
        .collect();
    let expired: Vec<_> = records
        .iter()
        .filter(|r| r["action"] == "key_expiration")
        .map(|r| r["key"].as_str())
        .collect();
    assert_eq!(expired, ["short"], "{name}");
    // The version counter went on from where layout 1 left it.
    let rev = before.usage["rev"];
    let after = view
        .put(
            "k0001",
            tenant_kv::NewItem::new(json!(0)),
            Precondition::None,
        )
        .await
        .unwrap();
    assert!(
        after.version > rev.max(top),
        "{name}: version {} reused",
        after.version
    );
    let users = store.users().list(&id).await.unwrap();
    assert_eq!(users.len(), 1, "{name}");
    assert_eq!(users[0].username, format!("user-{name}"));
    let overrides = store.quota_overrides(&id).await.unwrap();
    assert_eq!(
        overrides.get(&Quota::MaxKeys),
        Some(&Some(100_000)),
        "{name}"
    );
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(format!("tenant:{{{name}}}:logs"))
        .query_async(raw)
        .await
        .unwrap();
    assert_eq!(groups.len(), 1, "{name}: the log stream's consumer group");
}
