//! Node addresses and how their names are resolved.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::Error;

/// A node's host name (or IP) and port, as configured.
///
/// Names are kept, never replaced by the address they resolved to: a pod
/// that comes back with a new IP keeps its name, so every connect resolves
/// the name afresh.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    /// Shared: every reply names the node that served it, so an address
    /// is cloned per request.
    host: Arc<str>,
    port: u16,
}

impl NodeAddr {
    /// A node address from its parts. The host must be non-empty.
    pub fn new(host: impl Into<String>, port: u16) -> Result<Self, Error> {
        let host = host.into();
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(Error::InvalidConfig {
                setting: "node address",
                reason: format!("{host:?} is not a host name"),
            });
        }
        Ok(Self {
            host: host.into(),
            port,
        })
    }

    /// The host name or IP.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl From<SocketAddr> for NodeAddr {
    fn from(addr: SocketAddr) -> Self {
        Self {
            host: addr.ip().to_string().into(),
            port: addr.port(),
        }
    }
}

impl FromStr for NodeAddr {
    type Err = Error;

    /// Parses `host:port` (`[v6]:port` for IPv6 literals).
    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = || Error::InvalidConfig {
            setting: "node address",
            reason: format!("{text:?} is not host:port"),
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = port.parse().map_err(|_| invalid())?;
        Self::new(host, port).map_err(|_| invalid())
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The future a [`Resolve`] implementation returns.
pub type Resolving<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Turns a node's name into socket addresses, once per connect.
///
/// [`DnsResolver`] is the default. Tests and special deployments can map
/// names their own way (see [`StaticResolver`]).
pub trait Resolve: Send + Sync + fmt::Debug + 'static {
    /// The addresses `node` resolves to now, in preference order.
    fn resolve<'a>(&'a self, node: &'a NodeAddr) -> Resolving<'a>;
}

/// A shared resolver resolves as the one it shares, so one table can serve
/// several clients.
impl<R: Resolve + ?Sized> Resolve for std::sync::Arc<R> {
    fn resolve<'a>(&'a self, node: &'a NodeAddr) -> Resolving<'a> {
        (**self).resolve(node)
    }
}

/// Resolves names with the system resolver (`getaddrinfo`), fresh on every call.
#[derive(Clone, Copy, Debug, Default)]
pub struct DnsResolver;

impl Resolve for DnsResolver {
    fn resolve<'a>(&'a self, node: &'a NodeAddr) -> Resolving<'a> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((node.host(), node.port()))
                .await?
                .collect())
        })
    }
}

/// Resolves names from a fixed table, and anything else like [`DnsResolver`].
///
/// Useful to give local processes the stable names they have in production,
/// for example `redis-0.redis-headless:6379` mapped to `127.0.0.1:23001`.
/// The table can be changed while in use, as a DNS record changes.
#[derive(Debug, Default)]
pub struct StaticResolver {
    table: std::sync::RwLock<HashMap<NodeAddr, SocketAddr>>,
}

impl StaticResolver {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `name` to `addr` from now on, replacing any earlier mapping.
    pub fn insert(&self, name: NodeAddr, addr: SocketAddr) {
        self.table
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(name, addr);
    }

    /// Stops resolving `name`, as a deleted DNS record: it then fails to resolve.
    pub fn remove(&self, name: &NodeAddr) {
        self.table
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(name);
    }
}

impl Resolve for StaticResolver {
    fn resolve<'a>(&'a self, node: &'a NodeAddr) -> Resolving<'a> {
        let mapped = self
            .table
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(node)
            .copied();
        Box::pin(async move {
            match mapped {
                Some(addr) => Ok(vec![addr]),
                None if node.host().parse::<std::net::IpAddr>().is_ok() => {
                    DnsResolver.resolve(node).await
                }
                None => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{node} is not in the resolver's table"),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        for text in [
            "redis-0.redis-headless:6379",
            "127.0.0.1:7000",
            "[::1]:6380",
        ] {
            let addr: NodeAddr = text.parse().unwrap();
            assert_eq!(addr.to_string(), text);
        }
        let v6: NodeAddr = "[::1]:6380".parse().unwrap();
        assert_eq!((v6.host(), v6.port()), ("::1", 6380));
    }

    #[test]
    fn malformed_addresses_are_rejected() {
        for text in [
            "",
            "redis-0",
            "redis-0:",
            ":6379",
            "redis-0:port",
            "redis-0:70000",
            "a b:1",
        ] {
            assert!(
                matches!(text.parse::<NodeAddr>(), Err(Error::InvalidConfig { .. })),
                "{text:?}"
            );
        }
    }

    #[tokio::test]
    async fn static_names_resolve_to_their_mapping_and_follow_changes() {
        let resolver = StaticResolver::new();
        let name: NodeAddr = "redis-0.redis-headless:6379".parse().unwrap();
        assert!(resolver.resolve(&name).await.is_err());
        let first: SocketAddr = "127.0.0.1:20000".parse().unwrap();
        resolver.insert(name.clone(), first);
        assert_eq!(resolver.resolve(&name).await.unwrap(), vec![first]);
        let moved: SocketAddr = "127.0.0.1:20001".parse().unwrap();
        resolver.insert(name.clone(), moved);
        assert_eq!(resolver.resolve(&name).await.unwrap(), vec![moved]);
        let ip: NodeAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(resolver.resolve(&ip).await.unwrap(), vec![ip_addr(5)]);
    }

    fn ip_addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}
