//! What a failed request means.

use redis::RedisError;

/// Server error codes meaning "this node cannot serve that now, and did not
/// run the command": the request is safe to send again elsewhere or later.
/// (`NOREPLICAS`: a new master waiting for its replicas under
/// `min-replicas-to-write`; `UNBLOCKED`: a blocked command released because
/// the node changed role; `BUSY`: a script is running.)
const NOT_EXECUTED_CODES: &[&str] = &[
    "READONLY",
    "LOADING",
    "MASTERDOWN",
    "TRYAGAIN",
    "NOREPLICAS",
    "UNBLOCKED",
    "BUSY",
];

/// Commands that change nothing, so sending them twice is harmless even when
/// the first outcome is unknown, and replicas may serve them. Names are
/// upper case.
const READ_ONLY_COMMANDS: &[&str] = &[
    "BITCOUNT",
    "BITFIELD_RO",
    "BITPOS",
    "DBSIZE",
    "ECHO",
    "EVALSHA_RO",
    "EVAL_RO",
    "EXISTS",
    "EXPIRETIME",
    "FCALL_RO",
    "GEODIST",
    "GEOHASH",
    "GEOPOS",
    "GEORADIUSBYMEMBER_RO",
    "GEORADIUS_RO",
    "GEOSEARCH",
    "GET",
    "GETBIT",
    "GETRANGE",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HRANDFIELD",
    "HSCAN",
    "HSTRLEN",
    "HVALS",
    "INFO",
    "KEYS",
    "LCS",
    "LINDEX",
    "LLEN",
    "LPOS",
    "LRANGE",
    "MGET",
    "OBJECT",
    "PEXPIRETIME",
    "PFCOUNT",
    "PING",
    "PTTL",
    "RANDOMKEY",
    "ROLE",
    "SCAN",
    "SCARD",
    "SDIFF",
    "SINTER",
    "SINTERCARD",
    "SISMEMBER",
    "SMEMBERS",
    "SMISMEMBER",
    "SORT_RO",
    "SRANDMEMBER",
    "SSCAN",
    "STRLEN",
    "SUBSTR",
    "SUNION",
    "TIME",
    "TTL",
    "TYPE",
    "XINFO",
    "XLEN",
    "XPENDING",
    "XRANGE",
    "XREAD",
    "XREVRANGE",
    "ZCARD",
    "ZCOUNT",
    "ZDIFF",
    "ZINTER",
    "ZINTERCARD",
    "ZLEXCOUNT",
    "ZMSCORE",
    "ZRANDMEMBER",
    "ZRANGE",
    "ZRANGEBYLEX",
    "ZRANGEBYSCORE",
    "ZRANK",
    "ZREVRANGE",
    "ZREVRANGEBYLEX",
    "ZREVRANGEBYSCORE",
    "ZREVRANK",
    "ZSCAN",
    "ZSCORE",
    "ZUNION",
];

/// What a failed request tells the retry loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The node refused without running the command (`READONLY`,
    /// `LOADING`, ...): find the master again and resend.
    NotExecuted,
    /// The request may or may not have run (timeout, connection lost after
    /// sending): resend only if it is idempotent.
    OutcomeUnknown,
    /// An answer for the caller (a wrong type, a script error, ...).
    Final,
}

impl Failure {
    /// Classifies an error returned by a request sent on an open connection.
    pub(crate) fn of(error: &RedisError) -> Self {
        // Server errors, alone or from a pipeline or transaction.
        if let Some(errors) = error.clone().into_server_errors() {
            let errors: Vec<&redis::ServerError> = errors.iter().map(|(_, e)| e).collect();
            return if refused_without_running(&errors) {
                Self::NotExecuted
            } else {
                Self::Final
            };
        }
        if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
            Self::OutcomeUnknown
        } else {
            Self::Final
        }
    }
}

/// The refusal code behind an error reply, if it is a refusal: its own
/// code, or the one a transaction was discarded for (`EXECABORT
/// Transaction discarded because of: READONLY ...`).
pub(crate) fn refusal_code(error: &redis::ServerError) -> Option<&'static str> {
    let known = |code: &str| {
        NOT_EXECUTED_CODES
            .iter()
            .copied()
            .find(|known| *known == code)
    };
    known(error.code()).or_else(|| {
        let cause = error.details()?.split_once("because of: ")?.1;
        (error.code() == "EXECABORT").then(|| known(cause.split_whitespace().next()?))?
    })
}

/// The refusal code in a failed request's error, if the node refused it.
pub(crate) fn refusal_of(error: &RedisError) -> Option<&'static str> {
    let errors = error.clone().into_server_errors()?;
    errors.iter().find_map(|(_, e)| refusal_code(e))
}

/// Whether the node that refused with `code` should be given up: it is no
/// longer a master that can serve (demoted, loading, cut off). The other
/// refusals (`BUSY`, `NOREPLICAS`, `TRYAGAIN`) pass on the same master.
pub(crate) fn refusal_means_not_master(code: &str) -> bool {
    matches!(code, "READONLY" | "LOADING" | "MASTERDOWN" | "UNBLOCKED")
}

/// Whether the error replies of one request show the node refused all of
/// it without running any: a refusal, and besides refusals only the
/// `EXECABORT` a refused transaction ends with.
pub(crate) fn refused_without_running(errors: &[&redis::ServerError]) -> bool {
    errors.iter().any(|e| refusal_code(e).is_some())
        && errors
            .iter()
            .all(|e| refusal_code(e).is_some() || e.code() == "EXECABORT")
}

/// Whether a command changes nothing (judged by its name).
pub(crate) fn is_read_only(cmd: &redis::Cmd) -> bool {
    let Some(redis::Arg::Simple(name)) = cmd.args_iter().next() else {
        return false;
    };
    READ_ONLY_COMMANDS
        .iter()
        .any(|known| known.as_bytes().eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use redis::{ErrorKind, RedisError};
    use std::io;

    use super::*;

    fn server_error(code: &str) -> RedisError {
        redis::make_extension_error(code.to_owned(), Some("details".to_owned()))
    }

    fn reply(code: &str, details: &str) -> redis::ServerError {
        let error = redis::make_extension_error(code.to_owned(), Some(details.to_owned()));
        error.into_server_errors().unwrap()[0].1.clone()
    }

    #[test]
    fn refusals_of_a_node_that_cannot_serve_are_not_executed() {
        for code in [
            "READONLY",
            "LOADING",
            "MASTERDOWN",
            "TRYAGAIN",
            "NOREPLICAS",
            "UNBLOCKED",
            "BUSY",
        ] {
            assert_eq!(
                Failure::of(&server_error(code)),
                Failure::NotExecuted,
                "{code}"
            );
        }
    }

    #[test]
    fn lost_connections_and_timeouts_leave_the_outcome_unknown() {
        for kind in [
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::TimedOut,
        ] {
            let error = RedisError::from(io::Error::from(kind));
            assert_eq!(Failure::of(&error), Failure::OutcomeUnknown, "{kind:?}");
        }
    }

    #[test]
    fn answers_for_the_caller_are_final() {
        assert_eq!(Failure::of(&server_error("WRONGTYPE")), Failure::Final);
        assert_eq!(Failure::of(&server_error("ERR")), Failure::Final);
        let type_error = RedisError::from((ErrorKind::UnexpectedReturnType, "not a number"));
        assert_eq!(Failure::of(&type_error), Failure::Final);
    }

    #[test]
    fn a_transaction_is_refused_only_when_refusals_caused_its_abort() {
        let readonly = reply("READONLY", "You can't write against a read only replica.");
        let aborted = reply(
            "EXECABORT",
            "Transaction discarded because of previous errors.",
        );
        let aborted_by_refusal = reply(
            "EXECABORT",
            "Transaction discarded because of: READONLY You can't write against a read only replica.",
        );
        let wrong_type = reply(
            "WRONGTYPE",
            "Operation against a key holding the wrong kind of value",
        );
        assert!(refused_without_running(&[&readonly, &readonly, &aborted]));
        assert!(refused_without_running(&[&aborted_by_refusal]));
        assert!(
            !refused_without_running(&[&aborted]),
            "a syntax error aborts too"
        );
        assert!(!refused_without_running(&[&readonly, &wrong_type]));
        assert!(!refused_without_running(&[&reply(
            "BUSYKEY",
            "Target key name already exists."
        )]));
        assert!(!refused_without_running(&[]));
    }

    #[test]
    fn read_only_commands_are_recognised_in_any_case() {
        assert!(is_read_only(redis::cmd("GET").arg("k")));
        assert!(is_read_only(
            redis::cmd("zrangebyscore").arg("k").arg(0).arg(1)
        ));
        assert!(!is_read_only(redis::cmd("SET").arg("k").arg("v")));
        assert!(!is_read_only(redis::cmd("INCR").arg("k")));
        assert!(!is_read_only(&redis::Cmd::new()));
    }
}
