//! Requests over keys of more than one Redis Cluster slot: a change to a
//! global record (`user:<name>`, `api-key:<id>`) with its tenant's audit
//! record and sets (`tenant:{<id>}:...`), and reads of many global records.
//!
//! With one master each stays one request, as it always was: a
//! transaction, or one pipeline. On a cluster a request must keep to one
//! slot, so a change goes as one transaction per slot, in the order the
//! caller gives (the tenant's part first: an audit record may then name a
//! change whose last part failed, but no change lands without its
//! record), and reads go one per record, all at once.

use futures_util::future::try_join_all;
use redis::{FromRedisValue, Pipeline};
use redis_failover::FailoverClient;

/// Applies `parts`, each of commands on keys of one slot (their replies
/// ignored): in one transaction with one master, else one transaction per
/// part in order, stopping at the first failure.
pub(crate) async fn apply(
    client: &FailoverClient,
    parts: Vec<Pipeline>,
) -> redis_failover::Result<()> {
    if client.is_cluster() {
        for mut part in parts {
            let () = client.query_pipeline(part.atomic()).await?;
        }
        return Ok(());
    }
    let mut all = redis::pipe();
    all.atomic();
    for part in &parts {
        for command in part.cmd_iter() {
            all.add_command(command.clone()).ignore();
        }
    }
    client.query_pipeline(&all).await
}

/// The replies to `commands` (each on keys of any slot), in order: one
/// pipeline with one master, else each command alone, concurrently.
pub(crate) async fn read_all<T: FromRedisValue>(
    client: &FailoverClient,
    commands: Vec<redis::Cmd>,
) -> redis_failover::Result<Vec<T>> {
    if client.is_cluster() {
        return try_join_all(commands.iter().map(|command| client.query(command))).await;
    }
    let mut pipeline = redis::pipe();
    for command in commands {
        pipeline.add_command(command);
    }
    client.query_pipeline(&pipeline).await
}
