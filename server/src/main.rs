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
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use log_buffer::{BufferLayer, LokiSink, Offloader};
use server::{Error, SettingError, Settings, System, settings_help};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

// mimalloc: `harness abuse` measured 38-41 µs of server CPU per GET with it
// against 52-57 µs with glibc's malloc, for 14 MiB more at idle.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod commands;
#[cfg(feature = "dev")]
mod dev_command;

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
    #[cfg(feature = "dev")]
    /// Run everything locally: a Redis master, 2 replicas and 3 sentinels on
    /// free loopback ports, demo users (user1 and admin in tenant1, user2 in
    /// tenant2) with a password printed at start-up, a random JWT secret,
    /// and logs shipped to a file (or Loki). Ctrl-C stops it all.
    Dev {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Ship logs and audit records to this Loki (e.g. http://127.0.0.1:3100).
        #[arg(long)]
        loki_url: Option<String>,
        /// Ship logs to this file (NDJSON) instead; default: in the topology's directory.
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Address serving /metrics and the probes (`off` for none).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: String,
        /// Run on a local Redis Cluster (3 shards of a master and a
        /// replica) instead of a master, 2 replicas and 3 sentinels.
        #[arg(long)]
        cluster: bool,
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
        #[cfg(feature = "dev")]
        Command::Dev {
            listen,
            loki_url,
            log_file,
            admin_listen,
            cluster,
        } => dev_command::dev(listen, loki_url, log_file, admin_listen, cluster).await,
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

/// Audit records (reads' come through `tracing`) pass any filter.
const AUDIT: &str = "audit=info";

/// stderr logging filtered by `RUST_LOG` (default `default`), and a slot
/// for the log buffer's layer.
fn init_tracing(default: &str) -> BufferSlot {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Next to the registry, so that the handle's type is short.
    let (buffer, slot) = reload::Layer::new(None);
    tracing_subscriber::registry()
        .with(buffer)
        // Every operation has its audit record, whatever `RUST_LOG` says:
        // the filter of the whole subscriber lets them through...
        .with(filter().add_directive(AUDIT.parse().expect("a valid directive")))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                // ...and stderr shows only what `RUST_LOG` asks for.
                .with_filter(filter()),
        )
        .init();
    BufferSlot(slot)
}

/// Where the log buffer's layer goes once there is one.
struct BufferSlot(reload::Handle<Option<BufferLayer>, Registry>);

impl BufferSlot {
    fn install(self, layer: Option<BufferLayer>) {
        if let Err(error) = self.0.reload(layer) {
            tracing::warn!(%error, "logs are not buffered");
        }
    }
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn serve(config: Option<PathBuf>) -> Result<(), Error> {
    let settings = Settings::load(config.as_deref(), std::env::vars())?;
    // Logging starts before the system, so that its start-up is logged; the
    // log buffer's layer joins once the system has one.
    let buffer_layer = init_tracing("info");
    let system = System::builder(settings)
        .install_log_layer(move |layer| buffer_layer.install(Some(layer)))
        .start()
        .await?;
    tracing::info!(addr = %system.local_addr(), admin = ?system.admin_addr(), "serving");
    wait_for_signal().await;
    tracing::info!("shutting down");
    let report = system.shutdown().await;
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
    let client = server::log_client(&settings.redis.client()?);
    init_tracing("info");
    let offloader = Offloader::builder(client.clone(), LokiSink::builder(url).build()?)
        .job(settings.loki_job.clone())
        .tenant_bytes_per_second(settings.loki_tenant_bytes_per_second)
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
