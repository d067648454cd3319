//! The store's Lua scripts: each sent as `EVALSHA`, and loaded first on a
//! node that does not know it (a new master after a failover, a restart).

use std::sync::LazyLock;

use redis::{Cmd, FromRedisValue, Script};
use redis_failover::{ErrorKind, FailoverClient};

use crate::error::Result;

/// What every script shares (the clock, GCRA), sent ahead of its own source.
const COMMON: &str = include_str!("lua/common.lua");
/// The item envelope of storage layout 2, for the scripts that write items.
const ENVELOPE: &str = include_str!("lua/envelope.lua");

/// One script, with its SHA-1.
pub(crate) struct Lua {
    source: String,
    sha: String,
}

impl Lua {
    /// A script of `parts` after the common ones.
    fn new(parts: &[&str]) -> Self {
        let mut source = COMMON.to_owned();
        for part in parts {
            source.push('\n');
            source.push_str(part);
        }
        let sha = Script::new(&source).get_hash().to_owned();
        Self { source, sha }
    }

    /// `EVALSHA <sha> <keys.len()> <keys...>`, for the caller to add ARGV.
    pub(crate) fn command<K: redis::ToRedisArgs>(&self, keys: &[K]) -> Cmd {
        let mut command = redis::cmd("EVALSHA");
        command.arg(&self.sha).arg(keys.len()).arg(keys);
        command
    }

    /// `EVALSHA <sha> <keys>` with room for `args` more arguments of about
    /// `bytes` bytes in all, for the caller to add the keys, then ARGV.
    pub(crate) fn command_for(&self, keys: usize, args: usize, bytes: usize) -> Cmd {
        let mut command = Cmd::with_capacity(3 + args, 64 + bytes);
        command.arg("EVALSHA").arg(&self.sha).arg(keys);
        command
    }

    /// Runs `command` (from [`command`](Self::command)), sending the
    /// script itself to a node that does not know it. Resent through a
    /// failover only if `idempotent`.
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        client: &FailoverClient,
        command: &Cmd,
        idempotent: bool,
    ) -> Result<T> {
        match send(client, command, idempotent).await {
            // `EVAL` with the same keys, rather than `SCRIPT LOAD`: a
            // keyless `SCRIPT LOAD` may reach another master of a cluster
            // than the one the keys route to. `EVAL` caches the script on
            // its node as `SCRIPT LOAD` would.
            Err(error) if error.kind() == ErrorKind::NoScript => {
                Ok(send(client, &self.with_source(command), idempotent).await?)
            }
            other => Ok(other?),
        }
    }

    /// `command` (`EVALSHA <sha> ...`) as `EVAL <source> ...`.
    fn with_source(&self, command: &Cmd) -> Cmd {
        let mut eval = redis::cmd("EVAL");
        eval.arg(&self.source);
        for arg in command.args_iter().skip(2) {
            if let redis::Arg::Simple(arg) = arg {
                eval.arg(arg);
            }
        }
        eval
    }
}

/// Sends `command`, resent through a failover only if `idempotent`.
async fn send<T: FromRedisValue>(
    client: &FailoverClient,
    command: &Cmd,
    idempotent: bool,
) -> redis_failover::Result<T> {
    if idempotent {
        client.query_idempotent(command).await
    } else {
        client.query(command).await
    }
}

/// Item writes with their index, counters, quotas and audit records.
pub(crate) static WRITE: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[ENVELOPE, include_str!("lua/write.lua")]));
/// Expired items out of the index and counters, with their records.
pub(crate) static PURGE: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[include_str!("lua/purge.lua")]));
/// A tenant's keys other than items, moved from layout 1 to layout 2.
pub(crate) static MIGRATE_PREPARE: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[include_str!("lua/migrate_prepare.lua")]));
/// The layout marker set to `migrating`, unless already done.
pub(crate) static MARK_MIGRATING: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[include_str!("lua/mark_migrating.lua")]));
/// Items converted from layout 1 to layout 2.
pub(crate) static MIGRATE_ITEMS: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[ENVELOPE, include_str!("lua/migrate_items.lua")]));
/// One rate limit (GCRA).
pub(crate) static RATE_LIMIT: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[include_str!("lua/ratelimit.lua")]));
/// A failed login's audit record, at most at the tenant's record rate.
pub(crate) static LOGIN_FAILED: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[include_str!("lua/login_failed.lua")]));
/// An API key's creation, within the tenant's most keys.
pub(crate) static API_KEY_CREATE: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[include_str!("lua/api_key_create.lua")]));
/// An API key's rotation, unless the key changed since it was read.
pub(crate) static API_KEY_ROTATE: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[include_str!("lua/api_key_rotate.lua")]));
