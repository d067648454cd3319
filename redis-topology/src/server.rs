//! The server binary a topology runs: where it is found, and what it is
//! (Redis or Valkey, and which version).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// The environment variable naming the default server binary.
pub(crate) const SERVER_BIN_ENV: &str = "REDIS_SERVER_BIN";
/// The environment variable naming the default command-line client.
pub(crate) const CLI_BIN_ENV: &str = "REDIS_CLI_BIN";

/// The oldest server version this crate supports.
const MIN_VERSION: (u32, u32) = (6, 2);

/// Which server a topology runs, as its binary's `--version` tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerKind {
    /// Redis.
    Redis,
    /// Valkey, Redis's fork (its versions count from 7.2 as 8.0).
    Valkey,
}

/// The server binary of a topology: its kind and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    kind: ServerKind,
    version: (u32, u32),
}

impl Server {
    /// Redis or Valkey.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// `(major, minor)` as the binary reports it.
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    /// Whether it has `WAITAOF` (Redis 7.2 and later, every Valkey).
    pub fn has_waitaof(&self) -> bool {
        self.kind == ServerKind::Valkey || self.version >= (7, 2)
    }

    /// Whether a replica can answer `-REDIRECT` to a client that asked for
    /// it with `CLIENT CAPA redirect` (Valkey 8 and later).
    pub fn has_redirect(&self) -> bool {
        self.kind == ServerKind::Valkey && self.version >= (8, 0)
    }
}

/// The binary named by `REDIS_SERVER_BIN`, or `redis-server`.
pub(crate) fn default_server_bin() -> PathBuf {
    env_or(SERVER_BIN_ENV, "redis-server")
}

/// The binary named by `REDIS_CLI_BIN`, or `redis-cli`.
pub(crate) fn default_cli_bin() -> PathBuf {
    env_or(CLI_BIN_ENV, "redis-cli")
}

fn env_or(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|value| !value.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// Resolves the server binary (a path as given, a bare name on `PATH`) and
/// checks that it is Redis or Valkey of a supported version.
pub(crate) fn resolve(binary: &Path) -> Result<(PathBuf, Server)> {
    let binary = find_binary(binary)?;
    let output = Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(|source| Error::Io {
            path: binary.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    match parse_version(&text) {
        Some(server) if server.version >= MIN_VERSION => Ok((binary, server)),
        Some(Server {
            version: (major, minor),
            ..
        }) => Err(Error::UnsupportedVersion {
            binary,
            found: format!("{major}.{minor}"),
        }),
        None => Err(Error::UnsupportedVersion {
            binary,
            found: format!("of unknown version (it printed {:?})", text.trim()),
        }),
    }
}

fn find_binary(binary: &Path) -> Result<PathBuf> {
    let not_found = || Error::RedisServerNotFound {
        binary: binary.to_path_buf(),
    };
    if binary.components().count() > 1 {
        return binary
            .is_file()
            .then(|| binary.to_path_buf())
            .ok_or_else(not_found);
    }
    let path = std::env::var_os("PATH").ok_or_else(not_found)?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .ok_or_else(not_found)
}

/// The server from its version banner ("Redis server v=7.0.15 sha=...",
/// "Valkey server v=8.0.1 sha=...").
fn parse_version(text: &str) -> Option<Server> {
    let kind = if text.starts_with("Valkey") {
        ServerKind::Valkey
    } else {
        ServerKind::Redis
    };
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("v="))?;
    let mut parts = version.split('.');
    let version = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(Server { kind, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_version_banner() {
        let banner =
            "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d7c";
        let redis = parse_version(banner).unwrap();
        assert_eq!((redis.kind(), redis.version()), (ServerKind::Redis, (7, 0)));
        assert!(!redis.has_waitaof() && !redis.has_redirect());
        let valkey = parse_version("Valkey server v=8.0.1 sha=00000000:0 bits=64").unwrap();
        assert_eq!(
            (valkey.kind(), valkey.version()),
            (ServerKind::Valkey, (8, 0))
        );
        assert!(valkey.has_waitaof() && valkey.has_redirect());
        assert!(
            parse_version("Redis server v=7.2.4 sha=0")
                .unwrap()
                .has_waitaof()
        );
        assert_eq!(
            parse_version("Redis server v=6.2.14 sha=0")
                .unwrap()
                .version(),
            (6, 2)
        );
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn a_missing_binary_is_reported_with_the_package_to_install() {
        let error = find_binary(Path::new("no-such-redis-server-binary")).unwrap_err();
        assert!(matches!(error, Error::RedisServerNotFound { .. }));
        let message = error.to_string();
        assert!(
            message.contains("apt-get install redis-server"),
            "{message}"
        );
        let error = find_binary(Path::new("/nonexistent/redis-server")).unwrap_err();
        assert!(matches!(error, Error::RedisServerNotFound { .. }));
    }
}
