//! Tokens whose signature this server checked already: a request bearing
//! one again skips the decoding and the signature check (an HMAC, or an
//! RSA or ECDSA verification), about a tenth of a GET's CPU.
//!
//! A token is immutable and its signature does not expire, so what was
//! checked once holds until the token's `exp`, which every hit checks
//! again: the cache never lets a token live longer. Only verified tokens
//! are kept (a flood of forged ones fills nothing), at most [`CAPACITY`]:
//! past it, the expired go, and if that is not enough, all of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The most tokens kept (a few hundred bytes each).
pub(crate) const CAPACITY: usize = 10_000;

/// Each verified token's claims and `exp` (seconds since the Unix epoch).
type Tokens<C> = HashMap<Box<str>, (Arc<C>, u64)>;

/// Verified tokens and their claims.
pub(crate) struct VerifiedTokens<C> {
    tokens: Mutex<Tokens<C>>,
}

impl<C> Default for VerifiedTokens<C> {
    fn default() -> Self {
        Self {
            tokens: Mutex::default(),
        }
    }
}

impl<C> VerifiedTokens<C> {
    fn tokens(&self) -> MutexGuard<'_, Tokens<C>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The claims of `token` if it was verified and, at `now` (seconds
    /// since the Unix epoch), is not past its `exp` by more than `leeway`.
    pub(crate) fn get(&self, token: &str, now: u64, leeway: u64) -> Option<Arc<C>> {
        let mut tokens = self.tokens();
        let (claims, exp) = tokens.get(token)?;
        if exp.saturating_add(leeway) < now {
            tokens.remove(token);
            return None;
        }
        Some(Arc::clone(claims))
    }

    /// Keeps `token`, just verified, with its claims and `exp`.
    pub(crate) fn insert(&self, token: &str, claims: Arc<C>, exp: u64, now: u64, leeway: u64) {
        let mut tokens = self.tokens();
        if tokens.len() >= CAPACITY {
            tokens.retain(|_, (_, exp)| exp.saturating_add(leeway) >= now);
            if tokens.len() >= CAPACITY {
                tokens.clear();
            }
        }
        tokens.insert(token.into(), (claims, exp));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tokens().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_served_until_its_exp_and_leeway_pass() {
        let tokens = VerifiedTokens::default();
        assert!(tokens.get("t", 100, 5).is_none());
        tokens.insert("t", Arc::new("claims"), 200, 100, 5);
        assert_eq!(tokens.get("t", 205, 5).as_deref(), Some(&"claims"));
        assert!(tokens.get("t", 206, 5).is_none(), "past exp and leeway");
        assert_eq!(tokens.len(), 0, "an expired token is dropped");
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let tokens = VerifiedTokens::default();
        for i in 0..CAPACITY {
            // Half expire at 50, half live on.
            let exp = if i % 2 == 0 { 50 } else { 500 };
            tokens.insert(&i.to_string(), Arc::new(i), exp, 10, 0);
        }
        assert_eq!(tokens.len(), CAPACITY);
        tokens.insert("new", Arc::new(0), 500, 100, 0);
        assert_eq!(tokens.len(), CAPACITY / 2 + 1, "the expired went first");
        for i in 0..CAPACITY {
            tokens.insert(&format!("live{i}"), Arc::new(i), 500, 100, 0);
        }
        assert!(tokens.len() <= CAPACITY);
    }
}
