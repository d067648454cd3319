//! What a request is (read-only, blocking) and what its failure means.

use std::time::Duration;

use redis::RedisError;

use crate::addr::NodeAddr;
use crate::command;

/// Server error codes meaning "this node cannot serve that now, and did not
/// run the command": the request is safe to send again elsewhere or later.
/// (`NOREPLICAS`: a new master waiting for its replicas under
/// `min-replicas-to-write`; `UNBLOCKED`: a blocked command released because
/// the node changed role; `BUSY`: a script is running; `REDIRECT`: a
/// Valkey replica naming its master to a connection that declared `CLIENT
/// CAPA redirect`, where Redis answers `READONLY`. In Redis Cluster:
/// `MOVED` and `ASK` name the node that owns the key's slot; `TRYAGAIN`
/// refuses a multi-key command while its slot migrates; `CLUSTERDOWN`
/// refuses while a slot has no master. None of them runs the command.)
const NOT_EXECUTED_CODES: &[&str] = &[
    "READONLY",
    "MOVED",
    "ASK",
    "CLUSTERDOWN",
    "REDIRECT",
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
    matches!(
        code,
        "READONLY" | "REDIRECT" | "LOADING" | "MASTERDOWN" | "UNBLOCKED"
    )
}

/// The master a `-REDIRECT host:port` refusal names, if the request was
/// refused so. The port follows the last colon (as [`NodeAddr`] parses
/// it): an IPv6 host has colons of its own.
pub(crate) fn redirect_target(error: &RedisError) -> Option<NodeAddr> {
    let errors = error.clone().into_server_errors()?;
    let (_, redirect) = errors.iter().find(|(_, e)| e.code() == "REDIRECT")?;
    redirect.details()?.trim().parse().ok()
}

/// The slot and node a cluster's `-MOVED slot host:port` or `-ASK slot
/// host:port` refusal from `asked` names, if the request was refused so.
/// The port follows the last colon, as for `REDIRECT`. An empty host (a
/// node that does not know its own endpoint answers `MOVED 3999 :6381`)
/// is `asked`'s.
pub(crate) fn cluster_redirect(error: &RedisError, asked: &NodeAddr) -> Option<(u16, NodeAddr)> {
    let errors = error.clone().into_server_errors()?;
    let (_, redirect) = errors
        .iter()
        .find(|(_, e)| matches!(e.code(), "MOVED" | "ASK"))?;
    let mut fields = redirect.details()?.split_whitespace();
    let slot = fields.next()?.parse().ok()?;
    let (host, port) = fields.next()?.rsplit_once(':')?;
    let host = if host.is_empty() { asked.host() } else { host };
    let node = NodeAddr::new(host, port.parse().ok()?).ok()?;
    Some((slot, node))
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
    command::name(cmd).is_some_and(|name| command::is_one_of(name, READ_ONLY_COMMANDS))
}

/// How long a blocking command may hold its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Block {
    /// Up to this long (the command's own timeout).
    For(Duration),
    /// Until it is answered (a timeout of 0).
    Forever,
}

impl Block {
    /// One block after the other, as a pipeline runs them.
    pub(crate) fn then(self, next: Self) -> Self {
        match (self, next) {
            (Self::For(a), Self::For(b)) => Self::For(a.saturating_add(b)),
            _ => Self::Forever,
        }
    }

    /// A timeout argument: `scale` (1 for milliseconds, 1000 for seconds)
    /// times `arg`, where 0 means forever. One that does not parse is
    /// refused by Redis, at once.
    fn of(arg: Option<&[u8]>, scale: f64) -> Self {
        let number = arg
            .and_then(|arg| std::str::from_utf8(arg).ok())
            .and_then(|arg| arg.parse::<f64>().ok());
        match number {
            Some(0.0) => Self::Forever,
            Some(n) if n.is_finite() && n > 0.0 => {
                Self::For(Duration::try_from_secs_f64(n * scale / 1000.0).unwrap_or(Duration::MAX))
            }
            _ => Self::For(Duration::ZERO),
        }
    }
}

/// Whether `cmd` blocks until data arrives (`BLPOP`, `XREAD BLOCK`, ...):
/// a blocking command that is not `WAIT` or `WAITAOF`, which wait for
/// replication of what ran before them.
pub(crate) fn waits_for_data(cmd: &redis::Cmd) -> bool {
    let is_wait =
        command::name(cmd).is_some_and(|name| command::is_one_of(name, &["WAIT", "WAITAOF"]));
    !is_wait && blocking(cmd).is_some()
}

/// Whether `cmd` blocks its connection until an event or its timeout
/// (judged by its name and, for `XREAD`, a `BLOCK` argument), and how long.
pub(crate) fn blocking(cmd: &redis::Cmd) -> Option<Block> {
    let mut args = command::args(cmd, b"0");
    // Every command runs through here: only a blocking command's
    // arguments are looked at.
    let name = args.next()?;
    let is = |names: &[&str]| command::is_one_of(name, names);
    if is(&[
        "BLPOP",
        "BRPOP",
        "BRPOPLPUSH",
        "BLMOVE",
        "BZPOPMIN",
        "BZPOPMAX",
    ]) {
        Some(Block::of(args.last(), 1000.0))
    } else if is(&["BLMPOP", "BZMPOP"]) {
        Some(Block::of(args.next(), 1000.0))
    } else if is(&["WAIT", "WAITAOF"]) {
        Some(Block::of(args.last(), 1.0))
    } else if is(&["XREAD", "XREADGROUP"]) {
        // Options come before STREAMS; keys after it may be named BLOCK.
        let mut options = args.take_while(|arg| !arg.eq_ignore_ascii_case(b"STREAMS"));
        options.find(|arg| arg.eq_ignore_ascii_case(b"BLOCK"))?;
        Some(Block::of(options.next(), 1.0))
    } else {
        None
    }
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
            "MOVED",
            "ASK",
            "CLUSTERDOWN",
            "REDIRECT",
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
    fn a_redirect_names_the_master_to_resend_to() {
        let redirect = |details: &str| {
            redis::make_extension_error("REDIRECT".to_owned(), Some(details.to_owned()))
        };
        let target = redirect_target(&redirect("127.0.0.1:6380")).unwrap();
        assert_eq!((target.host(), target.port()), ("127.0.0.1", 6380));
        let target = redirect_target(&redirect("::1:6380")).unwrap();
        assert_eq!((target.host(), target.port()), ("::1", 6380));
        assert!(redirect_target(&redirect("no-port")).is_none());
        assert!(redirect_target(&server_error("READONLY")).is_none());
        assert!(refusal_means_not_master("REDIRECT"));
    }

    #[test]
    fn a_cluster_redirect_names_the_slot_and_its_node() {
        let refusal = |code: &str, details: &str| {
            redis::make_extension_error(code.to_owned(), Some(details.to_owned()))
        };
        let asked = NodeAddr::new("10.0.0.9", 6379).unwrap();
        let redirect = |code, details| cluster_redirect(&refusal(code, details), &asked);
        let (slot, node) = redirect("MOVED", "3999 127.0.0.1:6381").unwrap();
        assert_eq!((slot, node.host(), node.port()), (3999, "127.0.0.1", 6381));
        let (slot, node) = redirect("ASK", "12 ::1:7000").unwrap();
        assert_eq!((slot, node.host(), node.port()), (12, "::1", 7000));
        let (_, node) = redirect("MOVED", "5 :6390").unwrap();
        assert_eq!((node.host(), node.port()), ("10.0.0.9", 6390));
        assert!(redirect("MOVED", "x").is_none());
        assert!(cluster_redirect(&server_error("READONLY"), &asked).is_none());
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

    #[test]
    fn blocking_commands_are_told_by_name_and_timeout() {
        let block = |args: &[&str]| {
            let mut cmd = redis::cmd(args[0]);
            for arg in &args[1..] {
                cmd.arg(*arg);
            }
            blocking(&cmd)
        };
        let secs = |s: f64| Some(Block::For(Duration::from_secs_f64(s)));
        assert_eq!(block(&["BLPOP", "a", "b", "1.5"]), secs(1.5));
        assert_eq!(block(&["brpop", "a", "0"]), Some(Block::Forever));
        assert_eq!(
            block(&["BLMOVE", "a", "b", "LEFT", "RIGHT", "2"]),
            secs(2.0)
        );
        assert_eq!(block(&["BZMPOP", "3", "1", "z", "MIN"]), secs(3.0));
        assert_eq!(block(&["WAIT", "1", "250"]), secs(0.25));
        assert_eq!(
            block(&["XREAD", "COUNT", "1", "BLOCK", "100", "STREAMS", "s", "$"]),
            secs(0.1)
        );
        assert_eq!(block(&["XREAD", "STREAMS", "BLOCK", "0"]), None);
        assert_eq!(
            block(&["XREAD", "BLOCK", "STREAMS", "s", "$"]),
            Some(Block::For(Duration::ZERO)),
            "BLOCK without its value: refused by Redis at once"
        );
        assert_eq!(blocking(&redis::Cmd::new()), None);
        assert_eq!(
            block(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "BLOCK",
                "0",
                "STREAMS",
                "s",
                ">"
            ]),
            Some(Block::Forever)
        );
        assert_eq!(block(&["GET", "k"]), None);
        assert_eq!(
            block(&["BLPOP", "k", "soon"]),
            Some(Block::For(Duration::ZERO))
        );
        assert_eq!(
            Block::For(Duration::from_secs(1)).then(Block::For(Duration::from_secs(2))),
            Block::For(Duration::from_secs(3))
        );
        assert_eq!(
            Block::For(Duration::ZERO).then(Block::Forever),
            Block::Forever
        );
    }
}
