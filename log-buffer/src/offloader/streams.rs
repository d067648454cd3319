//! Finding the tenants' streams and reading their entries: new ones, this
//! consumer's own pending ones after a restart, and those another
//! consumer left undelivered.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::{FromRedisValue, Value};
use redis_failover::ErrorKind;

use super::context::{Context, Known};
use super::deliver::{Dead, dead_letter, stored};
use crate::record::{dead_letter_stream, now_ns, streams_pattern, tenant_of_stream};

/// One tenant's gauges, summed over its streams.
#[derive(Default)]
struct Gauges {
    depth: u64,
    oldest: Option<Duration>,
    dead_letters: u64,
}

/// Finds the tenants' streams, creates the group on new ones, and
/// refreshes the depth, age and dead-letter gauges.
pub(super) async fn discover(
    context: &Context,
    known: &mut BTreeMap<String, Known>,
) -> std::result::Result<(), redis_failover::Error> {
    let found = find_streams(context).await?;
    for (stream, tenant) in &found {
        let state = known.entry(stream.clone()).or_insert_with(|| Known {
            tenant: tenant.clone(),
            group_ready: false,
            own_pending_read: false,
            busy: false,
            last_claim: Instant::now(),
        });
        if !state.group_ready {
            create_group(context, stream).await?;
            state.group_ready = true;
        }
    }
    refresh_gauges(context, &found).await
}

/// Every stream of every source, with its tenant: a `SCAN` of every
/// master (each master of a cluster holds the streams of its own slots).
async fn find_streams(
    context: &Context,
) -> std::result::Result<Vec<(String, String)>, redis_failover::Error> {
    let mut found = Vec::new();
    for suffix in &context.sources {
        let mut scan = context
            .client
            .scan_keys(&streams_pattern(suffix))
            .of_type("stream");
        while let Some(keys) = scan.next_batch().await? {
            for key in keys {
                if let Some(tenant) = tenant_of_stream(&key, suffix) {
                    found.push((key, tenant));
                }
            }
        }
    }
    // A slot that moved during the walk may show a stream twice.
    found.sort();
    found.dedup();
    Ok(found)
}

/// The consumer group on `stream`, from its first entry, unless it exists.
async fn create_group(
    context: &Context,
    stream: &str,
) -> std::result::Result<(), redis_failover::Error> {
    let created: std::result::Result<(), _> = context
        .client
        .query_idempotent(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(&context.group)
                .arg("0"),
        )
        .await;
    match created {
        Err(error) if error.kind() == ErrorKind::GroupExists => Ok(()),
        other => other,
    }
}

/// Each tenant's depth, oldest entry's age and dead letters, summed over
/// its streams `found`.
async fn refresh_gauges(
    context: &Context,
    found: &[(String, String)],
) -> std::result::Result<(), redis_failover::Error> {
    let gauges = |streams: &[(String, String)]| {
        let mut gauges = redis::pipe();
        for (stream, _) in streams {
            gauges.cmd("XLEN").arg(stream);
            gauges
                .cmd("XRANGE")
                .arg(stream)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1);
            gauges.cmd("XLEN").arg(dead_letter_stream(stream));
        }
        gauges
    };
    // One pipeline, or on a cluster one per stream (a stream and its
    // dead-letter stream share their tenant's slot).
    let pipelines: Vec<redis::Pipeline> = if context.client.is_cluster() {
        found.chunks(1).map(gauges).collect()
    } else {
        vec![gauges(found)]
    };
    let replies: Vec<Value> = try_join_all(
        pipelines
            .iter()
            .map(|pipeline| context.client.read_pipeline::<Vec<Value>>(pipeline)),
    )
    .await?
    .concat();
    let mut depths: HashMap<&str, Gauges> = HashMap::new();
    for ((_, tenant), replies) in found.iter().zip(replies.chunks(3)) {
        let count = |reply: &Value| u64::from_redis_value(reply.clone()).unwrap_or(0);
        let oldest = StreamRangeReply::from_redis_value(replies[1].clone())
            .ok()
            .and_then(|first| first.ids.into_iter().next())
            .and_then(|entry| entry.id.split('-').next()?.parse::<u64>().ok())
            .map(|ms| Duration::from_millis((now_ns() / 1_000_000).saturating_sub(ms)));
        let gauges = depths.entry(tenant).or_default();
        gauges.depth += count(&replies[0]);
        gauges.oldest = gauges.oldest.max(oldest);
        gauges.dead_letters += count(&replies[2]);
    }
    for (tenant, gauges) in depths {
        context.tenant_metrics(tenant, |m| {
            m.depth = gauges.depth;
            m.oldest_age = gauges.oldest;
            m.dead_letter_depth = gauges.dead_letters;
        });
    }
    Ok(())
}

/// Reads the next entries of every stream no task owns: this consumer's
/// own pending entries first, entries idle too long under another
/// consumer from time to time, new ones otherwise.
pub(super) async fn read(
    context: &Context,
    known: &mut BTreeMap<String, Known>,
) -> std::result::Result<Vec<(String, Vec<StreamId>)>, redis_failover::Error> {
    let mut batches = Vec::new();
    let mut fresh = Vec::new();
    for (stream, state) in known.iter_mut().filter(|(_, s)| !s.busy) {
        if !state.own_pending_read {
            let mut command = read_group(context, std::slice::from_ref(stream));
            command.arg("0");
            let reply: Option<StreamReadReply> = context.client.query(&command).await?;
            let entries = entries_of(reply);
            if entries.is_empty() {
                state.own_pending_read = true;
            } else {
                batches.push((stream.clone(), entries));
            }
        } else if state.last_claim.elapsed() >= context.claim_idle / 2 {
            state.last_claim = Instant::now();
            let claimed = claim(context, stream, &state.tenant).await?;
            if claimed.is_empty() {
                fresh.push(stream.clone());
            } else {
                batches.push((stream.clone(), claimed));
            }
        } else {
            fresh.push(stream.clone());
        }
    }
    for reply in read_new(context, &fresh).await? {
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            if !key.ids.is_empty() {
                batches.push((key.key, key.ids));
            }
        }
    }
    Ok(batches)
}

/// New entries of `streams` (in order, so a tenant's streams are next to
/// each other): one `XREADGROUP`, or on a cluster one per tenant, whose
/// streams share a slot, all at once.
async fn read_new(
    context: &Context,
    streams: &[String],
) -> std::result::Result<Vec<Option<StreamReadReply>>, redis_failover::Error> {
    let groups: Vec<&[String]> = if context.client.is_cluster() {
        streams
            .chunk_by(|a, b| hash_tag(a) == hash_tag(b))
            .collect()
    } else if streams.is_empty() {
        Vec::new()
    } else {
        vec![streams]
    };
    let commands: Vec<redis::Cmd> = groups
        .into_iter()
        .map(|streams| {
            let mut command = read_group(context, streams);
            for _ in streams {
                command.arg(">");
            }
            command
        })
        .collect();
    // Not idempotent: a lost reply leaves entries pending under this
    // consumer, read again after a restart or claimed by another.
    try_join_all(commands.iter().map(|command| context.client.query(command))).await
}

/// A key's Redis Cluster hash tag (`{...}`): a stream's tenant.
fn hash_tag(key: &str) -> Option<&str> {
    key.split_once('{')?.1.split_once('}').map(|(tag, _)| tag)
}

/// `XREADGROUP` of this consumer over `streams`, a batch each, for the
/// caller to add one id per stream.
fn read_group(context: &Context, streams: &[String]) -> redis::Cmd {
    let mut command = redis::cmd("XREADGROUP");
    command
        .arg("GROUP")
        .arg(&context.group)
        .arg(&context.consumer)
        .arg("COUNT")
        .arg(context.batch_size)
        .arg("STREAMS")
        .arg(streams);
    command
}

fn entries_of(reply: Option<StreamReadReply>) -> Vec<StreamId> {
    reply
        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
        .unwrap_or_default()
}

/// Claims entries another consumer left undelivered for `claim_idle`, and
/// dead-letters those delivered too often (poison).
async fn claim(
    context: &Context,
    stream: &str,
    tenant: &str,
) -> std::result::Result<Vec<StreamId>, redis_failover::Error> {
    let idle_ms = u64::try_from(context.claim_idle.as_millis()).unwrap_or(u64::MAX);
    let reply: StreamAutoClaimReply = context
        .client
        .query(
            redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(&context.group)
                .arg(&context.consumer)
                .arg(idle_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(context.batch_size),
        )
        .await?;
    let claimed = reply.claimed;
    let (Some(first), Some(last)) = (claimed.first(), claimed.last()) else {
        return Ok(claimed);
    };
    // [id, consumer, idle ms, deliveries] for each claimed entry.
    let pending: Vec<(String, String, u64, u64)> = context
        .client
        .query_idempotent(
            redis::cmd("XPENDING")
                .arg(stream)
                .arg(&context.group)
                .arg(&first.id)
                .arg(&last.id)
                .arg(claimed.len())
                .arg(&context.consumer),
        )
        .await?;
    let deliveries: HashMap<String, u64> = pending
        .into_iter()
        .map(|(id, _, _, count)| (id, count))
        .collect();
    tracing::info!(
        target: "log_buffer",
        stream,
        entries = claimed.len(),
        "offloader: claimed entries another consumer left undelivered"
    );
    let (poison, claimed): (Vec<_>, Vec<_>) = claimed.into_iter().partition(|entry| {
        deliveries.get(&entry.id).copied().unwrap_or(0) > context.max_deliveries
    });
    if !poison.is_empty() {
        let ids: Vec<String> = poison.iter().map(|entry| entry.id.clone()).collect();
        let dead = poison
            .iter()
            .map(|entry| Dead {
                id: entry.id.clone(),
                fields: stored(entry),
                reason: "poison",
                detail: "delivered too many times".to_owned(),
            })
            .collect();
        dead_letter(context, stream, tenant, dead, &ids).await;
    }
    Ok(claimed)
}
