//! What a request sends, and how to read refusals in what comes back.

use redis::aio::MultiplexedConnection;
use redis::{Cmd, Pipeline, RedisError, ServerError, Value};

use crate::command;
use crate::error::Error;

use crate::retry::{
    Block, blocking, is_read_only, refusal_code, refused_without_running, waits_for_data,
};

/// What became of one attempt to send a request to the master.
pub(crate) enum Sent {
    /// The master answered; the reply is the caller's.
    Done(Reply),
    /// A durable write ran, but its `WAIT` fell short or failed.
    Unreplicated(Error),
    /// Not sent: the master cannot serve it as asked (this error says
    /// why), and trying again would not change that.
    Refused(Error),
    /// Sent, and failed with this error (or a refusal in the reply).
    Failed(RedisError),
    /// Not sent: the master could not be reached (this is why).
    Unreachable(String),
    /// Not sent: the master is fine but cannot take it yet (this is why);
    /// wait and try again, without looking for another master.
    Held(String),
}

/// A command or a slice of a pipeline, as redis-rs's `ConnectionLike` hands them over.
#[derive(Clone, Copy)]
pub(crate) enum Request<'a> {
    Command(&'a Cmd),
    Pipeline {
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    },
}

/// The reply to a [`Request`].
pub(crate) enum Reply {
    Value(Value),
    Values(Vec<Value>),
}

impl Reply {
    /// The error a command was answered with, if it was.
    pub(crate) fn error(self) -> Option<RedisError> {
        match self {
            Self::Value(value) => value.extract_error().err(),
            Self::Values(_) => None,
        }
    }

    /// A pipeline's replies.
    pub(crate) fn into_values(self) -> Vec<Value> {
        match self {
            Self::Values(values) => values,
            Self::Value(value) => vec![value],
        }
    }
}

/// A request's commands, owned ([`Request::commands`]), and where its
/// reply lies among theirs.
pub(crate) struct Commands {
    pub(crate) cmds: Vec<Cmd>,
    pub(crate) shape: Shape,
}

/// Where a request's reply lies among the replies to its [`Commands`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    /// How many replies the commands get.
    pub(crate) replies: usize,
    /// The replies before the request's own (`ASKING`'s, and those a
    /// pipeline's offset passes over, such as a transaction's `QUEUED`s).
    skip: usize,
    /// The request's own replies.
    take: usize,
    /// A single command, whose reply is one value.
    single: bool,
    /// A transaction, whose commands' `QUEUED`s are passed over.
    transaction: bool,
}

impl Shape {
    /// The request's reply, out of `values`, the replies to its commands.
    pub(crate) fn reply(self, mut values: Vec<Value>) -> Result<Reply, RedisError> {
        if values.len() != self.replies {
            return Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "a reply count other than the commands sent",
            )));
        }
        values.truncate(self.skip + self.take);
        // A request that asked for more replies than its commands get
        // passes over what there is.
        let passed: Vec<Value> = values.drain(..self.skip.min(values.len())).collect();
        if self.transaction {
            // A command refused as it was queued aborts the transaction
            // (`EXECABORT`, nothing ran); the refusal says why, as redis-rs
            // reports a transaction it sends itself: the first that routing
            // and the retry policy act on (`MOVED`, `READONLY`...), else
            // the first.
            let errors: Vec<&ServerError> = passed.iter().filter_map(server_error).collect();
            let refusal = errors.iter().find(|e| refusal_code(e).is_some());
            if let Some(error) = refusal.or(errors.first()) {
                return Err(RedisError::from((*error).clone()));
            }
        }
        if !self.single {
            return Ok(Reply::Values(values));
        }
        values
            .pop()
            .map(Reply::Value)
            .ok_or_else(|| RedisError::from((redis::ErrorKind::UnexpectedReturnType, "no reply")))
    }
}

impl Request<'_> {
    pub(crate) async fn send(
        self,
        connection: &mut MultiplexedConnection,
    ) -> Result<Reply, RedisError> {
        match self {
            Self::Command(cmd) => connection.send_packed_command(cmd).await.map(Reply::Value),
            Self::Pipeline {
                pipeline,
                offset,
                count,
            } => connection
                .send_packed_commands(pipeline, offset, count)
                .await
                .map(Reply::Values),
        }
    }

    /// Sends it, right after `ASKING` when `asking` (a cluster's `ASK`
    /// redirect).
    pub(crate) async fn send_on(
        self,
        connection: &mut MultiplexedConnection,
        asking: bool,
    ) -> Result<Reply, RedisError> {
        if asking {
            self.send_asking(connection).await
        } else {
            self.send(connection).await
        }
    }

    /// Sends it right after `ASKING`, in one write so that nothing else on
    /// the multiplexed connection comes between them (`ASKING` holds for
    /// the next command only), and returns its replies alone.
    async fn send_asking(
        self,
        connection: &mut MultiplexedConnection,
    ) -> Result<Reply, RedisError> {
        let Commands { cmds, shape } = self.commands(true);
        let mut pipeline = redis::pipe();
        for cmd in cmds {
            pipeline.add_command(cmd);
        }
        let values = connection
            .send_packed_commands(&pipeline, 0, shape.replies)
            .await?;
        shape.reply(values)
    }

    /// Its commands, owned and written out (a transaction's `MULTI` and
    /// `EXEC` included), after `ASKING` when `asking`: to send within a
    /// pipeline of other commands.
    pub(crate) fn commands(self, asking: bool) -> Commands {
        let mut cmds = Vec::new();
        if asking {
            cmds.push(redis::cmd("ASKING"));
        }
        let (skip, take, single, transaction) = match self {
            Self::Command(cmd) => {
                cmds.push(cmd.clone());
                (0, 1, true, false)
            }
            Self::Pipeline {
                pipeline,
                offset,
                count,
            } => {
                let transaction = pipeline.is_transaction();
                if transaction {
                    cmds.push(redis::cmd("MULTI"));
                }
                cmds.extend(pipeline.cmd_iter().cloned());
                if transaction {
                    cmds.push(redis::cmd("EXEC"));
                }
                (offset, count, false, transaction)
            }
        };
        let shape = Shape {
            replies: cmds.len(),
            skip: usize::from(asking) + skip,
            take,
            single,
            transaction,
        };
        Commands { cmds, shape }
    }

    /// Its command names, for error messages.
    pub(crate) fn describe(self) -> String {
        let name = |cmd: &Cmd| {
            command::name(cmd).map_or_else(
                || "?".to_owned(),
                |name| String::from_utf8_lossy(name).to_uppercase(),
            )
        };
        match self {
            Self::Command(cmd) => name(cmd),
            Self::Pipeline { pipeline, .. } => {
                pipeline.cmd_iter().map(name).collect::<Vec<_>>().join(" ")
            }
        }
    }

    /// Whether sending it twice is harmless because it changes nothing.
    pub(crate) fn is_read_only(self) -> bool {
        match self {
            Self::Command(cmd) => is_read_only(cmd),
            Self::Pipeline { pipeline, .. } => {
                !pipeline.is_transaction() && pipeline.cmd_iter().all(is_read_only)
            }
        }
    }

    /// How long it may block its connection, if it holds blocking commands.
    pub(crate) fn blocking(self) -> Option<Block> {
        match self {
            Self::Command(cmd) => blocking(cmd),
            // Within MULTI/EXEC nothing blocks.
            Self::Pipeline { pipeline, .. } if pipeline.is_transaction() => None,
            Self::Pipeline { pipeline, .. } => {
                pipeline.cmd_iter().filter_map(blocking).reduce(Block::then)
            }
        }
    }

    /// Whether a blocked request may be unblocked (refused, so that it is
    /// known not to have run) without losing anything: it waits for data,
    /// and whatever else it holds changes nothing.
    pub(crate) fn may_unblock(self) -> bool {
        match self {
            Self::Command(cmd) => waits_for_data(cmd),
            Self::Pipeline { pipeline, .. } => {
                !pipeline.is_transaction()
                    && pipeline.cmd_iter().any(waits_for_data)
                    && pipeline
                        .cmd_iter()
                        .all(|cmd| waits_for_data(cmd) || is_read_only(cmd))
            }
        }
    }

    /// Redis answers `READONLY` and the like in-band, as error replies.
    /// When `reply` shows the node refused this request without running it,
    /// the first refusal (as an error) and its code; `None` when the reply
    /// is the caller's.
    ///
    /// In a plain pipeline that is not idempotent, replies that are not
    /// errors must belong to read-only commands: a write that ran must not
    /// run twice. An idempotent request with any refusal in it is resent.
    pub(crate) fn refusal(
        self,
        reply: &Reply,
        idempotent: bool,
    ) -> Option<(RedisError, &'static str)> {
        let errors: Vec<&ServerError> = match reply {
            Reply::Value(value) => server_error(value).into_iter().collect(),
            Reply::Values(values) => values.iter().filter_map(server_error).collect(),
        };
        let (first, code) = errors
            .iter()
            .find_map(|e| refusal_code(e).map(|code| (*e, code)))?;
        let refused = match (self, reply) {
            _ if idempotent => true,
            (
                Self::Pipeline {
                    pipeline, offset, ..
                },
                Reply::Values(values),
            ) if !pipeline.is_transaction() => {
                refused_without_running(&errors)
                    && pipeline
                        .cmd_iter()
                        .skip(offset)
                        .zip(values)
                        .all(|(cmd, value)| server_error(value).is_some() || is_read_only(cmd))
            }
            _ => refused_without_running(&errors),
        };
        refused.then(|| (RedisError::from(first.clone()), code))
    }
}

fn server_error(value: &Value) -> Option<&ServerError> {
    match value {
        Value::ServerError(error) => Some(error),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_reply(code: &str, details: &str) -> Value {
        let error = redis::make_extension_error(code.to_owned(), Some(details.to_owned()));
        Value::ServerError(error.into_server_errors().unwrap()[0].1.clone())
    }

    fn set_then_wait() -> Pipeline {
        let mut pipeline = redis::pipe();
        pipeline.set("k", "v").cmd("WAIT").arg(1).arg(100);
        pipeline
    }

    #[test]
    fn a_refused_write_in_a_pipeline_is_resent_only_if_nothing_else_ran() {
        let pipeline = set_then_wait();
        let request = Request::Pipeline {
            pipeline: &pipeline,
            offset: 0,
            count: 2,
        };
        // A demoted master: the SET refused, WAIT refused on a replica.
        let refused = Reply::Values(vec![
            error_reply("READONLY", "You can't write against a read only replica."),
            error_reply("ERR", "WAIT cannot be used with replica instances."),
        ]);
        // The SET ran, then the node was demoted: running it again is the caller's call.
        let half_ran = Reply::Values(vec![
            Value::Okay,
            error_reply("UNBLOCKED", "force unblock from blocking operation"),
        ]);
        assert_eq!(
            request.refusal(&refused, false).map(|(_, code)| code),
            None,
            "ERR is not a refusal"
        );
        assert_eq!(
            request.refusal(&half_ran, false).map(|(_, code)| code),
            None
        );
        assert_eq!(
            request.refusal(&refused, true).map(|(_, code)| code),
            Some("READONLY")
        );
        assert_eq!(
            request.refusal(&half_ran, true).map(|(_, code)| code),
            Some("UNBLOCKED")
        );
    }

    /// A transaction as redis-rs hands it over: the `EXEC` reply alone.
    fn exec_reply_of(transaction: &redis::Pipeline) -> Request<'_> {
        Request::Pipeline {
            pipeline: transaction,
            offset: transaction.len() + 1,
            count: 1,
        }
    }

    fn queued() -> Value {
        Value::SimpleString("QUEUED".to_owned())
    }

    #[test]
    fn commands_are_written_out_and_the_reply_found_among_theirs() {
        let names = |commands: &Commands| -> Vec<String> {
            commands
                .cmds
                .iter()
                .map(|cmd| String::from_utf8_lossy(command::name(cmd).unwrap()).into_owned())
                .collect()
        };
        let set = redis::cmd("SET").arg("k").arg("v").to_owned();
        let single = Request::Command(&set).commands(true);
        assert_eq!(names(&single), ["ASKING", "SET"]);
        let reply = single.shape.reply(vec![Value::Okay, Value::Int(1)]);
        assert!(matches!(reply, Ok(Reply::Value(Value::Int(1)))));

        let mut transaction = redis::pipe();
        transaction.atomic().set("a", 1).incr("b", 1);
        let commands = exec_reply_of(&transaction).commands(true);
        assert_eq!(
            names(&commands),
            ["ASKING", "MULTI", "SET", "INCRBY", "EXEC"]
        );
        let exec = Value::Array(vec![Value::Okay, Value::Int(2)]);
        let replies = vec![Value::Okay, Value::Okay, queued(), queued(), exec.clone()];
        match commands.shape.reply(replies) {
            Ok(Reply::Values(values)) => assert_eq!(values, [exec]),
            _ => panic!("not the EXEC reply"),
        }
        assert!(
            commands.shape.reply(vec![Value::Okay]).is_err(),
            "a reply count other than the commands'"
        );
    }

    #[test]
    fn a_command_refused_as_it_was_queued_is_the_transaction_error() {
        let mut transaction = redis::pipe();
        transaction.atomic().set("a", 1).set("b", 2);
        let shape = exec_reply_of(&transaction).commands(false).shape;
        let execabort = || {
            error_reply(
                "EXECABORT",
                "Transaction discarded because of previous errors.",
            )
        };
        let refused = shape.reply(vec![
            Value::Okay,
            error_reply("ERR", "wrong number of arguments"),
            error_reply("MOVED", "3999 127.0.0.1:7001"),
            execabort(),
        ]);
        let error = refused.err().expect("an aborted transaction is an error");
        assert_eq!(crate::retry::refusal_of(&error), Some("MOVED"));
        let failed = shape.reply(vec![
            Value::Okay,
            queued(),
            error_reply("ERR", "wrong number of arguments"),
            execabort(),
        ]);
        let error = failed.err().expect("an aborted transaction is an error");
        assert_eq!(error.code(), Some("ERR"));
    }

    #[test]
    fn nothing_blocks_within_multi() {
        let mut plain = redis::pipe();
        plain.cmd("BLPOP").arg("k").arg(0);
        let mut atomic = plain.clone();
        atomic.atomic();
        let request = |pipeline| Request::Pipeline {
            pipeline,
            offset: 0,
            count: 1,
        };
        assert!(request(&plain).blocking().is_some());
        assert!(request(&atomic).blocking().is_none());
    }

    #[test]
    fn a_transaction_discarded_for_readonly_is_a_readonly_refusal() {
        let cmd = redis::cmd("EXEC");
        let reply = Reply::Value(error_reply(
            "EXECABORT",
            "Transaction discarded because of: READONLY You can't write against a read only replica.",
        ));
        let refusal = Request::Command(&cmd).refusal(&reply, false);
        assert_eq!(refusal.map(|(_, code)| code), Some("READONLY"));
        let ok = Reply::Value(Value::Okay);
        assert!(Request::Command(&cmd).refusal(&ok, false).is_none());
    }
}
