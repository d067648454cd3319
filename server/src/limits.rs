use std::time::Duration;

use crate::error::SettingError;

const MAX_CONNECTIONS: usize = 1_000_000;

/// What one request and the whole server may take.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest request body; a larger one gets 413. Defaults to 1 MiB.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers); a larger one gets
    /// 431. At least 8192. Defaults to 16 KiB.
    pub max_header_bytes: usize,
    /// Longest request target (path and query); a longer one gets 414.
    /// Defaults to 8 KiB.
    pub max_uri_bytes: usize,
    /// Most operations in one batch. Defaults to 100.
    pub max_batch: usize,
    /// Time to answer a request, body included; past it, 503. Defaults to 10 s.
    pub request_timeout: Duration,
    /// Open connections at most (up to 1,000,000); more wait to be
    /// accepted. Defaults to 1024.
    pub max_connections: usize,
    /// Open connections at most from one client address (an IPv6 client's
    /// /64); more are closed at once. 0 for no cap (behind a proxy, every
    /// connection comes from the proxy). Defaults to 128.
    pub max_connections_per_address: usize,
    /// Time an answer may wait for the client to read any of it; past it,
    /// the connection is closed (a client that stops reading, or
    /// pipelines requests and never reads, keeps nothing). Defaults to 10 s.
    pub send_timeout: Duration,
    /// Time a request's body may stall (nothing more of it arriving) once
    /// it is read; past it, 408. A body that trickles in stays bounded by
    /// `request_timeout`, which it must be shorter than. Defaults to 5 s.
    pub body_timeout: Duration,
    /// On shutdown, time in-flight requests get to finish. Defaults to 10 s.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_header_bytes: 16 << 10,
            max_uri_bytes: 8 << 10,
            max_batch: 100,
            request_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_connections_per_address: 128,
            send_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Checks that every limit can work.
    pub fn validate(&self) -> Result<(), SettingError> {
        let positive = [
            ("max_body_bytes", self.max_body_bytes),
            ("max_uri_bytes", self.max_uri_bytes),
            ("max_batch", self.max_batch),
            ("max_connections", self.max_connections),
        ];
        for (setting, value) in positive {
            if value == 0 {
                return Err(SettingError::invalid(setting, "must be at least 1"));
            }
        }
        // Past this, tokio's semaphore refuses the permits.
        if self.max_connections > MAX_CONNECTIONS {
            return Err(SettingError::invalid(
                "max_connections",
                format!("must be at most {MAX_CONNECTIONS}"),
            ));
        }
        // hyper cannot parse a request head in a smaller buffer.
        if self.max_header_bytes < 8192 {
            return Err(SettingError::invalid(
                "max_header_bytes",
                "must be at least 8192",
            ));
        }
        for (setting, value) in [
            ("request_timeout", self.request_timeout),
            ("send_timeout", self.send_timeout),
            ("body_timeout", self.body_timeout),
        ] {
            if value.is_zero() {
                return Err(SettingError::invalid(setting, "must be longer than 0"));
            }
        }
        if self.body_timeout >= self.request_timeout {
            return Err(SettingError::invalid(
                "body_timeout",
                "must be shorter than request_timeout, so that a late body gets 408",
            ));
        }
        Ok(())
    }
}
