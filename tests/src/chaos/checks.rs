//! What a chaos run checks once its traffic has stopped: acknowledged
//! writes still there, every audit record shipped once, dead letters.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redis_failover::FailoverClient;
use serde_json::Value;

use super::receiver::Receiver;
use super::rig::wait_until;
use super::traffic::Traffic;
use super::{BoxError, Fault, TENANTS};
use crate::Http;

/// Acknowledged writes whose value is gone (unless a later attempt that
/// may have run is found instead).
pub(super) async fn lost_writes(traffic: &Traffic, readers: &HashMap<&str, Http>) -> Vec<String> {
    let mut lost = Vec::new();
    let state: Vec<_> = std::mem::take(&mut *traffic.state.lock().unwrap())
        .into_iter()
        .collect();
    for ((tenant, key), key_state) in state {
        let Some(value) = key_state.acked else {
            continue;
        };
        let found = readers[tenant.as_str()]
            .get(&format!("/data/{key}"))
            .await
            .json()["value"]
            .as_u64();
        if found != Some(value) && !found.is_some_and(|v| key_state.maybe.contains(&v)) {
            lost.push(format!(
                "{tenant}/{key}: acknowledged {value}, found {found:?}"
            ));
        }
    }
    lost
}

/// Waits until the offloaders have shipped every audit stream and its
/// staged records; on timeout, the error tells what holds entries back.
pub(super) async fn wait_for_drained_audit(client: &FailoverClient) -> Result<(), BoxError> {
    let drained = wait_until("audit streams drained", async || {
        let mut left = 0u64;
        for tenant in TENANTS {
            let stream = audit_stream(tenant);
            let mut lengths = redis::pipe();
            lengths
                .cmd("XLEN")
                .arg(&stream)
                .cmd("LLEN")
                .arg(log_buffer::staging_list(&stream));
            let (entries, staged) = client
                .query_pipeline::<(u64, u64)>(&lengths)
                .await
                .unwrap_or((1, 0));
            left += entries + staged;
        }
        left == 0
    })
    .await;
    let Err(error) = drained else {
        return Ok(());
    };
    let mut state = String::new();
    for tenant in TENANTS {
        let stream = audit_stream(tenant);
        let groups: redis::Value = client
            .query(redis::cmd("XINFO").arg("GROUPS").arg(&stream))
            .await
            .unwrap_or(redis::Value::Nil);
        let first: redis::Value = client
            .query(
                redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(3),
            )
            .await
            .unwrap_or(redis::Value::Nil);
        let staged: redis::Value = client
            .query(redis::cmd("LLEN").arg(log_buffer::staging_list(&stream)))
            .await
            .unwrap_or(redis::Value::Nil);
        state.push_str(&format!(
            "\n{stream}: groups {groups:?}\n  first entries {first:?}\n  staged {staged:?}"
        ));
    }
    Err(format!("{error}; {state}").into())
}

/// What the receiver got: acknowledged writes without an audit record
/// there, and how many records arrived more than once.
pub(super) fn audit_at_receiver(
    traffic: &Traffic,
    receiver: &Receiver,
    faults: &[Fault],
) -> (Vec<String>, u64) {
    let lines = receiver.lines.lock().unwrap().clone();
    let duplicate_lines = lines
        .values()
        .filter(|count| **count > 1)
        .map(|count| count - 1)
        .sum();
    let mut audited = BTreeSet::new();
    for (tenant, _, line) in lines.keys() {
        if let Ok(fields) = serde_json::from_str::<BTreeMap<String, Value>>(line)
            && let (Some(key), Some(version)) = (fields.get("key"), fields.get("version"))
        {
            let version = version.as_str().and_then(|v| v.parse::<u64>().ok());
            audited.insert((
                tenant.clone(),
                key.as_str().unwrap_or_default().to_owned(),
                version,
            ));
        }
    }
    let acknowledged = traffic.acknowledged.lock().unwrap();
    let missing = acknowledged
        .iter()
        .filter(|(tenant, key, version, _)| {
            !audited.contains(&(tenant.clone(), key.clone(), Some(*version)))
        })
        .map(|(tenant, key, version, round)| {
            let during = match round {
                0 => "before the first fault".to_owned(),
                round => format!(
                    "in round {round} ({})",
                    faults[(round - 1) % faults.len()].name()
                ),
            };
            format!("{tenant}/{key} version {version}, acknowledged {during}")
        })
        .collect();
    (missing, duplicate_lines)
}

/// Entries any offloader, killed ones included, set aside, by reason.
pub(super) async fn dead_letters(
    client: &FailoverClient,
) -> Result<BTreeMap<String, u64>, BoxError> {
    let mut dead_lettered: BTreeMap<String, u64> = BTreeMap::new();
    for tenant in TENANTS {
        let stream = log_buffer::dead_letter_stream(&audit_stream(tenant));
        let entries: Vec<(String, HashMap<String, String>)> = client
            .query(redis::cmd("XRANGE").arg(stream).arg("-").arg("+"))
            .await?;
        for (_, fields) in entries {
            let reason = fields
                .get("dead_letter_reason")
                .cloned()
                .unwrap_or_default();
            *dead_lettered.entry(reason).or_default() += 1;
        }
    }
    Ok(dead_lettered)
}

fn audit_stream(tenant: &str) -> String {
    format!("tenant:{{{tenant}}}:audit")
}
