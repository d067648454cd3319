//! Tokens whose signature this server checked already: a request bearing
//! one again skips the decoding and the signature check (an HMAC, or an
//! RSA or ECDSA verification), about a tenth of a GET's CPU.
//!
//! A token is immutable and its signature does not expire, so what was
//! checked once holds until the token's `exp`, which every hit checks
//! again: the cache never lets a token live longer. Only verified tokens
//! are kept (a flood of forged ones fills nothing), at most [`CAPACITY`]:
//! past it, the expired go, and if that is not enough, all of them.
//!
//! Tokens are found by a keyed hash of their last [`DIGESTED`] bytes (the
//! signature's end, which differs between any two tokens), not of the
//! whole token: hashing a few hundred bytes cost more than the rest of
//! the lookup. A hit is compared whole; two tokens of one digest take
//! turns in the cache, each verified again when it finds the other there.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

/// The most tokens kept (a few hundred bytes each).
pub(crate) const CAPACITY: usize = 10_000;

/// How many bytes of a token's end its digest covers.
const DIGESTED: usize = 32;

/// Each verified token, whole, with its claims and `exp` (seconds since
/// the Unix epoch), by its digest.
type Tokens<C> = HashMap<u64, (Box<str>, Arc<C>, u64)>;

/// Verified tokens and their claims.
pub(crate) struct VerifiedTokens<C> {
    tokens: Mutex<Tokens<C>>,
    /// Keys the digests: random per process, so nobody can aim at one.
    digests: RandomState,
}

impl<C> Default for VerifiedTokens<C> {
    fn default() -> Self {
        Self {
            tokens: Mutex::default(),
            digests: RandomState::new(),
        }
    }
}

impl<C> VerifiedTokens<C> {
    fn tokens(&self) -> MutexGuard<'_, Tokens<C>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn digest(&self, token: &str) -> u64 {
        let bytes = token.as_bytes();
        self.digests
            .hash_one(&bytes[bytes.len().saturating_sub(DIGESTED)..])
    }

    /// The claims of `token` if it was verified and, at `now` (seconds
    /// since the Unix epoch), is not past its `exp` by more than `leeway`.
    pub(crate) fn get(&self, token: &str, now: u64, leeway: u64) -> Option<Arc<C>> {
        let digest = self.digest(token);
        let mut tokens = self.tokens();
        let (kept, claims, exp) = tokens.get(&digest)?;
        if **kept != *token {
            return None;
        }
        if exp.saturating_add(leeway) < now {
            tokens.remove(&digest);
            return None;
        }
        Some(Arc::clone(claims))
    }

    /// Keeps `token`, just verified, with its claims and `exp`.
    pub(crate) fn insert(&self, token: &str, claims: Arc<C>, exp: u64, now: u64, leeway: u64) {
        let digest = self.digest(token);
        let mut tokens = self.tokens();
        if tokens.len() >= CAPACITY {
            tokens.retain(|_, (_, _, exp)| exp.saturating_add(leeway) >= now);
            if tokens.len() >= CAPACITY {
                tokens.clear();
            }
        }
        tokens.insert(digest, (token.into(), claims, exp));
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
    fn tokens_sharing_their_end_are_told_apart() {
        let tokens = VerifiedTokens::default();
        let end = "s".repeat(DIGESTED);
        let (a, b) = (format!("a.{end}"), format!("b.{end}"));
        tokens.insert(&a, Arc::new("a"), 200, 100, 0);
        assert_eq!(tokens.get(&a, 100, 0).as_deref(), Some(&"a"));
        assert!(tokens.get(&b, 100, 0).is_none(), "only its end is shared");
        tokens.insert(&b, Arc::new("b"), 200, 100, 0);
        assert_eq!(tokens.get(&b, 100, 0).as_deref(), Some(&"b"));
        assert!(tokens.get(&a, 100, 0).is_none(), "replaced: verified again");
        assert!(tokens.get("", 100, 0).is_none());
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
