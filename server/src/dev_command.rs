//! `server dev`: the whole service on a local topology, with demo users.

use std::net::SocketAddr;
use std::path::PathBuf;

use server::dev::{DEMO_USERS, DevOptions, DevSystem, Dir};
use server::{Error, SettingError};

use crate::{init_tracing, wait_for_signal};

pub(crate) async fn dev(
    listen: SocketAddr,
    loki_url: Option<String>,
    log_file: Option<PathBuf>,
    admin_listen: String,
    cluster: bool,
) -> Result<(), Error> {
    let admin_listen = match admin_listen.as_str() {
        "off" => None,
        addr => Some(addr.parse().map_err(|_| SettingError::Invalid {
            setting: "admin_listen",
            reason: "expected ip:port, or off".to_owned(),
        })?),
    };
    let options = DevOptions {
        listen,
        loki_url,
        log_file,
        admin_listen,
        ..DevOptions::default()
    };
    if cluster {
        println!(
            "starting a Redis Cluster of 3 shards (a master and a replica each) on loopback..."
        );
        let system = DevSystem::start_cluster(options, 3).await?;
        let masters: Vec<String> = system
            .client
            .masters()
            .iter()
            .map(ToString::to_string)
            .collect();
        let redis = format!(
            "redis cluster masters {}\n\
             (redis-topology's local cluster; each tenant's keys live on one shard)",
            masters.join(", ")
        );
        serve(system, &redis, "").await
    } else {
        println!("starting a Redis master, 2 replicas and 3 sentinels on loopback...");
        let system = DevSystem::start(options).await?;
        let topology = &system.topology;
        let master = topology.initial_master();
        let pid = topology.pid(master).unwrap_or_default();
        let redis = format!(
            "redis master {} (pid {pid}), sentinels {:?}",
            topology.addr(master),
            topology.sentinel_addrs(),
        );
        let kill = format!(
            "kill -9 {pid}   # kill the master: requests keep working once Sentinel promotes a replica\n"
        );
        serve(system, &redis, &kill).await
    }
}

/// Prints how to use the running `system` (on Redis described by
/// `redis`, with a last hint `kill`), then serves until a signal.
async fn serve<T: Dir>(mut system: DevSystem<T>, redis: &str, kill: &str) -> Result<(), Error> {
    init_tracing("info").install(system.take_log_layer());
    let addr = system.local_addr();
    let admin = system
        .admin_addr()
        .map_or_else(|| "off".to_owned(), |admin| format!("http://{admin}"));
    let password = &system.password;
    let users: Vec<String> = DEMO_USERS
        .iter()
        .map(|(user, tenant)| format!("{user} ({tenant})"))
        .collect();
    println!(
        "\nserver listening on http://{addr}\n\
         users:    {}\n\
         password: {password}\n\
         logs:     {}\n\
         admin:    {admin} (/metrics, /healthz, /readyz)\n\
         {redis}\n\n\
         Try:\n\
         TOKEN=$(curl -s -X POST http://{addr}/token -d username=user1 -d password={password} | sed -E 's/.*\"access_token\":\"([^\"]+)\".*/\\1/')\n\
         curl -s -X POST 'http://{addr}/data?key=greeting' -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -d '{{\"value\": {{\"text\": \"hello\"}}, \"ttl\": 3600}}'\n\
         curl -si http://{addr}/data/greeting -H \"Authorization: Bearer $TOKEN\"\n\
         curl -s 'http://{addr}/data?prefix=gr' -H \"Authorization: Bearer $TOKEN\"\n\
         curl -s -X POST http://{addr}/api-keys -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -d '{{\"name\": \"ci\", \"scopes\": [\"read\"]}}'\n\
         curl -s http://{addr}/usage -H \"Authorization: Bearer $TOKEN\"\n\
         curl -s http://{addr}/readyz; curl -s {admin}/metrics | head\n\
         {kill}\n\
         Ctrl-C stops the server and the topology.",
        users.join(", "),
        system.logs_to,
    );
    wait_for_signal().await;
    println!("shutting down...");
    let report = system.shutdown().await;
    if !report.drained {
        eprintln!("some requests were still running after the grace period");
    }
    Ok(())
}
