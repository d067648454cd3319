//! `server dev`: the whole service on a local topology, with demo users.

use std::net::SocketAddr;
use std::path::PathBuf;

use server::dev::{DEMO_USERS, DevOptions, DevSystem};
use server::{Error, SettingError};

use crate::{init_tracing, wait_for_signal};

pub(crate) async fn dev(
    listen: SocketAddr,
    loki_url: Option<String>,
    log_file: Option<PathBuf>,
    admin_listen: String,
) -> Result<(), Error> {
    let admin_listen = match admin_listen.as_str() {
        "off" => None,
        addr => Some(addr.parse().map_err(|_| SettingError::Invalid {
            setting: "admin_listen",
            reason: "expected ip:port, or off".to_owned(),
        })?),
    };
    println!("starting a Redis master, 2 replicas and 3 sentinels on loopback...");
    let options = DevOptions {
        listen,
        loki_url,
        log_file,
        admin_listen,
        ..DevOptions::default()
    };
    let mut system = DevSystem::start(options).await?;
    init_tracing("info").install(system.take_log_layer());
    let addr = system.local_addr();
    let admin = system
        .admin_addr()
        .map_or_else(|| "off".to_owned(), |admin| format!("http://{admin}"));
    let master = system.topology.initial_master();
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
         redis master {} (pid {}), sentinels {:?}\n\n\
         Try:\n\
         TOKEN=$(curl -s -X POST http://{addr}/token -d username=user1 -d password={password} | sed -E 's/.*\"access_token\":\"([^\"]+)\".*/\\1/')\n\
         curl -s -X POST 'http://{addr}/data?key=greeting' -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -d '{{\"value\": {{\"text\": \"hello\"}}, \"ttl\": 3600}}'\n\
         curl -si http://{addr}/data/greeting -H \"Authorization: Bearer $TOKEN\"\n\
         curl -s 'http://{addr}/data?prefix=gr' -H \"Authorization: Bearer $TOKEN\"\n\
         curl -s -X POST http://{addr}/api-keys -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -d '{{\"name\": \"ci\", \"scopes\": [\"read\"]}}'\n\
         curl -s http://{addr}/usage -H \"Authorization: Bearer $TOKEN\"\n\
         curl -s http://{addr}/readyz; curl -s {admin}/metrics | head\n\
         kill -9 {}   # kill the master: requests keep working once Sentinel promotes a replica\n\n\
         Ctrl-C stops the server and the topology.",
        users.join(", "),
        system.logs_to,
        system.topology.addr(master),
        system.topology.pid(master).unwrap_or_default(),
        system.topology.sentinel_addrs(),
        system.topology.pid(master).unwrap_or_default(),
    );
    wait_for_signal().await;
    println!("shutting down...");
    let report = system.shutdown().await;
    if !report.drained {
        eprintln!("some requests were still running after the grace period");
    }
    Ok(())
}
