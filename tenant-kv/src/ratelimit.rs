//! Rate limits kept in Redis (GCRA), so that every instance of a service
//! shares them: request rates, login throttles.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

    /// The time one unit books, in whole µs (the scripts count in them).
    pub(crate) fn interval_us(&self) -> u64 {
        let period = u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX);
        (period / u64::from(self.count)).max(1)
    }

    /// The time a full burst books: the window of `RateLimit-Policy`.
    pub fn window(&self) -> Duration {
        Duration::from_micros(self.interval_us().saturating_mul(u64::from(self.burst)))
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

/// Refusals still in force, by limit: GCRA never lets a unit through
/// before the time it named when refusing one (every instance's bookings
/// only push that time back), so until then a refusal can be answered
/// again without asking Redis. A flood past a limit costs no round trip.
#[derive(Debug, Default)]
pub(crate) struct Refusals(Mutex<HashMap<String, (Instant, RateLimitStatus)>>);

/// Limits whose refusals are kept at once; past this, the lapsed go.
const MAX_REFUSALS: usize = 10_000;

impl Refusals {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, RateLimitStatus)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The refusal of the limit kept at `key`, if it is still in force,
    /// with the time left.
    pub(crate) fn active(&self, key: &str, now: Instant) -> Option<RateLimitStatus> {
        let map = self.map();
        let (until, status) = map.get(key).filter(|(until, _)| *until > now)?;
        let left = until.duration_since(now);
        Some(RateLimitStatus {
            retry_after: Some(left),
            reset: status
                .reset
                .saturating_sub(status.retry_after.unwrap_or_default() - left),
            ..status.clone()
        })
    }

    /// Whether any refusal is kept: none, nearly always, and then a caller
    /// need not even make the key to look up.
    pub(crate) fn any(&self) -> bool {
        !self.map().is_empty()
    }

    fn record(&self, key: &str, status: &RateLimitStatus, now: Instant) {
        let Some(retry_after) = status.retry_after else {
            return;
        };
        let mut map = self.map();
        if map.len() >= MAX_REFUSALS {
            map.retain(|_, (until, _)| *until > now);
        }
        map.insert(key.to_owned(), (now + retry_after, status.clone()));
    }
}

/// Books one unit against every limit, in one round trip, or against
/// none of them if one refuses it (answered from `refusals` while an
/// earlier refusal is in force). Rate state needs no replica (a failover
/// that loses some only eases a limit for a moment), so `client` should
/// not wait for any.
pub(crate) async fn book(
    client: &FailoverClient,
    refusals: &Refusals,
    checks: &[Check],
) -> Result<Vec<RateLimitStatus>> {
    let now = Instant::now();
    if let Some(refused) = checks
        .iter()
        .find_map(|check| refusals.active(&check.key, now))
    {
        return Ok(vec![refused]);
    }
    if checks.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&str> = checks.iter().map(|check| check.key.as_str()).collect();
    let mut command = RATE_LIMIT.command(&keys);
    for check in checks {
        command.arg(check.rate.interval_us()).arg(check.rate.burst);
    }
    let replies: Vec<u64> = RATE_LIMIT.run(client, &command, true).await?;
    let statuses: Vec<RateLimitStatus> = checks
        .iter()
        .zip(replies.chunks_exact(4))
        .map(|(check, reply)| {
            let [allowed, remaining, retry_us, reset_us] =
                <[u64; 4]>::try_from(reply).expect("chunks of four");
            RateLimitStatus {
                policy: check.policy,
                quota: check.rate.burst,
                window: check.rate.window(),
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                reset: Duration::from_micros(reset_us),
                retry_after: (allowed == 0).then(|| Duration::from_micros(retry_us.max(1))),
            }
        })
        .collect();
    for (check, status) in checks.iter().zip(&statuses) {
        refusals.record(&check.key, status, now);
    }
    Ok(statuses)
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
    fn a_refusal_stands_until_its_time_then_lapses() {
        let (refusals, t0) = (Refusals::default(), Instant::now());
        let refused = status("tenant", 0, Some(300));
        refusals.record("k", &refused, t0);
        refusals.record("other", &status("tenant", 4, None), t0);
        let later = t0 + Duration::from_millis(100);
        let again = refusals.active("k", later).unwrap();
        assert_eq!(again.retry_after, Some(Duration::from_millis(200)));
        assert_eq!((again.policy, again.remaining), ("tenant", 0));
        assert_eq!(refusals.active("k", t0 + Duration::from_millis(300)), None);
        assert_eq!(refusals.active("other", t0), None, "only refusals are kept");
    }

    #[test]
    fn rates_and_windows() {
        let rate = Rate::per_minute(30).burst(10);
        assert_eq!(rate.interval_us(), 2_000_000);
        assert_eq!(rate.window(), Duration::from_secs(20));
        assert_eq!(Rate::per_second(3).interval_us(), 333_333);
        assert_eq!(Rate::per_second(0), Rate::per_second(1));
        assert!(Rate::new(0, Duration::from_secs(1)).is_none());
        assert!(Rate::new(1, Duration::ZERO).is_none());
    }
}
