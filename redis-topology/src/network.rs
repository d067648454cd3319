//! Network faults: each node in a Linux network namespace of its own, so a
//! test can cut the links between nodes, or between itself and a node, and
//! heal them again.
//!
//! # Layout
//!
//! With [`TopologyBuilder::network_namespaces`](crate::TopologyBuilder::network_namespaces),
//! a topology creates a *hub* namespace holding a Linux bridge, and one
//! namespace per node (data nodes and sentinels alike), each joined to the
//! bridge by a veth pair. The test process (the *client*) stays in the
//! machine's own namespace and reaches the hub through one more veth pair,
//! whose end on the machine's side carries the `.1` address of a `/24` chosen
//! at random in `10.200.0.0`–`10.254.255.0` among those no route of the
//! machine covers. Each node binds to an address of its own in that subnet,
//! so replicas and sentinels see each other by those addresses, exactly as
//! [`Topology::addr`] reports them.
//!
//! # Cuts
//!
//! A cut drops packets silently, as a broken switch or a partition does: no
//! RST, no ICMP, so the far side learns of it only by timing out. It needs no
//! iptables or nftables, only policy routing: every node namespace moves its
//! `local` table lookup from rule 0 to rule 100, so that `blackhole` rules
//! placed before it can drop even packets addressed to the node itself.
//! Cutting node A from node B adds `from <B> blackhole` in A's namespace and
//! `from <A> blackhole` in B's, dropping each side's packets on arrival.
//! Cutting the client from a node adds, in the node's namespace only,
//! `from <client>` (its requests) and `to <client>` (its replies and pushes)
//! blackholes: the machine's own namespace is shared with everything else on
//! it and is never changed beyond the one veth.
//!
//! # Names and cleanup
//!
//! Namespaces are named `rt-<pid>-<n>-<node>` (`<n>` counts the topologies
//! of the process), the machine-side veth `rt<pid>-<n>` (interface names
//! are limited to 15 bytes). Dropping the topology kills its processes and
//! then deletes the veth and the namespaces; namespaces and veths whose
//! `<pid>` is dead (an owner killed by SIGKILL) are removed by the next
//! topology that uses namespaces, see `orphans`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use rand::Rng;

use crate::builder::TopologyBuilder;
use crate::error::{Error, Result};
use crate::node::{NodeId, NodeKind};
use crate::topology::Topology;

/// How every namespace of this crate is named: `rt-<pid>-<n>-<node>`.
pub(crate) const NETNS_STEM: &str = "rt-";
/// How every machine-side veth of this crate is named: `rt<pid>-<n>`.
pub(crate) const LINK_STEM: &str = "rt";
/// Keeps `rt<pid>-<n>` within 15 bytes for any pid (at most 7 digits).
const COUNTER_MODULUS: u32 = 100_000;
/// Host part of the client's (the machine-side veth's) address.
const CLIENT_HOST: u8 = 1;
/// Host part of the first data node's address; the sentinels follow the data nodes.
const FIRST_NODE_HOST: u8 = 2;
/// The most nodes a `/24` holds after the client and the broadcast address.
pub(crate) const MAX_NODES: usize = 252;
/// How many random subnets are tried before giving up.
const SUBNET_ATTEMPTS: usize = 100;
/// Rule priorities: the cuts, then the `local` table moved out of their way.
const CUT_PREF: &str = "10";
const LOCAL_PREF: &str = "100";
/// Taken while a subnet is chosen and claimed, so concurrent test binaries
/// do not pick the same one.
const SUBNET_LOCK: &str = "redis-topology-subnets.lock";

/// Counts this process's namespaced topologies, for unique names.
static TOPOLOGIES: AtomicU32 = AtomicU32::new(0);

/// One end of a link that [`Topology::cut`] can cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// The process using the topology (the test), which stays in the
    /// machine's own network namespace; nodes see it as
    /// [`Topology::client_ip`].
    Client,
    /// A node of the topology.
    Node(NodeId),
}

impl From<NodeId> for Endpoint {
    fn from(node: NodeId) -> Self {
        Self::Node(node)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Client => f.write_str("the client"),
            Self::Node(node) => node.fmt(f),
        }
    }
}

/// Checks that this process can create network namespaces (it creates and
/// deletes one), so a test can skip with the returned
/// [`Error::NetworkUnavailable`] instead of failing where it lacks the
/// privileges (root or `CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) or the `ip`
/// command.
pub fn check_network_namespaces() -> Result<()> {
    let ip = find_ip()?;
    let probe = format!(
        "{NETNS_STEM}{}-{}-probe",
        std::process::id(),
        TOPOLOGIES.fetch_add(1, Ordering::Relaxed) % COUNTER_MODULUS
    );
    run(&ip, &["netns", "add", &probe]).map_err(unavailable)?;
    let _ = run(&ip, &["netns", "del", &probe]);
    Ok(())
}

/// The namespaces, links and cuts of one topology.
#[derive(Debug)]
pub(crate) struct Network {
    ip: PathBuf,
    /// `rt-<pid>-<n>`; each namespace is `<prefix>-<node>` or `<prefix>-hub`.
    prefix: String,
    /// The machine-side veth, `rt<pid>-<n>`.
    root_link: String,
    /// The first three octets of the topology's `/24`.
    subnet: [u8; 3],
    data_nodes: usize,
    /// Namespaces created so far, deleted on drop.
    created: Vec<String>,
    cuts: Mutex<BTreeSet<(Endpoint, Endpoint)>>,
}

impl Network {
    /// The network of a topology with these settings, if they ask for one.
    pub(crate) fn for_settings(settings: &TopologyBuilder) -> Result<Option<Self>> {
        settings
            .network_namespaces
            .then(|| Self::create(settings.replicas + 1, settings.sentinels))
            .transpose()
    }

    /// Creates the hub, the client's link and one namespace per node.
    /// Failures of the first steps mean the machine does not allow it
    /// ([`Error::NetworkUnavailable`]); on any error, whatever was created
    /// is removed again.
    pub(crate) fn create(data_nodes: usize, sentinels: usize) -> Result<Self> {
        let ip = find_ip()?;
        crate::orphans::sweep_namespaces(&ip);
        let (pid, n) = (
            std::process::id(),
            TOPOLOGIES.fetch_add(1, Ordering::Relaxed) % COUNTER_MODULUS,
        );
        let mut network = Self {
            ip,
            prefix: format!("{NETNS_STEM}{pid}-{n}"),
            root_link: format!("{LINK_STEM}{pid}-{n}"),
            subnet: [0; 3],
            data_nodes,
            created: Vec::new(),
            cuts: Mutex::default(),
        };
        network.create_hub().map_err(unavailable)?;
        network.claim_subnet()?;
        let data = (0..data_nodes).map(NodeId::data);
        for node in data.chain((0..sentinels).map(NodeId::sentinel)) {
            network.create_node(node)?;
        }
        Ok(network)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    /// The namespace `node` runs in.
    pub(crate) fn netns(&self, node: NodeId) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// Every namespace of the topology, the hub first.
    pub(crate) fn netns_names(&self) -> Vec<String> {
        self.created.clone()
    }

    /// The address nodes see the client's connections come from.
    pub(crate) fn client_ip(&self) -> Ipv4Addr {
        self.host(CLIENT_HOST)
    }

    /// The address `node` binds to.
    pub(crate) fn node_ip(&self, node: NodeId) -> Ipv4Addr {
        let offset = match node.kind() {
            NodeKind::Data => node.index(),
            NodeKind::Sentinel => self.data_nodes + node.index(),
        };
        let host = usize::from(FIRST_NODE_HOST) + offset;
        self.host(u8::try_from(host).expect("validated: at most MAX_NODES nodes"))
    }

    fn host(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, host)
    }

    /// The command line that runs a program inside `node`'s namespace.
    /// `ip netns exec` execs the program, so its pid is the node's pid.
    pub(crate) fn launcher(&self, node: NodeId) -> Vec<OsString> {
        let exec = ["netns", "exec"].map(OsString::from);
        let mut launcher = vec![self.ip.clone().into_os_string()];
        launcher.extend(exec);
        launcher.push(self.netns(node).into());
        launcher
    }

    /// The hub namespace with its bridge, and the client's veth into it.
    fn create_hub(&mut self) -> Result<()> {
        let hub = self.hub();
        self.add_netns(&hub)?;
        self.ip_in(&hub, &["link", "add", "br0", "type", "bridge"])?;
        self.ip_in(&hub, &["link", "set", "br0", "up"])?;
        let root_link = self.root_link.clone();
        // Created with its peer in one step, so no half-made pair is left.
        self.ip(&[
            "link", "add", &root_link, "type", "veth", "peer", "name", "uplink", "netns", &hub,
        ])?;
        self.attach("uplink")
    }

    /// Chooses a `/24` no route of the machine covers and gives its `.1` to
    /// the client's veth, under a lock shared by every process on the machine.
    fn claim_subnet(&mut self) -> Result<()> {
        let lock_path = std::env::temp_dir().join(SUBNET_LOCK);
        let io_error = |source| Error::Io {
            path: lock_path.clone(),
            source,
        };
        let lock = File::create(&lock_path).map_err(io_error)?;
        lock.lock().map_err(io_error)?;
        let routes = self.ip(&["-4", "route", "show", "table", "all"])?;
        let taken = route_prefixes(&routes);
        let mut rng = rand::rng();
        let subnet = (0..SUBNET_ATTEMPTS)
            .map(|_| [10, rng.random_range(200..=254), rng.random()])
            .find(|&[a, b, c]| {
                let candidate = u32::from(Ipv4Addr::new(a, b, c, 0));
                !taken
                    .iter()
                    .any(|&(net, len)| overlaps(candidate, 24, net, len))
            })
            .ok_or_else(|| Error::NetworkUnavailable {
                reason: "no free /24 found in 10.200.0.0-10.254.255.0".to_owned(),
            })?;
        self.subnet = subnet;
        let root_link = self.root_link.clone();
        let client = format!("{}/24", self.client_ip());
        self.ip(&["addr", "add", &client, "dev", &root_link])?;
        self.ip(&["link", "set", &root_link, "up"])?;
        Ok(())
    }

    /// A node's namespace, joined to the hub, with its address and the
    /// `local` table moved behind the cut rules.
    fn create_node(&mut self, node: NodeId) -> Result<()> {
        let (netns, hub) = (self.netns(node), self.hub());
        self.add_netns(&netns)?;
        let hub_end = match node.kind() {
            NodeKind::Data => format!("d{}", node.index()),
            NodeKind::Sentinel => format!("s{}", node.index()),
        };
        let peer = ["peer", "name", "eth0", "netns", &netns];
        let mut add = vec!["link", "add", &hub_end, "type", "veth"];
        add.extend(peer);
        self.ip_in(&hub, &add)?;
        self.attach(&hub_end)?;
        let addr = format!("{}/24", self.node_ip(node));
        self.ip_in(&netns, &["addr", "add", &addr, "dev", "eth0"])?;
        self.ip_in(&netns, &["link", "set", "eth0", "up"])?;
        // Added before rule 0 goes, so local delivery never stops.
        self.ip_in(
            &netns,
            &["rule", "add", "pref", LOCAL_PREF, "lookup", "local"],
        )?;
        self.ip_in(&netns, &["rule", "del", "pref", "0"])?;
        Ok(())
    }

    /// `ip netns add`, with loopback up (nodes talk to themselves over it).
    fn add_netns(&mut self, name: &str) -> Result<()> {
        self.ip(&["netns", "add", name])?;
        self.created.push(name.to_owned());
        self.ip_in(name, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Puts a hub-side veth end on the bridge and brings it up.
    fn attach(&self, hub_end: &str) -> Result<()> {
        let hub = self.hub();
        self.ip_in(&hub, &["link", "set", hub_end, "master", "br0"])?;
        self.ip_in(&hub, &["link", "set", hub_end, "up"])?;
        Ok(())
    }

    fn ip(&self, args: &[&str]) -> Result<String> {
        run(&self.ip, args)
    }

    fn ip_in(&self, netns: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", netns];
        all.extend_from_slice(args);
        run(&self.ip, &all)
    }

    fn cuts(&self) -> MutexGuard<'_, BTreeSet<(Endpoint, Endpoint)>> {
        self.cuts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (`action` "add") or deletes ("del") the rules of a cut.
    fn rules(&self, action: &str, (a, b): (Endpoint, Endpoint)) -> Result<()> {
        let client = self.client_ip().to_string();
        let node_ip = |node| self.node_ip(node).to_string();
        let rules: Vec<(String, String, &str)> = match (a, b) {
            (Endpoint::Node(x), Endpoint::Node(y)) => vec![
                (self.netns(x), node_ip(y), "from"),
                (self.netns(y), node_ip(x), "from"),
            ],
            (Endpoint::Client, Endpoint::Node(x)) | (Endpoint::Node(x), Endpoint::Client) => vec![
                (self.netns(x), client.clone(), "from"),
                (self.netns(x), client, "to"),
            ],
            (Endpoint::Client, Endpoint::Client) => panic!("the client cannot be cut from itself"),
        };
        for (netns, peer, direction) in &rules {
            let rule = [
                "rule",
                action,
                "pref",
                CUT_PREF,
                direction,
                peer,
                "blackhole",
            ];
            self.ip_in(netns, &rule)?;
        }
        Ok(())
    }
}

impl Drop for Network {
    /// Runs after the topology killed its processes: a namespace that still
    /// held one would only lose its name, not go away.
    fn drop(&mut self) {
        let _ = self.ip(&["link", "del", &self.root_link]);
        for netns in self.created.iter().rev() {
            let _ = run(&self.ip, &["netns", "del", netns]);
        }
    }
}

impl Topology {
    fn network(&self) -> Result<&Network> {
        self.network.as_ref().ok_or(Error::NoNetworkNamespaces)
    }

    /// Cuts the link between `a` and `b` in both directions: their packets
    /// are dropped silently (no RST, no ICMP), so each side notices only by
    /// timing out, as in a network partition. Open connections stay open
    /// and resume if the cut is healed in time. Cutting a cut link again
    /// changes nothing.
    ///
    /// Needs [`TopologyBuilder::network_namespaces`](crate::TopologyBuilder::network_namespaces),
    /// else returns [`Error::NoNetworkNamespaces`]. Panics if `a` and `b`
    /// are the same endpoint.
    pub fn cut(&self, a: impl Into<Endpoint>, b: impl Into<Endpoint>) -> Result<()> {
        let network = self.network()?;
        let pair = ordered(a.into(), b.into());
        let mut cuts = network.cuts();
        if cuts.contains(&pair) {
            return Ok(());
        }
        network.rules("add", pair).inspect_err(|_| {
            // Leave no half of a cut behind.
            let _ = network.rules("del", pair);
        })?;
        cuts.insert(pair);
        Ok(())
    }

    /// Heals the cut between `a` and `b`; healing an uncut link changes
    /// nothing. Errors and panics as [`cut`](Self::cut).
    pub fn heal(&self, a: impl Into<Endpoint>, b: impl Into<Endpoint>) -> Result<()> {
        let network = self.network()?;
        let pair = ordered(a.into(), b.into());
        let mut cuts = network.cuts();
        if cuts.contains(&pair) {
            network.rules("del", pair)?;
            cuts.remove(&pair);
        }
        Ok(())
    }

    /// Cuts `node` from the client and from every other node.
    pub fn isolate(&self, node: NodeId) -> Result<()> {
        self.cut(Endpoint::Client, node)?;
        for other in self.data_nodes().into_iter().chain(self.sentinels()) {
            if other != node {
                self.cut(node, other)?;
            }
        }
        Ok(())
    }

    /// Heals every cut.
    pub fn heal_all(&self) -> Result<()> {
        let network = self.network()?;
        let mut cuts = network.cuts();
        while let Some(&pair) = cuts.first() {
            network.rules("del", pair)?;
            cuts.remove(&pair);
        }
        Ok(())
    }

    /// The links cut now, each pair once.
    pub fn cuts(&self) -> Vec<(Endpoint, Endpoint)> {
        self.network
            .as_ref()
            .map(|network| network.cuts().iter().copied().collect())
            .unwrap_or_default()
    }

    /// The address nodes see the client (this process) connect from, with
    /// network namespaces; `None` without.
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.network.as_ref().map(|n| n.client_ip().into())
    }

    /// The network namespace a node runs in (for `ip netns exec`), with
    /// network namespaces; `None` without.
    pub fn netns(&self, node: NodeId) -> Option<String> {
        self.network.as_ref().map(|n| n.netns(node))
    }

    /// Every network namespace of the topology, the hub included; empty
    /// without network namespaces. All are gone once the topology is dropped.
    pub fn netns_names(&self) -> Vec<String> {
        self.network
            .as_ref()
            .map(Network::netns_names)
            .unwrap_or_default()
    }
}

/// Where a node listens and what its command line starts with.
pub(crate) fn placement(network: Option<&Network>, node: NodeId) -> (IpAddr, Vec<OsString>) {
    match network {
        Some(network) => (network.node_ip(node).into(), network.launcher(node)),
        None => (Ipv4Addr::LOCALHOST.into(), Vec::new()),
    }
}

fn ordered(a: Endpoint, b: Endpoint) -> (Endpoint, Endpoint) {
    assert_ne!(a, b, "{a} cannot be cut from itself");
    if a < b { (a, b) } else { (b, a) }
}

/// The `ip` command of iproute2, which may not be on a test's `PATH`.
fn find_ip() -> Result<PathBuf> {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("ip"))
                .collect()
        })
        .unwrap_or_default();
    let usual = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].map(PathBuf::from);
    on_path
        .into_iter()
        .chain(usual)
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| Error::NetworkUnavailable {
            reason: "the `ip` command of iproute2 was not found".to_owned(),
        })
}

/// Runs `ip` and returns its output, or [`Error::Network`] with its stderr.
pub(crate) fn run(ip: &Path, args: &[&str]) -> Result<String> {
    let command = format!("{} {}", ip.display(), args.join(" "));
    let output = Command::new(ip)
        .args(args)
        .output()
        .map_err(|source| Error::Network {
            command: command.clone(),
            output: source.to_string(),
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Network {
            command,
            output: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Any failure while creating the first namespace says the machine does not
/// allow namespaces here.
fn unavailable(error: Error) -> Error {
    match error {
        Error::Network { command, output } => Error::NetworkUnavailable {
            reason: format!(
                "`{command}` failed: {output} (needs root, or CAP_SYS_ADMIN and CAP_NET_ADMIN)"
            ),
        },
        other => other,
    }
}

/// The IPv4 prefixes of `ip -4 route show table all`, but the default route.
fn route_prefixes(routes: &str) -> Vec<(u32, u8)> {
    const TYPES: [&str; 7] = [
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "blackhole",
        "unreachable",
        "prohibit",
    ];
    routes
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let mut first = words.next()?;
            if TYPES.contains(&first) {
                first = words.next()?;
            }
            let (addr, len) = first.split_once('/').unwrap_or((first, "32"));
            Some((u32::from(addr.parse::<Ipv4Addr>().ok()?), len.parse().ok()?))
        })
        .collect()
}

/// Whether two prefixes share an address.
fn overlaps(a: u32, a_len: u8, b: u32, b_len: u8) -> bool {
    let len = a_len.min(b_len).min(32);
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    a & mask == b & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_prefixes_are_read_from_every_routing_table() {
        let routes = "default via 192.0.2.1 dev eth0\n\
            10.213.0.0/24 dev veth0 proto kernel scope link src 10.213.0.1\n\
            local 10.213.0.1 dev veth0 table local proto kernel scope host src 10.213.0.1\n\
            broadcast 127.255.255.255 dev lo table local proto kernel scope link\n";
        let taken = route_prefixes(routes);
        let ip = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            taken,
            vec![
                (ip("10.213.0.0"), 24),
                (ip("10.213.0.1"), 32),
                (ip("127.255.255.255"), 32)
            ]
        );
        assert!(overlaps(ip("10.213.0.0"), 24, ip("10.213.0.1"), 32));
        assert!(overlaps(ip("10.213.7.0"), 24, ip("10.0.0.0"), 8));
        assert!(!overlaps(ip("10.213.7.0"), 24, ip("10.213.0.0"), 24));
        assert!(overlaps(ip("10.213.7.0"), 24, ip("0.0.0.0"), 0));
    }

    #[test]
    fn endpoints_order_and_print() {
        let (a, b) = (Endpoint::Node(NodeId::data(1)), Endpoint::Client);
        assert_eq!(ordered(a, b), ordered(b, a));
        assert_eq!(a.to_string(), "redis-1");
        assert_eq!(b.to_string(), "the client");
    }
}
