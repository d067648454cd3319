//! `redis-topology`: runs a local Redis master, replicas and sentinels (or
//! a Redis Cluster) until Ctrl-C (or SIGTERM), then kills every process and
//! removes its files.
//!
//! ```text
//! cargo run --release -p redis-topology -- --replicas 2 --sentinels 3
//! cargo run --release -p redis-topology -- --cluster --shards 3 --replicas 1
//! ```

use std::process::ExitCode;

use redis_topology::{Cluster, NodeId, Role, Topology};
use tokio::signal::unix::{Signal, SignalKind, signal};

const USAGE: &str = "\
Usage: redis-topology [--replicas N] [--sentinels N] [--master-name NAME]
                      [--network-namespaces]
       redis-topology --cluster [--shards N] [--replicas N]

Runs a real Redis master with N replicas (default 2) and N sentinels
(default 3; 0 for none) on free loopback ports until Ctrl-C or SIGTERM,
then kills every process and removes the topology's directory.
With --network-namespaces, every node runs in a network namespace of its
own with an address of its own instead (needs root and `ip`).
With --cluster, runs a Redis Cluster of N shards (default 3), each a master
with N replicas (default 1), instead; that needs Redis >= 7.0 and redis-cli.
Needs redis-server (Redis >= 6.2) on PATH.";

struct Options {
    /// Per shard with `--cluster`; the default depends on it.
    replicas: Option<usize>,
    sentinels: usize,
    master_name: String,
    network_namespaces: bool,
    cluster: bool,
    shards: Option<usize>,
    /// The last argument given that only a master/replica topology takes.
    topology_only: Option<String>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        replicas: None,
        sentinels: 3,
        master_name: "mymaster".to_owned(),
        network_namespaces: false,
        cluster: false,
        shards: None,
        topology_only: None,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--replicas" => options.replicas = Some(parse_count(&arg, &value()?)?),
            "--sentinels" => options.sentinels = parse_count(&arg, &value()?)?,
            "--master-name" => options.master_name = value()?,
            "--network-namespaces" => options.network_namespaces = true,
            "--cluster" => options.cluster = true,
            "--shards" => options.shards = Some(parse_count(&arg, &value()?)?),
            _ => return Err(format!("unknown argument {arg:?}")),
        }
        if matches!(
            arg.as_str(),
            "--sentinels" | "--master-name" | "--network-namespaces"
        ) {
            options.topology_only = Some(arg);
        }
    }
    match (&options.topology_only, options.cluster, options.shards) {
        (Some(arg), true, _) => Err(format!("{arg} cannot be combined with --cluster")),
        (_, false, Some(_)) => Err("--shards needs --cluster".to_owned()),
        _ => Ok(Some(options)),
    }
}

fn parse_count(arg: &str, value: &str) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("{arg} takes a whole number, not {value:?}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("redis-topology: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Handlers first: a signal that arrives while the nodes start must still
    // lead to the cleanup below, not to the default action (exit at once).
    let mut stop = match StopSignals::new() {
        Ok(stop) => stop,
        Err(error) => {
            eprintln!("redis-topology: cannot listen for signals: {error}");
            return ExitCode::FAILURE;
        }
    };
    let dir = if options.cluster {
        let starting = Cluster::builder()
            .shards(options.shards.unwrap_or(3))
            .replicas_per_shard(options.replicas.unwrap_or(1))
            .start();
        let Some(cluster) = start_or_report(starting, &mut stop).await else {
            return ExitCode::FAILURE;
        };
        print_cluster_summary(&cluster).await;
        stop.recv().await;
        cluster.dir().to_owned()
    } else {
        let starting = Topology::builder()
            .replicas(options.replicas.unwrap_or(2))
            .sentinels(options.sentinels)
            .master_name(options.master_name)
            .network_namespaces(options.network_namespaces)
            .start();
        let Some(topology) = start_or_report(starting, &mut stop).await else {
            return ExitCode::FAILURE;
        };
        print_summary(&topology).await;
        stop.recv().await;
        topology.dir().to_owned()
    }; // The topology or cluster is dropped here: every process is killed.
    if dir.exists() {
        println!(
            "Stopped: every process killed; configs and logs kept in {}.",
            dir.display()
        );
    } else {
        println!("Stopped: every process killed, {} removed.", dir.display());
    }
    ExitCode::SUCCESS
}

/// Waits for `starting` unless a stop signal comes first (dropping the
/// start-up future kills whatever it had started); reports a failure.
async fn start_or_report<T>(
    starting: impl Future<Output = redis_topology::Result<T>>,
    stop: &mut StopSignals,
) -> Option<T> {
    let started = tokio::select! {
        started = starting => started,
        () = stop.recv() => return None,
    };
    match started {
        Ok(started) => Some(started),
        Err(error) => {
            eprintln!("redis-topology: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            None
        }
    }
}

async fn print_cluster_summary(cluster: &Cluster) {
    let shards = cluster.shards().await.unwrap_or_default();
    println!(
        "Redis cluster: {} shards, {} nodes",
        shards.len(),
        cluster.nodes().len()
    );
    println!("  {:<11} {:<16} {:<8} role", "node", "address", "pid");
    for node in cluster.nodes() {
        let role = if shards.iter().any(|s| s.master == node) {
            "master"
        } else {
            "replica"
        };
        let pid = cluster
            .pid(node)
            .map_or("-".to_owned(), |pid| pid.to_string());
        println!(
            "  {:<11} {:<16} {pid:<8} {role}",
            node.to_string(),
            cluster.addr(node).to_string()
        );
    }
    println!("Shards (slots: master, replicas):");
    for shard in &shards {
        let slots: Vec<String> = shard
            .slots
            .iter()
            .map(|r| format!("{}-{}", r.start(), r.end()))
            .collect();
        let nodes: Vec<String> = std::iter::once(shard.master)
            .chain(shard.replicas.iter().copied())
            .map(|n| n.to_string())
            .collect();
        println!("  {}: {}", slots.join(","), nodes.join(", "));
    }
    println!("Configs and logs: {}", cluster.dir().display());
    println!("Try:");
    if let Some(shard) = shards.first() {
        let addr = cluster.addr(shard.master);
        let cli = cluster.redis_cli().display();
        println!(
            "  {cli} -c -h {} -p {} SET hello world",
            addr.ip(),
            addr.port()
        );
        if let Some(pid) = cluster.pid(shard.master) {
            println!("  kill -9 {pid}    # kill a master; its replica takes over in about 5 s");
        }
    }
    println!("Ready. Press Ctrl-C to stop.");
}

async fn print_summary(topology: &Topology) {
    let master = topology.initial_master();
    // `-h <ip> -p <port>`: with network namespaces, nodes are not on loopback.
    let at = |node: NodeId| {
        let addr = topology.addr(node);
        format!("-h {} -p {}", addr.ip(), addr.port())
    };
    println!(
        "Redis topology \"{}\": 1 master, {} replicas, {} sentinels",
        topology.master_name(),
        topology.data_nodes().len() - 1,
        topology.sentinels().len()
    );
    println!("  {:<11} {:<16} {:<8} role", "node", "address", "pid");
    for node in topology
        .data_nodes()
        .into_iter()
        .chain(topology.sentinels())
    {
        let role = match topology.role(node).await {
            Ok(Role::Primary { .. }) => "master",
            Ok(Role::Replica { .. }) => "replica",
            Ok(_) => "sentinel",
            Err(_) => "unknown",
        };
        let pid = topology
            .pid(node)
            .map_or("-".to_owned(), |pid| pid.to_string());
        println!(
            "  {:<11} {:<16} {pid:<8} {role}",
            node.to_string(),
            topology.addr(node).to_string()
        );
    }
    println!("Configs and logs: {}", topology.dir().display());
    let namespaces = topology.netns_names();
    if !namespaces.is_empty() {
        println!("Network namespaces: {}", namespaces.join(" "));
    }
    println!("Try:");
    let cli = topology.redis_cli().display();
    println!("  {cli} {} SET hello world", at(master));
    if let Some(replica) = topology.data_nodes().get(1) {
        println!("  {cli} {} GET hello", at(*replica));
    }
    if let Some(sentinel) = topology.sentinels().first() {
        println!(
            "  {cli} {} SENTINEL GET-MASTER-ADDR-BY-NAME {}",
            at(*sentinel),
            topology.master_name()
        );
        if let Some(pid) = topology.pid(master) {
            println!("  kill -9 {pid}    # kill the master; a replica takes over in about 3 s");
        }
    }
    println!("Ready. Press Ctrl-C to stop.");
}

/// SIGINT (Ctrl-C) and SIGTERM, listened for from creation on.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
