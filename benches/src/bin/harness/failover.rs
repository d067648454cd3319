//! `harness failover`: kill -9 the master again and again under 8 writers,
//! and time the promotion (from the survivors' `ROLE`) and the client's
//! first acknowledged write after it.

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::{NodeId, Topology};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// How many writers keep writing through the failovers.
const WRITERS: u64 = 8;
/// The longest any step of a round may take.
const STEP_LIMIT: Duration = Duration::from_secs(30);

pub(crate) async fn failover(failovers: usize) -> Result<Value> {
    println!("failover: starting a master, 2 replicas and 3 sentinels");
    // Sentinel starts no new failover of a master within twice the failover
    // timeout of the last one: keep it short, and space the kills by it.
    let failover_timeout = Duration::from_secs(2);
    let spacing = failover_timeout * 2 + Duration::from_secs(1);
    let topology = Topology::builder()
        .failover_timeout(failover_timeout)
        .start()
        .await?;
    let sentinels = topology.sentinel_addrs().into_iter().map(NodeAddr::from);
    let client = FailoverClient::sentinel(topology.master_name(), sentinels).build()?;
    client.wait_for_master(Duration::from_secs(10)).await?;
    let mut notices = notices(&topology).await?;
    let writers = Writers::start(&client);

    let mut rows = Vec::new();
    let (mut promotions, mut delays, mut own_delays) = (Vec::new(), Vec::new(), Vec::new());
    let mut master = topology.initial_master();
    let mut last_kill: Option<Instant> = None;
    for round in 1..=failovers {
        let earliest = last_kill.map_or_else(Instant::now, |at| at + spacing);
        let earliest = earliest.max(Instant::now() + Duration::from_millis(500));
        tokio::time::sleep_until(earliest.into()).await;
        last_kill = Some(Instant::now());
        let (new, timing) = one_failover(&topology, master, &writers, &mut notices).await?;
        println!(
            "failover {round}/{failovers}: promoted {:.2} s after the kill, +switch-master {:+.1} ms from it, first write {:+.1} ms from the promotion ({:+.1} ms from the notice), {} errors",
            timing.promotion_ms / 1e3,
            timing.notice_after_promotion_ms,
            timing.client_delay_ms,
            timing.client_delay_from_notice_ms,
            timing.errors,
        );
        promotions.push(timing.promotion_ms);
        delays.push(timing.client_delay_ms);
        own_delays.push(timing.client_delay_from_notice_ms);
        rows.push(timing.json(round));
        // The old master comes back as a replica of the new one, as a pod
        // whose init asks Sentinel for the master does.
        topology.restart(master).await?;
        topology.replicate(master, new, STEP_LIMIT).await?;
        master = new;
    }
    let total_errors = writers.stop();
    println!("failover: {failovers} kill -9 failovers under {WRITERS} writers");
    let promotion = summary("kill -> promotion (ROLE)", &mut promotions);
    let switch_delay = summary("promotion -> first write", &mut delays);
    // Sentinel names the new master only when it ends the failover (the
    // `+switch-master` notice): from then on, the delay is the client's.
    let client_delay = summary("+switch-master -> first write", &mut own_delays);
    println!(
        "  errors seen by callers: {total_errors} (target 0); target p99 client delay (from the notice) <= 50 ms"
    );
    Ok(
        json!({ "scenario": "failover", "failovers": rows, "promotion": promotion,
                "delay_from_promotion": switch_delay, "client_delay": client_delay,
                "errors": total_errors }),
    )
}

/// When any sentinel published `+switch-master`: the leader publishes
/// first, when it ends the failover, the others once they hear of it.
async fn notices(topology: &Topology) -> Result<mpsc::UnboundedReceiver<Instant>> {
    let (notice_tx, notices) = mpsc::unbounded_channel::<Instant>();
    for sentinel in topology.sentinels() {
        let client = redis::Client::open(topology.connection_info(sentinel))?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe("+switch-master").await?;
        let notice_tx = notice_tx.clone();
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while messages.next().await.is_some() {
                if notice_tx.send(Instant::now()).is_err() {
                    break;
                }
            }
        });
    }
    Ok(notices)
}

/// The writers, and what they saw: each success whose request started
/// after the kill (so it can only have reached the new master) may be the
/// first one.
struct Writers {
    origin: Instant,
    /// When the master was killed (ns since `origin`), `u64::MAX` when disarmed.
    killed_at: Arc<AtomicU64>,
    /// The first write acknowledged after the kill (ns since `origin`), or 0.
    first_write: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Writers {
    fn start(client: &FailoverClient) -> Self {
        let mut writers = Self {
            origin: Instant::now(),
            killed_at: Arc::new(AtomicU64::new(u64::MAX)),
            first_write: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
            tasks: Vec::new(),
        };
        for task in 0..WRITERS {
            let connection = client.idempotent_connection();
            let (origin, killed_at, first_write, errors) = (
                writers.origin,
                Arc::clone(&writers.killed_at),
                Arc::clone(&writers.first_write),
                Arc::clone(&writers.errors),
            );
            writers.tasks.push(tokio::spawn(async move {
                let mut connection = connection;
                for i in 0u64.. {
                    let started = nanos(origin);
                    let written: redis::RedisResult<()> = redis::cmd("SET")
                        .arg(format!("failover:{task}"))
                        .arg(i)
                        .query_async(&mut connection)
                        .await;
                    match written {
                        Ok(()) if started > killed_at.load(Ordering::Acquire) => {
                            let at = nanos(origin);
                            let _ = first_write.compare_exchange(
                                0,
                                at,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                        }
                        Ok(()) => {}
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        writers
    }

    /// Disarms, then resets: no write is measured against the previous kill.
    fn disarm(&self) {
        self.killed_at.store(u64::MAX, Ordering::Release);
        self.first_write.store(0, Ordering::Release);
    }

    fn arm(&self) {
        self.killed_at.store(nanos(self.origin), Ordering::Release);
    }

    /// When the first write after the kill was acknowledged.
    async fn first_write(&self) -> Result<Instant> {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            let at = self.first_write.load(Ordering::Acquire);
            if at != 0 {
                return Ok(self.origin + Duration::from_nanos(at));
            }
            if Instant::now() > deadline {
                return Err("no write succeeded within 30 s of the promotion".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Stops the writers; the errors they saw in all.
    fn stop(self) -> u64 {
        for task in &self.tasks {
            task.abort();
        }
        self.errors()
    }
}

/// One round's figures.
struct Timing {
    promotion_ms: f64,
    notice_after_promotion_ms: f64,
    /// From the promotion, never negative: only a master acknowledges.
    client_delay_ms: f64,
    /// From the first notice: negative when the leader announced the
    /// switch after the client had found the new master.
    client_delay_from_notice_ms: f64,
    errors: u64,
}

impl Timing {
    fn json(&self, round: usize) -> Value {
        json!({
            "failover": round,
            "promotion_ms": self.promotion_ms,
            "notice_after_promotion_ms": self.notice_after_promotion_ms,
            "client_delay_ms": self.client_delay_ms,
            "client_delay_from_notice_ms": self.client_delay_from_notice_ms,
            "errors": self.errors,
        })
    }
}

/// Kills `master` and waits for the promotion, the notice and the first
/// write after it; the new master and the round's figures.
async fn one_failover(
    topology: &Topology,
    master: NodeId,
    writers: &Writers,
    notices: &mut mpsc::UnboundedReceiver<Instant>,
) -> Result<(NodeId, Timing)> {
    // Notices left over from the previous switch must not count for this one.
    while notices.try_recv().is_ok() {}
    let errors_before = writers.errors();
    writers.disarm();
    let kill = Instant::now();
    topology.kill(master)?;
    writers.arm();
    // The promotion itself: the first survivor whose ROLE says master. No
    // write can be acknowledged before it; the notices may come later.
    let (new, promoted) = promotion(topology, master).await?;
    let noticed = match tokio::time::timeout(STEP_LIMIT, notices.recv()).await {
        Ok(Some(at)) => at,
        Ok(None) => return Err("every sentinel connection closed".into()),
        Err(_) => return Err("no +switch-master within 30 s of the kill".into()),
    };
    let named = topology.wait_for_new_master(master, STEP_LIMIT).await?;
    if named != new {
        return Err(format!("{new} was promoted, but the sentinels name {named}").into());
    }
    let first = writers.first_write().await?;
    let timing = Timing {
        promotion_ms: signed_ms(kill, promoted),
        notice_after_promotion_ms: signed_ms(promoted, noticed),
        client_delay_ms: signed_ms(promoted, first),
        client_delay_from_notice_ms: signed_ms(noticed, first),
        errors: writers.errors() - errors_before,
    };
    Ok((new, timing))
}

/// Polls the surviving data nodes' `ROLE` (every millisecond, each on a
/// connection of its own) until one says master: that node, and when it
/// became master. Sentinel promotes a replica in one `MULTI` that also
/// runs `CLIENT KILL TYPE normal`, so a poller's connection dropped then
/// marks the promotion; the poller connects again to see the new role.
async fn promotion(topology: &Topology, old: NodeId) -> Result<(NodeId, Instant)> {
    let mut survivors = Vec::new();
    for node in topology
        .data_nodes()
        .into_iter()
        .filter(|node| *node != old)
    {
        survivors.push((node, topology.connection(node).await?, None));
    }
    let deadline = Instant::now() + STEP_LIMIT;
    while Instant::now() < deadline {
        for (node, connection, dropped) in &mut survivors {
            match redis::cmd("ROLE").query_async(connection).await {
                Ok(redis_topology::Role::Primary { .. }) => {
                    let seen = Instant::now();
                    return Ok((*node, dropped.unwrap_or(seen)));
                }
                Ok(_) => {}
                Err(_) => {
                    dropped.get_or_insert_with(Instant::now);
                    if let Ok(again) = topology.connection(*node).await {
                        *connection = again;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Err("no replica was promoted within 30 s of the kill".into())
}

/// Milliseconds from `from` to `to`, negative if `to` came first.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        (to - from).as_secs_f64() * 1e3
    } else {
        -((from - to).as_secs_f64() * 1e3)
    }
}

/// Prints and returns p50, p99 and max of `values`.
fn summary(name: &str, values: &mut [f64]) -> Value {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    println!(
        "  {name:<34} p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    json!({ "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0) })
}

/// Nanoseconds since `origin`, for timestamps shared through atomics.
fn nanos(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
