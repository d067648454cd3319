//! `server`: runs the multi-tenant key-value service.
//!
//! ```text
//! cargo run --release -p server -- dev            # everything on a local topology
//! server serve --config server.toml               # production, settings from file and SERVER_* env
//! server offload                                  # ship buffered logs to Loki, nothing else
//! echo "$PASSWORD" | server user add --tenant acme alice
//! server user disable alice
//! server migrate                                  # storage layout 1 to 2, while servers serve
//! ```

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use log_buffer::{BufferLayer, LogBuffer, LokiSink, Offloader};
use redis_failover::Durability;
use server::dev::{DEMO_USERS, DevOptions, DevSystem};
use server::{Error, JwtConfig, Server, SettingError, Settings, settings_help};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

mod commands;

#[derive(Parser)]
#[command(
    name = "server",
    version,
    about = "Multi-tenant key-value and API-key service on Redis with Sentinel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything locally: a Redis master, 2 replicas and 3 sentinels on
    /// free loopback ports, demo users (user1 and admin in tenant1, user2 in
    /// tenant2) with a password printed at start-up, a random JWT secret,
    /// and logs shipped to a file (or Loki). Ctrl-C stops it all.
    Dev {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Ship logs and audit records to this Loki (e.g. http://127.0.0.1:3100).
        #[arg(long)]
        loki_url: Option<String>,
        /// Ship logs to this file (NDJSON) instead; default: in the topology's directory.
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Address serving /metrics and the probes (`off` for none).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: String,
    },
    /// Production mode: settings from a TOML file and SERVER_* environment
    /// variables (which win). Invalid settings exit with status 2.
    #[command(after_long_help = settings_help())]
    Serve {
        /// TOML file of settings.
        #[arg(long, env = "SERVER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Ship buffered logs and audit records to Loki (`loki_url`), and
    /// nothing else; run any number, they share the work.
    #[command(after_long_help = settings_help())]
    Offload {
        /// TOML file of settings.
        #[arg(long, env = "SERVER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Manage users (the password is read from stdin, never from arguments).
    User {
        /// TOML file of settings (only the redis_* ones are used).
        #[arg(long, env = "SERVER_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: commands::UserCommand,
    },
    /// Inspect tenants.
    Tenant {
        /// TOML file of settings (only the redis_* ones are used).
        #[arg(long, env = "SERVER_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: commands::TenantCommand,
    },
    /// Move the data in Redis from tenant-kv's storage layout 1 to layout
    /// 2, printing progress, while servers of this version serve it (they
    /// may start once it prints `prepared`; those of the previous version
    /// must be stopped first). Run it again to resume after a stop; exits 0
    /// once Redis holds layout 2.
    #[command(after_long_help = settings_help())]
    Migrate {
        /// TOML file of settings (the redis_* ones and encryption_key are used).
        #[arg(long, env = "SERVER_CONFIG")]
        config: Option<PathBuf>,
        /// Items converted per script (1 to 10000); each holds Redis that long.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// Milliseconds to wait after each batch, leaving Redis to the service.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Dev {
            listen,
            loki_url,
            log_file,
            admin_listen,
        } => dev(listen, loki_url, log_file, admin_listen).await,
        Command::Serve { config } => serve(config).await,
        Command::Offload { config } => offload(config).await,
        Command::User { config, command } => commands::user(config, command).await,
        Command::Tenant { config, command } => commands::tenant(config, command).await,
        Command::Migrate {
            config,
            batch_size,
            pause_ms,
        } => commands::migrate(config, batch_size, Duration::from_millis(pause_ms)).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = format!("error: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            if matches!(error, Error::Setting(_)) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// stderr logging filtered by `RUST_LOG` (default `info`), plus the log
/// buffer's layer when there is one.
fn init_tracing(buffer: Option<BufferLayer>, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(buffer)
        .init();
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn dev(
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
    init_tracing(system.take_log_layer(), "info");
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

async fn serve(config: Option<PathBuf>) -> Result<(), Error> {
    let settings = Settings::load(config.as_deref(), std::env::vars())?;
    let jwt = JwtConfig::from_settings(&settings.jwt)?;
    let client = settings.redis.client()?;
    let store = settings.store(client.clone())?;
    check_layout(&store).await?;
    let mut builder =
        Server::builder(store.clone(), client.clone(), jwt).limits(settings.limits.clone());
    if let Some(admin) = settings.admin_listen {
        builder = builder.admin(admin);
    }
    if let Some(header) = &settings.protection.client_address_header {
        builder = builder.client_address_header(header.clone());
    }
    // Log records and acknowledgements of shipped ones need no replica:
    // only the data's writes wait for `redis_wait_replicas`.
    let logs_client = client.with_durability(Durability::Master);
    let mut layer = None;
    if settings.log_buffer {
        let buffer = LogBuffer::builder(logs_client.clone()).start()?;
        layer = Some(buffer.layer());
        builder = builder.log_buffer(buffer);
    }
    if let Some(url) = &settings.loki_url {
        let offloader = Offloader::builder(logs_client, LokiSink::builder(url.clone()).build()?)
            .job(settings.loki_job.clone())
            .start()?;
        builder = builder.offloader(offloader);
    }
    init_tracing(layer, "info");
    let expiry = store.watch_expirations();
    let server = builder.bind(settings.listen).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    let report = server.shutdown().await;
    expiry.shutdown().await;
    if !report.drained {
        tracing::warn!("some requests were still running after the grace period");
    }
    Ok(())
}

/// Refuses to serve a storage layout the store does not serve. Redis out
/// of reach is no reason not to start: the store checks again before its
/// first operation, and refuses then.
async fn check_layout(store: &tenant_kv::TenantKv) -> Result<(), Error> {
    match store.check_layout().await {
        Ok(_) => Ok(()),
        Err(tenant_kv::Error::Redis(error)) => {
            eprintln!("warning: cannot check the storage layout in Redis yet: {error}");
            Ok(())
        }
        Err(error) => Err(Error::from_layout(error)),
    }
}

async fn offload(config: Option<PathBuf>) -> Result<(), Error> {
    let settings = Settings::load(config.as_deref(), std::env::vars())?;
    let url = settings
        .loki_url
        .clone()
        .ok_or_else(|| SettingError::Invalid {
            setting: "loki_url",
            reason: "the offloader needs it".to_owned(),
        })?;
    let client = settings.redis.client()?.with_durability(Durability::Master);
    init_tracing(None, "info");
    let offloader = Offloader::builder(client.clone(), LokiSink::builder(url).build()?)
        .job(settings.loki_job.clone())
        .start()?;
    // Its figures on /metrics, as a server's, unless `admin_listen = off`.
    let Some(admin) = settings.admin_listen else {
        wait_for_signal().await;
        tracing::info!("shutting down");
        offloader.shutdown(Duration::from_secs(10)).await;
        return Ok(());
    };
    let offloader = server::OffloaderAdmin::bind(admin, client, offloader).await?;
    tracing::info!(admin = %offloader.local_addr(), "serving /metrics");
    wait_for_signal().await;
    tracing::info!("shutting down");
    offloader.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
