//! Password hashing: argon2id (bcrypt hashes imported from elsewhere still
//! verify), run on a fixed number of blocking threads with a short queue.
//! Each hash takes 19 MiB and tens of milliseconds of a core, so a flood of
//! logins must not get a thread each: past the slots and the queue, an
//! attempt is refused at once ([`Error::Overloaded`]). Each slot hashes in
//! memory of its own, kept from one hash to the next, so the process holds
//! the slots' 19 MiB each and no more, however many logins come (memory
//! freed after each hash lingers in the allocator of whichever thread ran
//! it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{ARGON2ID_IDENT, Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// The longest password accepted, in bytes.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// What a caller refused for lack of hashing slots is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The most argon2 memory one check may take, in 1 KiB blocks: a stored
/// hash asking for more (64 MiB) does not verify.
const MAX_BLOCKS: usize = 64 * 1024;

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
    /// argon2's memory, one per slot that has hashed.
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
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
            memory: Arc::default(),
        }
    }

    /// Runs `work` on a blocking thread once a slot is free, or refuses at
    /// once when the queue is full. A caller that goes away leaves its
    /// work running to the end, still holding its slot, so no more than
    /// the slots' threads ever hash.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T> {
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
        let memory = Arc::clone(&self.memory);
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let mut blocks = lock(&memory).pop().unwrap_or_default();
            let done = work(&mut blocks);
            lock(&memory).push(blocks);
            done
        })
        .await
        // Only a panic in the hashing code gets here: the server's fault.
        .map_err(|error| Error::InvalidConfig {
            setting: "password_hashing",
            reason: format!("password hashing failed: {error}"),
        })
    }

    /// Hashes `password` with argon2id and a random salt.
    pub(crate) async fn hash(&self, password: String) -> Result<String> {
        self.run(move |blocks| hash(&password, blocks))
            .await?
            .map_err(|e| Error::InvalidUser {
                reason: format!("the password cannot be hashed: {e}"),
            })
    }

    /// Checks `password` against a stored argon2 (PHC string) or bcrypt hash.
    pub(crate) async fn verify(&self, password: String, hash: String) -> Result<bool> {
        self.run(move |blocks| verify(&password, &hash, blocks))
            .await
    }
}

fn lock(memory: &Mutex<Vec<Vec<Block>>>) -> std::sync::MutexGuard<'_, Vec<Vec<Block>>> {
    memory.lock().unwrap_or_else(|e| e.into_inner())
}

/// An argon2id PHC string of `password` with argon2's default cost and a
/// random salt, hashed in `blocks`.
fn hash(password: &str, blocks: &mut Vec<Block>) -> argon2::password_hash::Result<String> {
    let params = Params::default();
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())?;
    let mut salt_bytes = [0; 16];
    let salt_bytes = salt.decode_b64(&mut salt_bytes)?;
    let mut out = [0; Params::DEFAULT_OUTPUT_LEN];
    let memory = fit(blocks, params.block_count()).expect("the default cost is under the cap");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password.as_bytes(), salt_bytes, &mut out, memory)?;
    Ok(PasswordHash {
        algorithm: ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out)?),
    }
    .to_string())
}

/// The first `count` blocks of `blocks`, grown to them if need be; `None`
/// past [`MAX_BLOCKS`].
fn fit(blocks: &mut Vec<Block>, count: usize) -> Option<&mut [Block]> {
    if count > MAX_BLOCKS {
        return None;
    }
    if blocks.len() < count {
        blocks.resize(count, Block::default());
    }
    Some(&mut blocks[..count])
}

/// Whether `password` matches the argon2 PHC string or bcrypt hash `stored`.
fn verify(password: &str, stored: &str, blocks: &mut Vec<Block>) -> bool {
    if stored.starts_with("$2") {
        return bcrypt::verify(password, stored).unwrap_or(false);
    }
    let Ok(parsed) = PasswordHash::new(stored) else {
        return false;
    };
    let (Ok(algorithm), Ok(params), Some(salt), Some(expected)) = (
        Algorithm::try_from(parsed.algorithm),
        Params::try_from(&parsed),
        parsed.salt,
        parsed.hash,
    ) else {
        return false;
    };
    let Ok(version) = parsed
        .version
        .map_or(Ok(Version::default()), Version::try_from)
    else {
        return false;
    };
    let mut salt_bytes = [0; 64];
    let (Ok(salt), Some(memory)) = (
        salt.decode_b64(&mut salt_bytes),
        fit(blocks, params.block_count()),
    ) else {
        return false;
    };
    let mut out = [0; Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, out, memory)
        .is_ok()
        && bool::from(out.ct_eq(expected.as_bytes()))
}

/// Whether `hash` is a hash [`Hasher::verify`] can check.
pub(crate) fn is_known_hash(hash: &str) -> bool {
    hash.starts_with("$2") || PasswordHash::new(hash).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_agree_with_the_argon2_crates_own() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let mut blocks = Vec::new();
        let ours = hash("s3cret", &mut blocks).unwrap();
        assert_eq!(blocks.len(), Params::default().block_count());
        assert!(
            Argon2::default()
                .verify_password(b"s3cret", &PasswordHash::new(&ours).unwrap())
                .is_ok()
        );
        let salt = SaltString::encode_b64(b"sixteen byte slt").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"s3cret", &salt)
            .unwrap()
            .to_string();
        assert!(verify("s3cret", &theirs, &mut blocks));
        assert!(!verify("s3creT", &theirs, &mut blocks));
        // Other costs and variants verify in the same memory, grown once.
        let argon2i = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x10,
            Params::new(32, 3, 1, Some(16)).unwrap(),
        )
        .hash_password(b"pw", &salt)
        .unwrap()
        .to_string();
        assert!(verify("pw", &argon2i, &mut blocks));
        assert_eq!(blocks.len(), Params::default().block_count());
        // A stored hash asking for too much memory does not verify.
        let greedy = "$argon2id$v=19$m=1048576,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$8CeSqt1f8C3sYBRE0GnCWc5d5RWq8bIPI+6VGbCFP0c";
        assert!(!verify("x", greedy, &mut blocks));
        assert!(!verify("x", "$argon2id$garbage", &mut blocks));
    }

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
                    .run(move |_| {
                        let _ = started.send(());
                        released.recv().ok();
                    })
                    .await
            }
        });
        running.await.unwrap();
        let waiter = tokio::spawn({
            let hasher = Arc::clone(&hasher);
            async move { hasher.run(|_| 7).await }
        });
        while hasher.pending.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            hasher.run(|_| 0).await,
            Err(Error::Overloaded { .. })
        ));
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), 7);
        assert_eq!(hasher.pending.load(Ordering::Acquire), 0);
        assert_eq!(hasher.run(|_| 1).await.unwrap(), 1);
    }

    #[test]
    fn passwords_are_bounded() {
        assert!(check_password("x").is_ok());
        assert!(check_password("").is_err());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_LEN)).is_ok());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_LEN + 1)).is_err());
    }
}
