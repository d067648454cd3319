//! The binary's subcommands that act on the data in Redis and exit: users,
//! tenants, and the storage layout migration (a module of `main.rs`, not
//! of the library).

use std::io::{BufRead, IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use server::{Error, SettingError, Settings};
use tenant_kv::{Actor, MigrationProgress, NewUser, Quota, Quotas, TenantId};

#[derive(Subcommand)]
pub(crate) enum UserCommand {
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
pub(crate) enum TenantCommand {
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
pub(crate) enum LimitsCommand {
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

/// The store of the settings, on a storage layout it serves.
async fn admin_store(config: Option<PathBuf>) -> Result<tenant_kv::TenantKv, Error> {
    let settings = Settings::load(config.as_deref(), std::env::vars())?;
    crate::init_tracing("warn");
    let client = settings.redis.client()?;
    let store = settings.store(client)?;
    store.check_layout().await.map_err(Error::from_layout)?;
    Ok(store)
}

/// Migrates the data in Redis to the storage layout this version serves,
/// printing how it goes.
pub(crate) async fn migrate(
    config: Option<PathBuf>,
    batch_size: usize,
    pause: Duration,
) -> Result<(), Error> {
    let settings = Settings::load(config.as_deref(), std::env::vars())?;
    crate::init_tracing("warn");
    let store = settings.store(settings.redis.client()?)?;
    let migration = store.migration().batch_size(batch_size).pause(pause);
    migration.run(print_progress).await?;
    Ok(())
}

fn print_progress(progress: &MigrationProgress) {
    match progress {
        MigrationProgress::AlreadyCurrent => {
            println!("nothing to migrate: Redis holds storage layout 2");
        }
        MigrationProgress::Prepared {
            tenants,
            items,
            keys_moved,
        } => println!(
            "prepared {tenants} tenants: {keys_moved} keys moved, {items} items to convert; servers of this version may start now"
        ),
        MigrationProgress::Batch {
            tenant,
            walked,
            converted,
        } => println!("{tenant}: {converted} items converted, {walked} walked"),
        MigrationProgress::TenantDone { tenant, remaining } => {
            println!("{tenant}: done, {remaining} tenants left");
        }
        MigrationProgress::Done(report) => println!(
            "done: {} tenants, {} items converted, {} keys moved ({} merged) in {:.1} s; Redis holds storage layout 2",
            report.tenants,
            report.items_converted,
            report.keys_moved,
            report.keys_merged,
            report.elapsed.as_secs_f64()
        ),
        _ => {}
    }
}

fn tenant_id(tenant: &str) -> Result<TenantId, Error> {
    TenantId::new(tenant).map_err(Error::from)
}

pub(crate) async fn user(config: Option<PathBuf>, command: UserCommand) -> Result<(), Error> {
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

pub(crate) async fn tenant(config: Option<PathBuf>, command: TenantCommand) -> Result<(), Error> {
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
