//! How long to wait before the next try: one exponential backoff with
//! jitter for every crate of the workspace that retries.

use std::time::Duration;

use rand::Rng;

use crate::error::{Error, Result};

/// Exponential backoff with jitter: try `n` (from 0) waits between half and
/// all of `min(cap, base * 2^n)`, so that callers failing together spread
/// out, and none retries in a hot loop.
///
/// ```
/// use std::time::Duration;
/// use redis_failover::Backoff;
///
/// let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2))?;
/// let wait = backoff.delay(3); // between 400 and 800 ms
/// assert!(wait >= Duration::from_millis(400) && wait <= Duration::from_millis(800));
/// # Ok::<(), redis_failover::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Backoff {
    /// From `base` (the first wait's ceiling, above zero) to `cap` (at
    /// least `base`).
    pub fn new(base: Duration, cap: Duration) -> Result<Self> {
        if base.is_zero() || cap < base {
            return Err(Error::InvalidConfig {
                setting: "backoff",
                reason: "needs a base above zero and a cap not below it".to_owned(),
            });
        }
        Ok(Self { base, cap })
    }

    /// For settings known to be valid (`base` above zero, `cap` not below
    /// it), in a constant.
    pub(crate) const fn constant(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The first wait's ceiling.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest wait.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The wait before try `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, &mut rand::rng())
    }

    /// Like [`delay`](Self::delay), with the jitter drawn from `rng`.
    pub fn delay_with(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self
            .base
            .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap);
        let half = ceiling / 2;
        half + half.mul_f64(rng.random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(1)).unwrap();
        assert_eq!(
            (backoff.base(), backoff.cap()),
            (Duration::from_millis(1), Duration::from_millis(1))
        );
    }

    proptest! {
        #[test]
        fn a_wait_is_between_half_and_all_of_the_capped_exponential(
            attempt in 0u32..100,
            base_ms in 1u64..1_000,
            cap_ms in 1_000u64..60_000,
            seed in any::<u64>(),
        ) {
            use rand::SeedableRng;
            let backoff = Backoff::new(Duration::from_millis(base_ms), Duration::from_millis(cap_ms)).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let wait = backoff.delay_with(attempt, &mut rng);
            let ceiling = Duration::from_millis(
                base_ms.saturating_mul(1u64 << attempt.min(40)).min(cap_ms),
            );
            prop_assert!(wait <= ceiling, "{wait:?} > {ceiling:?}");
            prop_assert!(wait >= ceiling / 2, "{wait:?} < half of {ceiling:?}");
        }
    }
}
