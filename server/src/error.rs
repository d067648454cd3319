use std::path::PathBuf;

use hyper::StatusCode;
use thiserror::Error;

/// A setting that cannot work.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SettingError {
    /// The setting's value is wrong, or missing where it is needed.
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        /// The setting's name (its environment variable is `SERVER_` and the name in upper case).
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The settings file cannot be read or parsed, or holds an unknown setting.
    #[error("cannot use the settings file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl SettingError {
    pub(crate) fn invalid(setting: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            setting,
            reason: reason.into(),
        }
    }
}

/// Why the service could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting cannot work.
    #[error(transparent)]
    Setting(#[from] SettingError),
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Redis client could not be set up.
    #[error("cannot set up the Redis client")]
    Redis(#[source] Box<redis_failover::Error>),
    /// The key-value store could not be set up or used.
    #[error("key-value store request failed")]
    Store(#[source] Box<tenant_kv::Error>),
    /// The log buffer or offloader could not be set up.
    #[error("cannot set up log shipping")]
    Logs(#[from] log_buffer::Error),
    /// Redis holds data in a storage layout this version does not serve:
    /// layout 1, to migrate first with `server migrate`, or a newer one.
    #[error(
        "Redis holds tenant-kv data in storage layout {found}, and this server serves layout 2 only{}",
        migrate_advice(found)
    )]
    StorageLayout {
        /// The layout found.
        found: String,
    },
    /// The local Redis topology of the dev mode could not start.
    #[cfg(feature = "dev")]
    #[error("cannot start the local Redis topology")]
    Topology(#[source] Box<redis_topology::Error>),
}

fn migrate_advice(found: &str) -> &'static str {
    if found == "1" {
        ": run `server migrate` with the same settings (servers of this version may start once it prints `prepared`)"
    } else {
        ""
    }
}

impl Error {
    /// The error of a storage layout check: [`Error::StorageLayout`] for a
    /// layout the store does not serve.
    pub fn from_layout(error: tenant_kv::Error) -> Self {
        match error {
            tenant_kv::Error::UnsupportedLayout { found } => Self::StorageLayout { found },
            other => other.into(),
        }
    }
}

// Boxed: these errors are large, and `Error` travels on every start-up path.
impl From<redis_failover::Error> for Error {
    fn from(error: redis_failover::Error) -> Self {
        Self::Redis(Box::new(error))
    }
}

impl From<tenant_kv::Error> for Error {
    fn from(error: tenant_kv::Error) -> Self {
        Self::Store(Box::new(error))
    }
}

#[cfg(feature = "dev")]
impl From<redis_topology::Error> for Error {
    fn from(error: redis_topology::Error) -> Self {
        Self::Topology(Box::new(error))
    }
}

/// An error answered to an HTTP client: `{"error": {"code", "message"}}`.
/// An error type too, so that a tower layer can refuse a request with one.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    /// Seconds, for `Retry-After`.
    pub(crate) retry_after: Option<u64>,
    /// Methods for `Allow`, with 405.
    pub(crate) allow: Option<String>,
    /// The rate limit that refused the request, for the `RateLimit` fields.
    pub(crate) rate_limit: Option<Box<tenant_kv::RateLimitStatus>>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: None,
            rate_limit: None,
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub(crate) fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            message,
        )
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }
}

impl ApiError {
    /// A failure of Redis itself, by its kind.
    fn from_redis(source: &redis_failover::Error) -> Self {
        use redis_failover::ErrorKind as K;
        let retry_soon = |code, message| Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        };
        match source.kind() {
            K::OutcomeUnknown => retry_soon(
                "outcome_unknown",
                "the master failed while the write was in flight: it may or may not have been applied; read before retrying",
            ),
            K::NotReplicated => retry_soon(
                "not_replicated",
                "the write was applied but no replica confirmed it in time, so a failover could lose it; retry",
            ),
            // Refusals that last until an operator acts: answered at once,
            // never retried inside the budget.
            K::OutOfMemory | K::PersistenceFailing => {
                tracing::error!(error = %source, "the master refuses writes");
                let (code, message) = if source.kind() == K::OutOfMemory {
                    (
                        "store_full",
                        "the store is out of memory and refuses writes; retry later",
                    )
                } else {
                    (
                        "store_not_persisting",
                        "the store cannot persist data and refuses writes; retry later",
                    )
                };
                Self {
                    retry_after: Some(30),
                    ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
                }
            }
            K::Unavailable | K::Connect | K::NoReplica => {
                tracing::warn!(error = %source, cause = ?std::error::Error::source(source), "Redis unreachable past the retry budget");
                Self::unavailable("the store is unavailable; retry later")
            }
            _ => {
                tracing::error!(error = %source, cause = ?std::error::Error::source(source), "Redis refused a request of the store");
                Self::internal("the request failed on the server")
            }
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
fn seconds(wait: std::time::Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

impl From<tenant_kv::Error> for ApiError {
    fn from(error: tenant_kv::Error) -> Self {
        use tenant_kv::Error as E;
        let message = error.to_string();
        match error {
            E::InvalidKey { .. } => Self::new(StatusCode::BAD_REQUEST, "invalid_key", message),
            E::InvalidItem { .. } => Self::new(StatusCode::BAD_REQUEST, "invalid_item", message),
            E::InvalidCursor => Self::new(StatusCode::BAD_REQUEST, "invalid_cursor", message),
            E::InvalidApiKeySettings { .. } | E::InvalidUser { .. } | E::InvalidTenantId { .. } => {
                Self::bad_request(message)
            }
            E::NotFound { .. } | E::UnknownApiKey { .. } | E::UnknownUser { .. } => {
                Self::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            E::AlreadyExists { .. } | E::UserExists { .. } | E::ApiKeyChanged { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", message)
            }
            E::VersionConflict { .. } => Self::precondition_failed(message),
            E::QuotaExceeded { .. } => Self::new(StatusCode::FORBIDDEN, "quota_exceeded", message),
            E::RateLimited { retry_after } => Self {
                retry_after: Some(seconds(retry_after)),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
            },
            E::RequestRateLimited { status } => Self {
                retry_after: Some(seconds(status.retry_after.unwrap_or_default())),
                rate_limit: Some(Box::new(status)),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
            },
            E::LoginThrottled { retry_after } => Self {
                retry_after: Some(seconds(retry_after)),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "login_throttled", message)
            },
            E::Overloaded { retry_after } => Self {
                retry_after: Some(seconds(retry_after)),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
            },
            E::InvalidCredentials | E::InvalidApiKey => Self::unauthorized(message),
            E::BatchFailed { index, source } => {
                let inner = Self::from(*source);
                Self {
                    message: format!(
                        "operation {index} failed, so none was done: {}",
                        inner.message
                    ),
                    ..inner
                }
            }
            E::UnsupportedLayout { .. } => {
                tracing::error!(error = %message, "the store refuses the data in Redis");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unsupported_layout",
                    "the store cannot serve the data in Redis until it is migrated",
                )
            }
            E::Redis(source) => Self::from_redis(&source),
            other => {
                tracing::error!(error = %other, "store request failed");
                Self::internal("the request failed on the server")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn store_errors_map_to_precise_statuses() {
        let limited = ApiError::from(tenant_kv::Error::RateLimited {
            retry_after: Duration::from_millis(1200),
        });
        assert_eq!(
            (limited.status, limited.code),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
        );
        assert_eq!(limited.retry_after, Some(2));
        let quota = ApiError::from(tenant_kv::Error::QuotaExceeded {
            what: "keys",
            limit: 10,
            would_be: 11,
        });
        assert_eq!(
            (quota.status, quota.code),
            (StatusCode::FORBIDDEN, "quota_exceeded")
        );
        let batch = ApiError::from(tenant_kv::Error::BatchFailed {
            index: 3,
            source: Box::new(tenant_kv::Error::VersionConflict {
                key: "k".to_owned(),
                expected: 1,
                current: Some(2),
            }),
        });
        assert_eq!(batch.status, StatusCode::PRECONDITION_FAILED);
        assert!(
            batch.message.starts_with("operation 3 failed"),
            "{}",
            batch.message
        );
    }

    #[test]
    fn a_full_or_failing_store_is_503_with_a_code_of_its_own() {
        for (code, expected) in [("OOM", "store_full"), ("MISCONF", "store_not_persisting")] {
            let refusal = redis_failover::Error::Command {
                node: "redis-0:6379".parse().unwrap(),
                source: redis::make_extension_error(code.to_owned(), Some("refused".to_owned())),
            };
            let answer = ApiError::from_redis(&refusal);
            assert_eq!(
                (answer.status, answer.code),
                (StatusCode::SERVICE_UNAVAILABLE, expected)
            );
            assert_eq!(answer.retry_after, Some(30));
        }
    }
}
