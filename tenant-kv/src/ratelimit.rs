//! Rate limits kept in Redis (GCRA), so that every instance of a service
//! shares them: request rates, login throttles.

use std::time::Duration;

use redis_failover::FailoverClient;

use crate::error::{Error, Result};
use crate::scripts::RATE_LIMIT;

/// A rate: `count` units per `period` on average, and at most `burst` at
/// once (by default `count`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    count: u32,
    period: Duration,
    burst: u32,
}

impl Rate {
    /// `count` per `period`, `count` at once; `None` if either is zero.
    pub fn new(count: u32, period: Duration) -> Option<Self> {
        (count > 0 && !period.is_zero()).then_some(Self {
            count,
            period,
            burst: count,
        })
    }

    /// `count` per second (at least 1).
    pub fn per_second(count: u32) -> Self {
        Self::new(count.max(1), Duration::from_secs(1)).expect("positive")
    }

    /// `count` per minute (at least 1).
    pub fn per_minute(count: u32) -> Self {
        Self::new(count.max(1), Duration::from_secs(60)).expect("positive")
    }

    /// At most `burst` (at least 1) at once.
    #[must_use]
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst.max(1);
        self
    }

    /// How many at once.
    pub fn burst_size(&self) -> u32 {
        self.burst
    }

    /// The time one unit books.
    pub(crate) fn interval_ms(&self) -> f64 {
        self.period.as_secs_f64() * 1000.0 / f64::from(self.count)
    }

    /// The time a full burst books: the window of `RateLimit-Policy`.
    pub fn window(&self) -> Duration {
        Duration::from_secs_f64(self.interval_ms() * f64::from(self.burst) / 1000.0)
    }
}

/// What one rate limit said about one unit (a request, a login attempt):
/// the figures of the `RateLimit-Policy` and `RateLimit` HTTP fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitStatus {
    /// Which limit: `tenant`, `api_key`, `login_username` or `login_address`.
    pub policy: &'static str,
    /// How many units fit in a [`window`](Self::window) at most.
    pub quota: u32,
    /// The time in which a full quota is booked back.
    pub window: Duration,
    /// How many more units would be allowed now.
    pub remaining: u32,
    /// When nothing is booked ahead any more (the full quota is back).
    pub reset: Duration,
    /// Set when this unit was refused: when it would be allowed.
    pub retry_after: Option<Duration>,
}

/// One limit to book a unit against.
pub(crate) struct Check {
    pub(crate) policy: &'static str,
    pub(crate) key: String,
    pub(crate) rate: Rate,
}

/// Books one unit against every limit, in one round trip. A unit refused
/// by one limit is still booked against the others, which only makes
/// them stricter.
pub(crate) async fn book(
    client: &FailoverClient,
    checks: &[Check],
) -> Result<Vec<RateLimitStatus>> {
    if checks.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipeline = redis::pipe();
    for check in checks {
        pipeline.add_command(
            RATE_LIMIT
                .command(&[&check.key])
                .arg(format!("{:.3}", check.rate.interval_ms()))
                .arg(check.rate.burst)
                .arg(1)
                .clone(),
        );
    }
    let replies: Vec<(u8, u32, u64, u64)> = RATE_LIMIT.run_pipeline(client, &pipeline).await?;
    Ok(checks
        .iter()
        .zip(replies)
        .map(
            |(check, (booked, remaining, retry_ms, reset_ms))| RateLimitStatus {
                policy: check.policy,
                quota: check.rate.burst,
                window: check.rate.window(),
                remaining,
                reset: Duration::from_millis(reset_ms),
                retry_after: (booked == 0).then(|| Duration::from_millis(retry_ms.max(1))),
            },
        )
        .collect())
}

/// The status to report of a unit booked against `statuses`: the refusal
/// that lasts longest if any limit refused (`Err`), else the limit with
/// the least left.
pub(crate) fn verdict(
    statuses: Vec<RateLimitStatus>,
) -> std::result::Result<Option<RateLimitStatus>, RateLimitStatus> {
    if let Some(refused) = statuses
        .iter()
        .filter(|s| s.retry_after.is_some())
        .max_by_key(|s| s.retry_after)
    {
        return Err(refused.clone());
    }
    Ok(statuses.into_iter().min_by_key(|s| s.remaining))
}

impl From<RateLimitStatus> for Error {
    fn from(status: RateLimitStatus) -> Self {
        Error::RequestRateLimited { status }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(policy: &'static str, remaining: u32, retry_ms: Option<u64>) -> RateLimitStatus {
        RateLimitStatus {
            policy,
            quota: 10,
            window: Duration::from_secs(1),
            remaining,
            reset: Duration::ZERO,
            retry_after: retry_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn the_tightest_limit_is_reported() {
        let allowed = verdict(vec![status("tenant", 5, None), status("api_key", 2, None)]);
        assert_eq!(allowed.unwrap().unwrap().policy, "api_key");
        let refused = verdict(vec![
            status("tenant", 0, Some(100)),
            status("api_key", 0, Some(300)),
            status("x", 9, None),
        ]);
        assert_eq!(refused.unwrap_err().policy, "api_key");
        assert_eq!(verdict(Vec::new()).unwrap(), None);
    }

    #[test]
    fn rates_and_windows() {
        let rate = Rate::per_minute(30).burst(10);
        assert_eq!(rate.interval_ms(), 2000.0);
        assert_eq!(rate.window(), Duration::from_secs(20));
        assert_eq!(Rate::per_second(0), Rate::per_second(1));
        assert!(Rate::new(0, Duration::from_secs(1)).is_none());
        assert!(Rate::new(1, Duration::ZERO).is_none());
    }
}
