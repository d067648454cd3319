//! The crate's error type.

/// Why a log-buffer call failed.
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

    /// Redis could not be reached within the failover client's retry
    /// budget, or refused a command.
    #[error("Redis failed")]
    Redis(#[from] redis_failover::Error),
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
