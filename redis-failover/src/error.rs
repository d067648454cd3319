use std::fmt;
use std::time::Duration;

use redis::RedisError;

use crate::addr::NodeAddr;

/// Why a request or a client setting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A builder setting cannot work.
    #[error("invalid setting `{setting}`: {reason}")]
    InvalidConfig {
        /// The setting at fault.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// No attempt succeeded before the retry budget was spent: no master
    /// could be found, or every master found refused the request.
    #[error(
        "gave up after {attempts} attempts over {spent:?} (retry budget {budget:?}); {}",
        Failures(.failures)
    )]
    RetryBudgetExhausted {
        /// The configured budget.
        budget: Duration,
        /// How long was actually spent.
        spent: Duration,
        /// How many times the request or the discovery was tried.
        attempts: u32,
        /// The most recent failure of each node tried, oldest first.
        failures: Vec<NodeFailure>,
    },

    /// The connection failed or timed out after the request was sent, so
    /// it may or may not have run. It was not resent because it is not
    /// idempotent (mark it idempotent if running it twice is harmless), or,
    /// when it is, because it timed out three times on a master that was
    /// fine: a request that slow would only run again.
    #[error("outcome unknown: the connection to {node} failed after the request was sent")]
    OutcomeUnknown {
        /// The master the request was sent to.
        node: NodeAddr,
        /// The connection error.
        #[source]
        source: RedisError,
    },

    /// The master answered the request with an error (a wrong type, a
    /// script error, ...), or the reply did not convert to the asked type.
    #[error("request failed on {node}")]
    Command {
        /// The master that answered.
        node: NodeAddr,
        /// Redis's answer.
        #[source]
        source: RedisError,
    },

    /// A read routed to replicas found none that qualifies or answers
    /// ([`ReadPolicy::Replica`](crate::ReadPolicy::Replica) and
    /// [`RoundRobin`](crate::ReadPolicy::RoundRobin) never use the master).
    #[error("no replica can serve the read; {}", Failures(.failures))]
    NoReplicaAvailable {
        /// Each replica known and why it was not used or failed.
        failures: Vec<NodeFailure>,
    },

    /// A command that is not known to be read-only was sent as a read to be
    /// routed to replicas. Send it as a write (`query`) instead.
    #[error("`{command}` is not known to be read-only, so it is not sent to replicas")]
    NotReadOnly {
        /// The command (or a pipeline's commands).
        command: String,
    },

    /// A durable write ran on the master, but fewer replicas than asked
    /// acknowledged it in time. It is not rolled back: it may or may not
    /// survive a failover.
    #[error(
        "the write ran on {node}, but {acked} of the {required} replicas asked acknowledged it within {timeout:?}; it may not survive a failover"
    )]
    NotReplicated {
        /// The master that ran the write.
        node: NodeAddr,
        /// How many replicas acknowledged it.
        acked: u32,
        /// How many were asked for.
        required: u32,
        /// How long `WAIT` waited.
        timeout: Duration,
    },

    /// A persisted write ([`Durability::Persisted`](crate::Durability::Persisted))
    /// ran on the master, but its `WAITAOF` counted fewer fsyncs than asked
    /// in time: the master's own (`local`), or the replicas'. It is not
    /// rolled back: it may not survive a crash or a failover. Its
    /// [`kind`](Error::kind) is [`ErrorKind::NotReplicated`], as for
    /// [`NotReplicated`](Error::NotReplicated): the write ran, and is on
    /// fewer nodes than asked.
    #[error(
        "the write ran on {node}, but within {timeout:?} it was fsynced {} and on {acked} of the {required} replicas asked; it may not survive a crash or failover",
        if *.local { "locally" } else if *.local_required { "not locally" } else { "(locally not asked)" }
    )]
    NotPersisted {
        /// The master that ran the write.
        node: NodeAddr,
        /// Whether the master fsynced it.
        local: bool,
        /// Whether that was asked for.
        local_required: bool,
        /// How many replicas fsynced it.
        acked: u32,
        /// How many were asked for.
        required: u32,
        /// How long `WAITAOF` waited.
        timeout: Duration,
    },

    /// The master cannot do what the write's durability asks: it has no
    /// `WAITAOF` (Redis before 7.2: [`Durability::Persisted`](crate::Durability::Persisted)
    /// needs Redis 7.2 or Valkey), or its own fsync was asked for and
    /// `appendonly` is off. Checked before the write is sent, so it did
    /// not run; not retried, as trying again would not change it.
    #[error("{node} cannot {what}: the write was not sent")]
    Unsupported {
        /// The master.
        node: NodeAddr,
        /// What it cannot do.
        what: &'static str,
        /// Its answer.
        #[source]
        source: RedisError,
    },

    /// A durable write ran on the master, but its `WAIT` (or `WAITAOF`)
    /// answered an error (the node was demoted meanwhile, `appendonly` was
    /// turned off), so whether replicas have it is unknown. It is not
    /// rolled back. (A connection lost while the write and its `WAIT` were
    /// out is [`Error::OutcomeUnknown`].)
    #[error(
        "the write ran on {node}, but its WAIT (or WAITAOF) failed: whether replicas have it is unknown"
    )]
    ReplicationUnknown {
        /// The master that ran the write.
        node: NodeAddr,
        /// Why `WAIT` failed.
        #[source]
        source: RedisError,
    },

    /// A transaction's watched keys changed before every try within the
    /// retry budget (or the tries allowed) could commit it.
    #[error("the transaction's watched keys kept changing: gave up after {attempts} tries")]
    TransactionConflict {
        /// How many times it was tried.
        attempts: u32,
    },

    /// A cluster request whose keys hash to more than one slot: Redis
    /// Cluster runs a command or pipeline on one node, and only when all
    /// its keys are in one slot (use a `{hash tag}` to put them together).
    /// Checked before sending, so nothing ran.
    #[error("`{command}` has keys in {} slots ({slots:?}); a cluster request must keep to one", .slots.len())]
    CrossSlot {
        /// The command (or a pipeline's commands).
        command: String,
        /// The slots its keys hash to.
        slots: Vec<u16>,
    },

    /// A request a cluster client cannot serve as asked (one push
    /// connection to "the" master, a transaction that watches no key).
    /// Checked before sending, so nothing ran.
    #[error("{what} is not supported in cluster mode")]
    NotInCluster {
        /// What was asked.
        what: &'static str,
    },

    /// A connection of its own (pub/sub) to the master could not be opened.
    #[error("could not open a connection to {node}")]
    Connect {
        /// The master.
        node: NodeAddr,
        /// Why.
        #[source]
        source: RedisError,
    },
}

/// What kind of failure an [`Error`] is: what a caller decides on, instead
/// of Redis's error codes or this crate's variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A setting cannot work.
    InvalidConfig,
    /// Redis could not be reached, or refused, until the retry budget ran
    /// out: try again later.
    Unavailable,
    /// A write may or may not have run: read before writing again.
    OutcomeUnknown,
    /// A durable write ran, but too few replicas are known to have it (or,
    /// persisted, to have fsynced it).
    NotReplicated,
    /// The server lacks what was asked (`WAITAOF`, an append-only file):
    /// nothing ran, and trying again will not help.
    Unsupported,
    /// No replica could serve a read that must not go to the master.
    NoReplica,
    /// A command not known to be read-only was sent as a read.
    NotReadOnly,
    /// A connection of its own could not be opened.
    Connect,
    /// The node does not know the script (`NOSCRIPT`): load it and run
    /// it again.
    NoScript,
    /// The stream already has this consumer group (`BUSYGROUP`).
    GroupExists,
    /// The stream or its consumer group does not exist (`NOGROUP`).
    NoGroup,
    /// The key holds another type of value (`WRONGTYPE`).
    WrongType,
    /// The master refused a write because it reached `maxmemory` and may
    /// not evict (`OOM`). Not retried: it lasts until memory is freed or
    /// raised.
    OutOfMemory,
    /// The master refused a write because it cannot persist: its last
    /// snapshot or AOF write failed, as on a full disk (`MISCONF`). Not
    /// retried: it lasts until an operator mends the disk.
    PersistenceFailing,
    /// A transaction's watched keys kept changing until the retry budget
    /// ran out.
    TransactionConflict,
    /// A cluster request's keys are in more than one slot: nothing ran.
    CrossSlot,
    /// Any other error Redis answered, or a reply that does not convert to
    /// the type asked for ([`Error::code`] tells Redis's code).
    Command,
}

/// The last failure seen on one node while looking for the master or
/// sending a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFailure {
    /// The node, by its configured (or Sentinel-reported) address.
    pub node: NodeAddr,
    /// What went wrong there.
    pub reason: String,
}

impl fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.node, self.reason)
    }
}

/// The code that tells what `error` is: its own; for a pipeline or a
/// transaction, its first failing command's (redis-rs gives none of its
/// own to a code it does not know, `NOGROUP` say); for a transaction
/// discarded because a queued command was refused (`EXECABORT Transaction
/// discarded because of: OOM ...`), the refused command's.
fn cause_code(error: &RedisError) -> Option<String> {
    let failures = error.clone().into_server_errors();
    let mut failing = failures.iter().flat_map(|failures| failures.iter());
    if let Some((_, failure)) = failing.find(|(_, f)| f.code() != "EXECABORT") {
        return Some(failure.code().to_owned());
    }
    let code = error.code()?;
    if code != "EXECABORT" {
        return Some(code.to_owned());
    }
    let cause = error.detail().and_then(|d| d.split_once("because of: "));
    let cause = cause.and_then(|(_, cause)| cause.split_whitespace().next());
    Some(cause.unwrap_or(code).to_owned())
}

struct Failures<'a>(&'a [NodeFailure]);

impl fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no node was reachable");
        }
        f.write_str("tried ")?;
        for (i, failure) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{failure}")?;
        }
        Ok(())
    }
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidConfig { .. } => ErrorKind::InvalidConfig,
            Self::RetryBudgetExhausted { .. } => ErrorKind::Unavailable,
            Self::OutcomeUnknown { .. } => ErrorKind::OutcomeUnknown,
            Self::NotReplicated { .. }
            | Self::NotPersisted { .. }
            | Self::ReplicationUnknown { .. } => ErrorKind::NotReplicated,
            Self::Unsupported { .. } | Self::NotInCluster { .. } => ErrorKind::Unsupported,
            Self::CrossSlot { .. } => ErrorKind::CrossSlot,
            Self::NoReplicaAvailable { .. } => ErrorKind::NoReplica,
            Self::NotReadOnly { .. } => ErrorKind::NotReadOnly,
            Self::Connect { .. } => ErrorKind::Connect,
            Self::TransactionConflict { .. } => ErrorKind::TransactionConflict,
            Self::Command { source, .. } => match cause_code(source).as_deref() {
                Some("NOSCRIPT") => ErrorKind::NoScript,
                Some("BUSYGROUP") => ErrorKind::GroupExists,
                Some("NOGROUP") => ErrorKind::NoGroup,
                Some("WRONGTYPE") => ErrorKind::WrongType,
                Some("OOM") => ErrorKind::OutOfMemory,
                Some("MISCONF") => ErrorKind::PersistenceFailing,
                _ => ErrorKind::Command,
            },
        }
    }

    /// The error code Redis answered with (`WRONGTYPE`, `NOSCRIPT`, ...),
    /// for a [`Command`](Self::Command) error that is a Redis answer; for a
    /// discarded transaction, `EXECABORT` (its kind is its cause's).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Command { source, .. } => source.code(),
            _ => None,
        }
    }

    /// This error as a [`RedisError`], for the
    /// [`ConnectionLike`](redis::aio::ConnectionLike) interface: Redis's own
    /// answers pass through unchanged; an unknown outcome becomes an error
    /// with code `OUTCOMEUNKNOWN` (not an I/O error, so that generic retry
    /// wrappers do not resend it), an exhausted budget one with code
    /// `RETRYBUDGET`, each carrying this error's message.
    pub fn into_redis_error(self) -> RedisError {
        if let Self::Command { source, .. } = self {
            return source;
        }
        let code = match &self {
            Self::OutcomeUnknown { .. } => "OUTCOMEUNKNOWN",
            Self::RetryBudgetExhausted { .. } => "RETRYBUDGET",
            Self::InvalidConfig { .. } => "INVALIDCONFIG",
            Self::NoReplicaAvailable { .. } => "NOREPLICA",
            Self::NotReadOnly { .. } => "NOTREADONLY",
            Self::NotReplicated { .. } | Self::ReplicationUnknown { .. } => "NOTREPLICATED",
            Self::NotPersisted { .. } => "NOTPERSISTED",
            Self::Unsupported { .. } | Self::NotInCluster { .. } => "UNSUPPORTED",
            Self::CrossSlot { .. } => "CROSSSLOT",
            Self::Connect { .. } => "CONNECT",
            Self::TransactionConflict { .. } => "TXCONFLICT",
            Self::Command { .. } => unreachable!("returned above"),
        };
        // The RedisError has no source chain: its detail carries the cause too.
        let detail = match std::error::Error::source(&self) {
            Some(cause) => format!("{self}: {cause}"),
            None => self.to_string(),
        };
        redis::make_extension_error(code.to_owned(), Some(detail))
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exhausted_budget_names_every_node_tried() {
        let error = Error::RetryBudgetExhausted {
            budget: Duration::from_secs(30),
            spent: Duration::from_secs(31),
            attempts: 12,
            failures: vec![
                NodeFailure {
                    node: "redis-0:6379".parse().unwrap(),
                    reason: "connection refused".to_owned(),
                },
                NodeFailure {
                    node: "redis-1:6379".parse().unwrap(),
                    reason: "ROLE says replica".to_owned(),
                },
            ],
        };
        let message = error.to_string();
        assert!(message.contains("12 attempts"), "{message}");
        assert!(
            message.contains("redis-0:6379: connection refused; redis-1:6379: ROLE says replica"),
            "{message}"
        );
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        let redis_error = error.into_redis_error();
        assert!(
            redis_error.to_string().contains("redis-1:6379"),
            "{redis_error}"
        );
    }
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    #[test]
    fn redis_answers_are_told_apart_by_kind() {
        let node: NodeAddr = "r:6379".parse().unwrap();
        let answer = |code: &str| Error::Command {
            node: node.clone(),
            source: redis::make_extension_error(code.to_owned(), Some("detail".to_owned())),
        };
        assert_eq!(answer("NOSCRIPT").kind(), ErrorKind::NoScript);
        assert_eq!(answer("BUSYGROUP").kind(), ErrorKind::GroupExists);
        assert_eq!(answer("NOGROUP").kind(), ErrorKind::NoGroup);
        assert_eq!(answer("WRONGTYPE").kind(), ErrorKind::WrongType);
        assert_eq!(answer("OOM").kind(), ErrorKind::OutOfMemory);
        assert_eq!(answer("MISCONF").kind(), ErrorKind::PersistenceFailing);
        let discarded = Error::Command {
            node: node.clone(),
            source: redis::make_extension_error(
                "EXECABORT".to_owned(),
                Some("Transaction discarded because of: OOM command not allowed".to_owned()),
            ),
        };
        assert_eq!(discarded.kind(), ErrorKind::OutOfMemory);
        assert_eq!(discarded.code(), Some("EXECABORT"));
        assert_eq!(answer("ERR").kind(), ErrorKind::Command);
        assert_eq!(answer("ERR").code(), Some("ERR"));
        let conversion = Error::Command {
            node,
            source: redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "not a number",
            )),
        };
        assert_eq!(conversion.kind(), ErrorKind::Command);
        assert_eq!(
            Error::TransactionConflict { attempts: 3 }.kind(),
            ErrorKind::TransactionConflict
        );
    }
}
