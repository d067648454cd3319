//! Whether a master can acknowledge persisted writes
//! ([`Durability::Persisted`](crate::Durability::Persisted)), checked
//! before the first one is sent to it: a write sent to a master without
//! `WAITAOF` (Redis before 7.2), or asking for its fsync with `appendonly`
//! off, would run and then fail its wait, and the caller would only learn
//! that it ran, unpersisted. A refusal says so before anything ran.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use redis::RedisError;

use redis::aio::MultiplexedConnection;

use crate::addr::NodeAddr;
use crate::durable::Ack;
use crate::error::Error;
use crate::request::Sent;
use crate::retry::{Failure, refusal_of};
use crate::shared::Shared;
use crate::state::Master;

/// `WAITAOF` answered, without the local fsync asked for.
const WITHOUT_LOCAL: u8 = 1;
/// `WAITAOF` answered with the local fsync asked for (`appendonly` on).
const WITH_LOCAL: u8 = 2;

/// What one master was seen to support, kept until a `WAITAOF` fails.
#[derive(Debug, Default)]
pub(crate) struct AofSupport(AtomicU8);

impl AofSupport {
    fn supports(&self, local: bool) -> bool {
        let known = self.0.load(Ordering::Acquire);
        known == WITH_LOCAL || (known == WITHOUT_LOCAL && !local)
    }

    fn supported(&self, local: bool) {
        let level = if local { WITH_LOCAL } else { WITHOUT_LOCAL };
        self.0.fetch_max(level, Ordering::AcqRel);
    }

    /// A `WAITAOF` failed (say, `appendonly` turned off since): check again
    /// before the next persisted write.
    pub(crate) fn forget(&self) {
        self.0.store(0, Ordering::Release);
    }
}

impl AofSupport {
    /// Whether `node` can acknowledge a persisted write, with its own
    /// fsync when `local`: `WAITAOF local 0 1` on `connection` (a shared
    /// one: it counts no write and answers at once). Once it answered, not
    /// asked again until a `WAITAOF` fails. `Sent::Unreachable` when the
    /// connection failed.
    pub(crate) async fn check(
        &self,
        node: &NodeAddr,
        connection: &mut MultiplexedConnection,
        local: bool,
    ) -> Result<(), Sent> {
        if self.supports(local) {
            return Ok(());
        }
        let probe = Ack {
            aof: Some(local),
            replicas: 0,
            timeout: Duration::from_millis(1),
        };
        let answer = probe
            .command()
            .query_async::<redis::Value>(connection)
            .await
            .and_then(|reply| reply.extract_error());
        match answer {
            Ok(_) => {
                self.supported(local);
                Ok(())
            }
            Err(error) => Err(waitaof_refused(node, error)),
        }
    }
}

impl Shared {
    /// Whether `master` can acknowledge a persisted write (see
    /// [`AofSupport::check`]), asked on its shared connection.
    pub(crate) async fn check_waitaof(&self, master: &Master, local: bool) -> Result<(), Sent> {
        let connection = master.connection.load_full();
        if connection.has_failed() {
            return Err(Sent::Unreachable("the connection had failed".to_owned()));
        }
        let mut multiplexed = connection.multiplexed.clone();
        let checked = master
            .aof
            .check(&master.node, &mut multiplexed, local)
            .await;
        if let Err(Sent::Unreachable(_)) = &checked {
            master.connection_failed();
        }
        checked
    }
}

/// What a failed `WAITAOF` probe of `node` means for the write: a refusal
/// of a demoted master (look for the master again), a lost connection, or
/// a server that cannot do it.
fn waitaof_refused(node: &NodeAddr, error: RedisError) -> Sent {
    if Failure::of(&error) == Failure::OutcomeUnknown {
        return Sent::Unreachable(format!("WAITAOF failed: {error}"));
    }
    let detail = error.detail().unwrap_or_default().to_ascii_lowercase();
    if refusal_of(&error).is_some() {
        return Sent::Failed(error);
    }
    if detail.contains("replica") {
        // "cannot be used with replica instances": demoted.
        return Sent::Failed(redis::make_extension_error(
            "READONLY".to_owned(),
            Some(format!("WAITAOF says replica: {error}")),
        ));
    }
    let what = if detail.contains("appendonly") {
        "fsync the write to its append-only file (appendonly is off)"
    } else if detail.contains("unknown command") {
        "acknowledge persisted writes (no WAITAOF: it needs Redis 7.2 or Valkey)"
    } else {
        "acknowledge persisted writes (WAITAOF refused)"
    };
    Sent::Refused(Error::Unsupported {
        node: node.clone(),
        what,
        source: error,
    })
}
