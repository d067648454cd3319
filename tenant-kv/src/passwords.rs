//! Password hashing: argon2id (bcrypt hashes imported from elsewhere still
//! verify), run on a fixed number of blocking threads with a short queue.
//! Each hash takes 19 MiB and tens of milliseconds of a core, so a flood of
//! logins must not get a thread each: past the slots and the queue, an
//! attempt is refused at once ([`Error::Overloaded`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// The longest password accepted, in bytes.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// What a caller refused for lack of hashing slots is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A hash to check unknown usernames against, so they take as long as known ones.
pub(crate) const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$8CeSqt1f8C3sYBRE0GnCWc5d5RWq8bIPI+6VGbCFP0c";

/// Refuses an empty or overlong password before any hashing.
pub(crate) fn check_password(password: &str) -> Result<()> {
    if password.is_empty() || password.len() > MAX_PASSWORD_LEN {
        return Err(Error::InvalidUser {
            reason: format!(
                "a password is 1 to {MAX_PASSWORD_LEN} bytes, this one is {}",
                password.len()
            ),
        });
    }
    Ok(())
}

/// The hashing slots and their queue.
#[derive(Debug)]
pub(crate) struct Hasher {
    slots: Arc<Semaphore>,
    /// Callers hashing or waiting to.
    pending: AtomicUsize,
    /// Most callers hashing or waiting at once.
    capacity: usize,
}

/// Counts a caller out of `pending` when it is done or gone.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Hasher {
    /// `concurrency` hashes at once (at least 1), and `queue` callers
    /// waiting for a slot.
    pub(crate) fn new(concurrency: usize, queue: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            slots: Arc::new(Semaphore::new(concurrency)),
            pending: AtomicUsize::new(0),
            capacity: concurrency + queue,
        }
    }

    /// Runs `work` on a blocking thread once a slot is free, or refuses at
    /// once when the queue is full. A caller that goes away leaves its
    /// work running to the end, still holding its slot, so no more than
    /// the slots' threads ever hash.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Overloaded {
                retry_after: RETRY_AFTER,
            });
        }
        let _pending = Pending(&self.pending);
        let slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work()
        })
        .await
        .map_err(|error| Error::InvalidUser {
            reason: format!("password hashing failed: {error}"),
        })
    }

    /// Hashes `password` with argon2id and a random salt.
    pub(crate) async fn hash(&self, password: String) -> Result<String> {
        self.run(move || {
            let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
                .expect("16 bytes make a valid salt");
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|hash| hash.to_string())
                .map_err(|e| Error::InvalidUser {
                    reason: format!("the password cannot be hashed: {e}"),
                })
        })
        .await?
    }

    /// Checks `password` against a stored argon2 (PHC string) or bcrypt hash.
    pub(crate) async fn verify(&self, password: String, hash: String) -> Result<bool> {
        self.run(move || verify(&password, &hash)).await
    }
}

fn verify(password: &str, hash: &str) -> bool {
    if hash.starts_with("$2") {
        bcrypt::verify(password, hash).unwrap_or(false)
    } else {
        PasswordHash::new(hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
    }
}

/// Whether `hash` is a hash [`Hasher::verify`] can check.
pub(crate) fn is_known_hash(hash: &str) -> bool {
    hash.starts_with("$2") || PasswordHash::new(hash).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn argon2_and_bcrypt_hashes_both_verify() {
        let hasher = Hasher::new(1, 0);
        let argon = hasher.hash("s3cret".to_owned()).await.unwrap();
        assert!(argon.starts_with("$argon2id$"));
        assert!(hasher.verify("s3cret".into(), argon.clone()).await.unwrap());
        assert!(!hasher.verify("wrong".into(), argon).await.unwrap());
        let bcrypt = bcrypt::hash("s3cret", 4).unwrap();
        assert!(
            hasher
                .verify("s3cret".into(), bcrypt.clone())
                .await
                .unwrap()
        );
        assert!(!hasher.verify("wrong".into(), bcrypt).await.unwrap());
        assert!(
            !hasher
                .verify("s3cret".into(), "garbage".into())
                .await
                .unwrap()
        );
        assert!(is_known_hash(DECOY_HASH));
    }

    #[tokio::test]
    async fn past_the_slots_and_the_queue_callers_are_refused_at_once() {
        let hasher = Arc::new(Hasher::new(1, 1));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel();
        // One caller holds the slot until released; one waits in the queue.
        let holder = tokio::spawn({
            let hasher = Arc::clone(&hasher);
            async move {
                hasher
                    .run(move || {
                        let _ = started.send(());
                        released.recv().ok();
                    })
                    .await
            }
        });
        running.await.unwrap();
        let waiter = tokio::spawn({
            let hasher = Arc::clone(&hasher);
            async move { hasher.run(|| 7).await }
        });
        while hasher.pending.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            hasher.run(|| 0).await,
            Err(Error::Overloaded { .. })
        ));
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), 7);
        assert_eq!(hasher.pending.load(Ordering::Acquire), 0);
        assert_eq!(hasher.run(|| 1).await.unwrap(), 1);
    }

    #[test]
    fn passwords_are_bounded() {
        assert!(check_password("x").is_ok());
        assert!(check_password("").is_err());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_LEN)).is_ok());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_LEN + 1)).is_err());
    }
}
