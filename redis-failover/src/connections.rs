//! The [`ConnectionLike`] views of a [`FailoverClient`]: for redis-rs's
//! own API (`query_async`, pipelines), routed like the client's requests.

use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::addr::NodeAddr;
use crate::client::FailoverClient;
use crate::error::Error;
use crate::request::{Reply, Request};

/// A [`ConnectionLike`] handle on the current master, from
/// [`FailoverClient::connection`] or [`FailoverClient::idempotent_connection`].
#[derive(Clone, Debug)]
pub struct MasterConnection {
    pub(crate) client: FailoverClient,
    pub(crate) idempotent: bool,
}

impl MasterConnection {
    async fn execute(&mut self, request: Request<'_>) -> redis::RedisResult<Reply> {
        match self.client.send(request, self.idempotent).await {
            Ok((_, reply)) => Ok(reply),
            Err(error) => Err(error.into_redis_error()),
        }
    }
}

/// A [`ConnectionLike`] handle for reads routed by a read policy, from
/// [`FailoverClient::read_connection`].
#[derive(Clone, Debug)]
pub struct ReadConnection {
    pub(crate) client: FailoverClient,
}

impl ReadConnection {
    async fn execute(&mut self, request: Request<'_>) -> redis::RedisResult<Reply> {
        match self.client.send_read(request, None).await {
            Ok((_, reply)) => Ok(reply),
            Err(error) => Err(error.into_redis_error()),
        }
    }
}

/// Implements [`ConnectionLike`] for a handle with an
/// `execute(&mut self, Request) -> RedisResult<Reply>` method.
macro_rules! connection_like {
    ($handle:ty) => {
        impl ConnectionLike for $handle {
            fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
                Box::pin(async move {
                    match self.execute(Request::Command(cmd)).await? {
                        Reply::Value(value) => Ok(value),
                        Reply::Values(_) => unreachable!("a command gets one reply"),
                    }
                })
            }

            fn req_packed_commands<'a>(
                &'a mut self,
                pipeline: &'a Pipeline,
                offset: usize,
                count: usize,
            ) -> RedisFuture<'a, Vec<Value>> {
                Box::pin(async move {
                    let request = Request::Pipeline {
                        pipeline,
                        offset,
                        count,
                    };
                    match self.execute(request).await? {
                        Reply::Values(values) => Ok(values),
                        Reply::Value(_) => unreachable!("a pipeline gets a list of replies"),
                    }
                })
            }

            fn get_db(&self) -> i64 {
                0
            }
        }
    };
}

connection_like!(MasterConnection);
connection_like!(ReadConnection);

/// A handle that keeps the typed error of a failed request, for
/// [`FailoverClient::query_pipeline`] and [`FailoverClient::read_pipeline`],
/// and the node that answered.
pub(crate) struct Typed {
    pub(crate) client: FailoverClient,
    /// Route by the read policy instead of to the master.
    pub(crate) read: bool,
    pub(crate) failure: Option<Error>,
    pub(crate) node: Option<NodeAddr>,
}

impl Typed {
    async fn execute(&mut self, request: Request<'_>) -> redis::RedisResult<Reply> {
        let result = if self.read {
            self.client.send_read(request, None).await
        } else {
            self.client.send(request, false).await
        };
        match result {
            Ok((node, reply)) => {
                self.node = Some(node);
                Ok(reply)
            }
            Err(error) => {
                let reported = redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "request failed",
                    error.to_string(),
                ));
                self.failure = Some(error);
                Err(reported)
            }
        }
    }
}

connection_like!(Typed);
