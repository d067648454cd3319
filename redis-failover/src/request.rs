//! What a request sends, and how to read refusals in what comes back.

use redis::aio::MultiplexedConnection;
use redis::{Cmd, Pipeline, RedisError, ServerError, Value};

use crate::retry::{is_read_only, refused_without_running};

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

    /// Whether sending it twice is harmless because it changes nothing.
    pub(crate) fn is_read_only(self) -> bool {
        match self {
            Self::Command(cmd) => is_read_only(cmd),
            Self::Pipeline { pipeline, .. } => {
                !pipeline.is_transaction() && pipeline.cmd_iter().all(is_read_only)
            }
        }
    }

    /// Redis answers `READONLY` and the like in-band, as error replies. When
    /// `reply` shows the node refused this request without running any of
    /// it, the refusal as an error; `None` when the reply is the caller's.
    ///
    /// In a plain pipeline, replies that are not errors must belong to
    /// read-only commands: a write that ran must not run twice.
    pub(crate) fn refusal(self, reply: &Reply) -> Option<RedisError> {
        let errors: Vec<&ServerError> = match reply {
            Reply::Value(value) => server_error(value).into_iter().collect(),
            Reply::Values(values) => values.iter().filter_map(server_error).collect(),
        };
        if !refused_without_running(&errors) {
            return None;
        }
        if let (
            Self::Pipeline {
                pipeline, offset, ..
            },
            Reply::Values(values),
        ) = (self, reply)
        {
            let only_reads_ran = pipeline.is_transaction()
                || pipeline
                    .cmd_iter()
                    .skip(offset)
                    .zip(values)
                    .all(|(cmd, value)| server_error(value).is_some() || is_read_only(cmd));
            if !only_reads_ran {
                return None;
            }
        }
        Some(RedisError::from(errors[0].clone()))
    }
}

fn server_error(value: &Value) -> Option<&ServerError> {
    match value {
        Value::ServerError(error) => Some(error),
        _ => None,
    }
}
