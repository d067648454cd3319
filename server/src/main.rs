//! `server`: runs the multi-tenant key-value service.
//!
//! ```text
//! cargo run --release -p server -- dev            # everything on a local topology
//! server serve --config server.toml               # production, settings from file and SERVER_* env
//! server offload                                  # ship buffered logs to Loki, nothing else
//! echo "$PASSWORD" | server user add --tenant acme alice
//! server user disable alice
//! ```

use std::io::{BufRead, IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use log_buffer::{BufferLayer, LogBuffer, LokiSink, Offloader};
use redis_failover::Durability;
use server::dev::{DEMO_USERS, DevOptions, DevSystem};
use server::{Error, JwtConfig, SETTINGS, Server, SettingError, Settings};
use tenant_kv::{Actor, NewUser, Quota, Quotas, TenantId};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
        command: UserCommand,
    },
    /// Inspect tenants.
    Tenant {
        /// TOML file of settings (only the redis_* ones are used).
        #[arg(long, env = "SERVER_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: TenantCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; reads the password from the first line of stdin.
    Add {
        /// The username (unique across tenants).
        username: String,
        /// The user's tenant.
        #[arg(long)]
        tenant: String,
        /// E-mail address.
        #[arg(long)]
        email: Option<String>,
        /// Full name.
        #[arg(long)]
        full_name: Option<String>,
        /// Let the user manage every API key of its tenant.
        #[arg(long)]
        admin: bool,
    },
    /// Grant or revoke the admin role (managing every API key of the tenant).
    Admin {
        /// The username.
        username: String,
        /// true to grant, false to revoke.
        #[arg(action = clap::ArgAction::Set)]
        admin: bool,
    },
    /// Refuse the user's logins and tokens from now on.
    Disable {
        /// The username.
        username: String,
    },
    /// Let a disabled user in again.
    Enable {
        /// The username.
        username: String,
    },
    /// List a tenant's users.
    List {
        /// The tenant.
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// A tenant's item count and bytes.
    Usage {
        /// The tenant.
        tenant: String,
    },
    /// A tenant's API keys (without secrets).
    ApiKeys {
        /// The tenant.
        tenant: String,
    },
    /// A tenant's quotas: see them, or override the defaults for it.
    Limits {
        #[command(subcommand)]
        command: LimitsCommand,
    },
}

#[derive(Subcommand)]
enum LimitsCommand {
    /// Each quota: the value in force, and whether it is overridden.
    Get {
        /// The tenant.
        tenant: String,
    },
    /// Override quotas: `name=value` (a number, or `unlimited`), or
    /// `name=default` to drop the override. Every instance applies them
    /// within a second. Names: max_keys, max_bytes, writes_per_second,
    /// write_burst, requests_per_second, request_burst,
    /// api_key_requests_per_second, api_key_request_burst, max_api_keys.
    Set {
        /// The tenant.
        tenant: String,
        /// `name=value` pairs.
        #[arg(required = true)]
        quotas: Vec<String>,
    },
}

fn settings_help() -> String {
    let mut help =
        String::from("Settings (TOML key; environment variable SERVER_<KEY in upper case>):\n");
    for (name, meaning) in SETTINGS {
        help.push_str(&format!("  {name:<22} {meaning}\n"));
    }
    help
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
        Command::User { config, command } => user(config, command).await,
        Command::Tenant { config, command } => tenant(config, command).await,
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
        let offloader =
            Offloader::builder(logs_client, LokiSink::builder(url.clone()).build()?).start()?;
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
    let offloader = Offloader::builder(client, LokiSink::builder(url).build()?).start()?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    offloader.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

async fn admin_store(config: Option<PathBuf>) -> Result<tenant_kv::TenantKv, Error> {
    let settings = Settings::load(config.as_deref(), std::env::vars())?;
    init_tracing(None, "warn");
    let client = settings.redis.client()?;
    Ok(settings.store(client)?)
}

fn tenant_id(tenant: &str) -> Result<TenantId, Error> {
    TenantId::new(tenant).map_err(Error::from)
}

async fn user(config: Option<PathBuf>, command: UserCommand) -> Result<(), Error> {
    let store = admin_store(config).await?;
    let users = store.users();
    let actor = Actor::system();
    match command {
        UserCommand::Add {
            username,
            tenant,
            email,
            full_name,
            admin,
        } => {
            let tenant = tenant_id(&tenant)?;
            let password = read_password()?;
            let user = NewUser {
                username,
                tenant,
                email,
                full_name,
                admin,
            };
            let user = users.create(user, &password, &actor).await?;
            println!("created user {} in tenant {}", user.username, user.tenant);
        }
        UserCommand::Disable { username } => {
            users.set_disabled(&username, true, &actor).await?;
            println!("disabled {username}");
        }
        UserCommand::Enable { username } => {
            users.set_disabled(&username, false, &actor).await?;
            println!("enabled {username}");
        }
        UserCommand::Admin { username, admin } => {
            users.set_admin(&username, admin, &actor).await?;
            let role = if admin { "an admin" } else { "not an admin" };
            println!("{username} is {role}");
        }
        UserCommand::List { tenant } => {
            for user in users.list(&tenant_id(&tenant)?).await? {
                let state = if user.disabled { "disabled" } else { "active" };
                let role = if user.admin { "admin" } else { "user" };
                println!(
                    "{}\t{state}\t{role}\t{}",
                    user.username,
                    user.email.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

async fn tenant(config: Option<PathBuf>, command: TenantCommand) -> Result<(), Error> {
    let store = admin_store(config).await?;
    match command {
        TenantCommand::Usage { tenant } => {
            let usage = store
                .tenant(tenant_id(&tenant)?, Actor::system())
                .usage()
                .await?;
            println!("keys\t{}\nbytes\t{}", usage.keys, usage.bytes);
        }
        TenantCommand::ApiKeys { tenant } => {
            for key in store.api_keys().list(&tenant_id(&tenant)?).await? {
                let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
                let owner = key.owner.as_deref().unwrap_or("-");
                println!("{}\t{}\t{owner}\t{}", key.id, key.name, scopes.join(","));
            }
        }
        TenantCommand::Limits { command } => limits(&store, command).await?,
    }
    Ok(())
}

async fn limits(store: &tenant_kv::TenantKv, command: LimitsCommand) -> Result<(), Error> {
    let show = |value: Option<u64>| value.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    match command {
        LimitsCommand::Get { tenant } => {
            let tenant = tenant_id(&tenant)?;
            let quotas = store.quotas(&tenant).await?;
            let overrides = store.quota_overrides(&tenant).await?;
            for quota in Quota::ALL {
                let source = if overrides.contains_key(&quota) {
                    "override"
                } else {
                    "default"
                };
                println!("{quota}\t{}\t{source}", show(quotas.get(quota)));
            }
        }
        LimitsCommand::Set { tenant, quotas } => {
            let tenant = tenant_id(&tenant)?;
            let invalid = |reason: String| SettingError::Invalid {
                setting: "quotas",
                reason,
            };
            // Every pair is checked before any is stored.
            let mut changes = Vec::new();
            for pair in &quotas {
                let (name, value) = pair
                    .split_once('=')
                    .ok_or_else(|| invalid(format!("{pair:?} is not name=value")))?;
                let quota: Quota = name
                    .parse()
                    .map_err(|e: tenant_kv::Error| invalid(e.to_string()))?;
                let value = match value {
                    "default" => None,
                    "unlimited" => Some(None),
                    number => Some(Some(number.parse::<u64>().map_err(|_| {
                        invalid(format!("{pair:?}: a number, unlimited or default"))
                    })?)),
                };
                if let Some(value) = value {
                    Quotas::unlimited()
                        .set(quota, value)
                        .map_err(|e| invalid(format!("{pair:?}: {e}")))?;
                }
                changes.push((quota, value));
            }
            let actor = Actor::system();
            for (quota, value) in changes {
                match value {
                    Some(value) => store.set_quota(&tenant, quota, value, &actor).await?,
                    None => store.reset_quota(&tenant, quota, &actor).await?,
                }
                let shown = value.map_or_else(|| "default".to_owned(), show);
                println!("{quota} = {shown}");
            }
        }
    }
    Ok(())
}

/// The first line of stdin, without its line ending.
fn read_password() -> Result<String, Error> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password (echoed; pipe it in to avoid that): ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| SettingError::Invalid {
            setting: "password",
            reason: format!("cannot read stdin: {e}"),
        })?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err(SettingError::Invalid {
            setting: "password",
            reason: "stdin gave an empty password".to_owned(),
        }
        .into());
    }
    Ok(password)
}
