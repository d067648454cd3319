//! Finding the tenants' streams and reading their entries: new ones, the
//! ranges this consumer had in flight before a restart, and those another
//! consumer left undelivered (see `ranges.lua`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::future::{join_all, try_join_all};
use redis::streams::StreamRangeReply;
use redis::{FromRedisValue, Value};
use redis_failover::ErrorKind;

use super::context::{Context, Known, Read, Round, lock};
use super::deliver::{Acknowledge, dead_letter, stored};
use super::reply::NewEntries;
use super::sort::Dead;
use crate::record::{dead_letter_stream, now_ns, staging_list, streams_pattern, tenant_of_stream};

/// One tenant's gauges, summed over its streams.
#[derive(Default)]
struct Gauges {
    depth: u64,
    oldest: Option<Duration>,
    dead_letters: u64,
}

/// Finds the tenants' streams, creates the group on new ones, and
/// refreshes the depth, age and dead-letter gauges. A failure is noted in
/// `round`; the streams already known are read all the same, and if the
/// walk failed (a master down), those that lost their group get it again.
pub(super) async fn discover(
    context: &Context,
    known: &mut BTreeMap<String, Known>,
    round: &mut Round,
) {
    let found = match find_streams(context).await {
        Ok(found) => found,
        Err(error) => {
            round.failed(error);
            for (stream, state) in known.iter_mut().filter(|(_, s)| !s.group_ready) {
                match create_group(context, stream).await {
                    Ok(()) => state.group_ready = true,
                    Err(error) => round.failed(error),
                }
            }
            return;
        }
    };
    // A stream gone (a tenant deleted, or the key now of another type)
    // is forgotten once no task owns it, rather than known for ever.
    known.retain(|stream, state| {
        state.busy
            || found
                .binary_search_by(|(s, _)| s.as_str().cmp(stream))
                .is_ok()
    });
    for (stream, tenant) in &found {
        let state = known
            .entry(stream.clone())
            .or_insert_with(|| Known::new(tenant.clone()));
        if !state.group_ready {
            match create_group(context, stream).await {
                Ok(()) => state.group_ready = true,
                Err(error) => round.failed(error),
            }
        }
    }
    if let Err(error) = refresh_gauges(context, &found).await {
        round.failed(error);
    }
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
        // Over `maxmemory`, Redis refuses the command before it sees the
        // group exists. Reading goes on where it does (and frees memory);
        // where it does not, reading fails with `NOGROUP` and the group is
        // created again later.
        Err(error) if error.kind() == ErrorKind::OutOfMemory => Ok(()),
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
    // A tenant whose streams are gone has nothing left to ship.
    let tenants: HashSet<&str> = found.iter().map(|(_, tenant)| tenant.as_str()).collect();
    for (tenant, metrics) in lock(&context.metrics).iter_mut() {
        if !tenants.contains(tenant.as_str()) {
            metrics.depth = 0;
            metrics.oldest_age = None;
            metrics.dead_letter_depth = 0;
        }
    }
    Ok(())
}

/// Reads the next entries of every stream no task owns, whose group
/// exists and that is not resting (see `Known::took`): the ranges this
/// consumer had in flight before a restart first, ranges in flight too
/// long under another consumer from time to time, new ones otherwise.
/// Streams are claimed concurrently (at most
/// [`CONCURRENT_CLAIMS`] at once), then read concurrently, so a slow one
/// (its shard down) holds up each of the two steps of a round once, not
/// once per stream. A stream whose claim or read fails waits out a
/// backoff of its own (see [`Known::failed`]); so do the streams read in
/// the same transaction as it (all of one batch size, without a
/// cluster), until their next claim, which is theirs alone.
pub(super) async fn read(
    context: &Context,
    known: &mut BTreeMap<String, Known>,
    round: &mut Round,
) {
    let now = Instant::now();
    let mut claims = Vec::new();
    // New entries are read by batch size: one `COUNT` per read.
    let mut fresh: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (stream, state) in known.iter_mut().filter(|(_, s)| s.readable(now)) {
        if !state.own_claimed {
            claims.push((stream.clone(), state.tenant.clone(), Claim::Own));
        } else if state.last_claim.elapsed() >= context.claim_idle / 2 {
            state.last_claim = Instant::now();
            claims.push((stream.clone(), state.tenant.clone(), Claim::Idle));
        } else {
            let count = context.batch_for(stream);
            fresh.entry(count).or_default().push(stream.clone());
        }
    }
    let claiming: Vec<_> = claims
        .iter()
        .map(|(stream, tenant, mode)| claim(context, stream, tenant, *mode))
        .collect();
    let claimed: Vec<_> = futures_util::stream::iter(claiming)
        .buffered(CONCURRENT_CLAIMS)
        .collect()
        .await;
    for ((stream, _, mode), claimed) in claims.into_iter().zip(claimed) {
        let Some(state) = known.get_mut(&stream) else {
            continue;
        };
        match claimed {
            Ok(Some(read)) => {
                state.answered();
                round.reads.push(read);
            }
            Ok(None) => {
                state.answered();
                match mode {
                    Claim::Own => state.own_claimed = true,
                    Claim::Idle => {
                        let count = context.batch_for(&stream);
                        fresh.entry(count).or_default().push(stream);
                    }
                }
            }
            Err(error) => {
                state.failed(&error, &context.backoff);
                round.failed(error);
            }
        }
    }
    for streams in fresh.values_mut() {
        // In name order, so a tenant's streams are next to each other.
        streams.sort_unstable();
    }
    let reads = join_all(
        fresh
            .iter()
            .map(|(count, streams)| read_new(context, streams, *count)),
    )
    .await;
    for (streams, replies) in reads.into_iter().flatten() {
        took(context, known, round, streams, replies);
    }
}

/// Notes what a read of new entries of `streams` answered: each stream
/// answered or failed, and the entries read, one range per stream.
fn took(
    context: &Context,
    known: &mut BTreeMap<String, Known>,
    round: &mut Round,
    streams: &[String],
    replies: std::result::Result<Option<NewEntries>, redis_failover::Error>,
) {
    let now = Instant::now();
    let taken: HashMap<&str, usize> = match &replies {
        Ok(Some(reply)) => reply
            .0
            .iter()
            .map(|key| (key.key.as_str(), key.ids.len()))
            .collect(),
        _ => HashMap::new(),
    };
    for stream in streams {
        if let Some(state) = known.get_mut(stream) {
            match &replies {
                Ok(_) => {
                    state.answered();
                    let entries = taken.get(stream.as_str()).copied().unwrap_or(0);
                    state.took(entries, context.poll_interval, now);
                }
                Err(error) => state.failed(error, &context.backoff),
            }
        }
    }
    let reply = match replies {
        Ok(reply) => reply,
        Err(error) => return round.failed(error),
    };
    for key in reply.map(|r| r.0).unwrap_or_default() {
        if let (Some(first), Some(last)) = (key.ids.first(), key.ids.last()) {
            round.reads.push(Read {
                range: first.id.clone(),
                last: last.id.clone(),
                stream: key.key,
                entries: key.ids,
            });
        }
    }
}

/// The most claims in flight at once: after a restart every stream claims
/// its own ranges, and a claim cut off by a timeout after Redis counted
/// its delivery counts one towards poison.
const CONCURRENT_CLAIMS: usize = 32;

/// The most streams one read names: a bound on the transaction's size.
const MAX_STREAMS_PER_READ: usize = 500;

/// New entries of `streams` (in order, so a tenant's streams are next to
/// each other), each stream's recorded as a range in flight: one
/// transaction per [`MAX_STREAMS_PER_READ`] streams, or on a cluster one
/// per tenant, whose streams share a slot, all at once.
async fn read_new<'a>(
    context: &Context,
    streams: &'a [String],
    count: usize,
) -> Vec<(
    &'a [String],
    std::result::Result<Option<NewEntries>, redis_failover::Error>,
)> {
    let groups: Vec<&[String]> = if context.client.is_cluster() {
        streams
            .chunk_by(|a, b| hash_tag(a) == hash_tag(b))
            .collect()
    } else {
        streams.chunks(MAX_STREAMS_PER_READ).collect()
    };
    join_all(
        groups
            .into_iter()
            .map(|streams| async move { (streams, read_some(context, streams, count).await) }),
    )
    .await
}

/// New entries of `streams`, which share a slot, each stream's as a range
/// in flight: by [`read_transaction`], or over `maxmemory`, where Redis
/// queues no transaction, by `read.lua`. Not idempotent: a lost reply
/// leaves a range in flight under this consumer, read again after a
/// restart or claimed by another.
async fn read_some(
    context: &Context,
    streams: &[String],
    count: usize,
) -> std::result::Result<Option<NewEntries>, redis_failover::Error> {
    let read = read_transaction(context, streams, count);
    match context.client.query_pipeline::<(_,)>(&read).await {
        Ok((reply,)) => Ok(reply),
        Err(error) if error.kind() == ErrorKind::OutOfMemory => {
            let mut read = redis::cmd("EVAL");
            read.arg(READ);
            with_keys(&mut read, context, streams);
            read.arg(&context.group).arg(&context.consumer).arg(count);
            context.client.query(&read).await
        }
        Err(error) => Err(error),
    }
}

/// The keys of a read's scripts: `streams`, then their in-flight hashes,
/// then their staging lists.
fn with_keys(command: &mut redis::Cmd, context: &Context, streams: &[String]) {
    command.arg(streams.len() * 3).arg(streams);
    for stream in streams {
        command.arg(context.in_flight(stream));
    }
    for stream in streams {
        command.arg(staging_list(stream));
    }
}

/// `XREADGROUP ... NOACK` of `streams` between `mark.lua` and
/// `record.lua`, in one transaction: the staged lines become entries
/// first (`staged.lua`), and the entries read become ranges in flight
/// (see `ranges.lua`). `EVAL` rather than `EVALSHA`: a `NOSCRIPT`
/// would not undo the read, whose entries would then be in no range.
fn read_transaction(context: &Context, streams: &[String], count: usize) -> redis::Pipeline {
    let mut mark = redis::cmd("EVAL");
    mark.arg(MARK);
    with_keys(&mut mark, context, streams);
    mark.arg(&context.group);
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg(&context.group)
        .arg(&context.consumer)
        .arg("COUNT")
        .arg(count)
        .arg("NOACK")
        .arg("STREAMS")
        .arg(streams);
    for _ in streams {
        read.arg(">");
    }
    let mut record = redis::cmd("EVAL");
    record.arg(RECORD);
    with_keys(&mut record, context, streams);
    record.arg(&context.group).arg(&context.consumer);
    let mut pipeline = redis::pipe();
    pipeline
        .atomic()
        .add_command(mark)
        .ignore()
        .add_command(read)
        .add_command(record)
        .ignore();
    pipeline
}

/// A key's Redis Cluster hash tag (`{...}`): a stream's tenant.
fn hash_tag(key: &str) -> Option<&str> {
    key.split_once('{')?.1.split_once('}').map(|(tag, _)| tag)
}

/// Which ranges [`claim`] takes.
#[derive(Clone, Copy)]
enum Claim {
    /// This consumer's own, from before a restart.
    Own,
    /// Any consumer's, in flight for longer than `claim_idle`.
    Idle,
}

/// Claims one range in flight (`claim.lua`), and dead-letters it if it
/// was delivered too often (poison).
async fn claim(
    context: &Context,
    stream: &str,
    tenant: &str,
    mode: Claim,
) -> std::result::Result<Option<Read>, redis_failover::Error> {
    let idle_ms = u64::try_from(context.claim_idle.as_millis()).unwrap_or(u64::MAX);
    let claimed: Option<(String, String, u64, StreamRangeReply)> = context
        .client
        .query(
            redis::cmd("EVAL")
                .arg(CLAIM)
                .arg(2)
                .arg(stream)
                .arg(context.in_flight(stream))
                .arg(&context.group)
                .arg(&context.consumer)
                .arg(idle_ms)
                .arg(match mode {
                    Claim::Own => "own",
                    Claim::Idle => "idle",
                })
                .arg(context.batch_for(stream)),
        )
        .await?;
    let Some((range, last, deliveries, entries)) = claimed else {
        return Ok(None);
    };
    let entries = entries.ids;
    tracing::info!(
        target: "log_buffer",
        stream,
        entries = entries.len(),
        deliveries,
        "offloader: claimed entries in flight"
    );
    if deliveries <= context.max_deliveries {
        return Ok(Some(Read {
            stream: stream.to_owned(),
            range,
            last,
            entries,
        }));
    }
    let dead = entries
        .iter()
        .map(|entry| Dead {
            id: entry.id.clone(),
            fields: stored(entry),
            reason: "poison",
            detail: "delivered too many times".to_owned(),
        })
        .collect();
    let at = Acknowledge {
        stream,
        range: &range,
        last: &last,
    };
    dead_letter(context, at, tenant, dead, true).await;
    Ok(None)
}

/// The scripts around a read, and the claim: what they share, then their
/// own.
const MARK: &str = concat!(
    include_str!("ranges.lua"),
    include_str!("staged.lua"),
    include_str!("mark.lua")
);
const RECORD: &str = concat!(include_str!("ranges.lua"), include_str!("record.lua"));
const READ: &str = concat!(
    include_str!("ranges.lua"),
    include_str!("staged.lua"),
    include_str!("read.lua")
);
const CLAIM: &str = concat!(include_str!("ranges.lua"), include_str!("claim.lua"));
