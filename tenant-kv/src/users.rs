//! Users: global usernames, each in one tenant, with argon2id password
//! hashes (bcrypt hashes imported from elsewhere still verify), and the
//! logins against them, throttled per username and per client address.

use std::collections::HashMap;
use std::time::Duration;

use crate::audit::audit_record;
use crate::auth_cache::USER_PREFIX;
use crate::error::{Error, Result};
use crate::keys::{TenantId, TenantKeys, fingerprint};
use crate::passwords::{DECOY_HASH, check_password, is_known_hash};
use crate::ratelimit::{self, Check, Rate};
use crate::scripts::LOGIN_FAILED;
use crate::slots;
use crate::store::{Actor, TenantKv};

/// The longest username, in bytes.
pub const MAX_USERNAME_LEN: usize = 64;

/// A user as stored, without the password hash.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct User {
    /// The username, unique across tenants.
    pub username: String,
    /// The tenant the user belongs to.
    pub tenant: TenantId,
    /// An e-mail address, if given.
    pub email: Option<String>,
    /// A display name, if given.
    pub full_name: Option<String>,
    /// A disabled user cannot log in, and its tokens and API keys stop
    /// working.
    pub disabled: bool,
    /// An admin manages every API key of its tenant, not only its own.
    pub admin: bool,
}

/// A user to create.
#[derive(Clone, Debug)]
pub struct NewUser {
    /// 1 to 64 ASCII letters, digits or `_.@-`, unique across tenants.
    pub username: String,
    /// The tenant the user belongs to.
    pub tenant: TenantId,
    /// An e-mail address.
    pub email: Option<String>,
    /// A display name.
    pub full_name: Option<String>,
    /// Whether the user manages every API key of its tenant.
    pub admin: bool,
}

/// How logins are throttled, with the state in Redis so that every
/// instance shares it; `None` turns a limit off. An attempt one limit
/// refuses counts against none (a guesser's refused attempts do not use
/// up its victim's), and checks no password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoginThrottle {
    /// Attempts on one username from one client address (from anywhere
    /// when the caller names no address). Defaults to 10 a minute.
    pub per_username: Option<Rate>,
    /// Attempts on one username from every address together: what a
    /// guesser with many addresses gets, and what it takes to lock the
    /// user out. Defaults to 100 a minute.
    pub per_username_total: Option<Rate>,
    /// Attempts from one client address (as the caller names it: see
    /// [`Users::authenticate_from`]). Defaults to 30 a minute.
    pub per_source: Option<Rate>,
    /// `login_failed` audit records of one tenant; failures past it are
    /// counted, and the next record written carries the count
    /// (`suppressed`). Defaults to 60 a minute.
    pub failed_records: Option<Rate>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self {
            per_username: Some(Rate::per_minute(10)),
            per_username_total: Some(Rate::per_minute(100)),
            per_source: Some(Rate::per_minute(30)),
            failed_records: Some(Rate::per_minute(60)),
        }
    }
}

impl LoginThrottle {
    /// No throttling, and a record for every failed login.
    pub fn off() -> Self {
        Self {
            per_username: None,
            per_username_total: None,
            per_source: None,
            failed_records: None,
        }
    }

    /// With `rate` per username and client address (`None`: off).
    #[must_use]
    pub fn per_username(mut self, rate: Option<Rate>) -> Self {
        self.per_username = rate;
        self
    }

    /// With `rate` per username from every address (`None`: off).
    #[must_use]
    pub fn per_username_total(mut self, rate: Option<Rate>) -> Self {
        self.per_username_total = rate;
        self
    }

    /// With `rate` per client address (`None`: off).
    #[must_use]
    pub fn per_source(mut self, rate: Option<Rate>) -> Self {
        self.per_source = rate;
        self
    }

    /// With `rate` of `login_failed` records per tenant (`None`: every one).
    #[must_use]
    pub fn failed_records(mut self, rate: Option<Rate>) -> Self {
        self.failed_records = rate;
        self
    }
}

/// Users of every tenant, from [`TenantKv::users`].
#[derive(Clone, Debug)]
pub struct Users {
    store: TenantKv,
}

pub(crate) fn user_key(username: &str) -> String {
    [USER_PREFIX, username].concat()
}

fn check_username(username: &str) -> Result<()> {
    let valid = !username.is_empty()
        && username.len() <= MAX_USERNAME_LEN
        && username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b));
    if valid {
        Ok(())
    } else {
        // The name itself stays out: it may be huge, or forge what it is shown in.
        Err(Error::InvalidUser {
            reason: format!(
                "a username is 1 to {MAX_USERNAME_LEN} ASCII letters, digits or _.@- ({} bytes given)",
                username.len()
            ),
        })
    }
}

impl TenantKv {
    /// The users of every tenant.
    pub fn users(&self) -> Users {
        Users {
            store: self.clone(),
        }
    }
}

impl Users {
    fn client(&self) -> &redis_failover::FailoverClient {
        &self.store.inner.client
    }

    /// Creates a user with `password` (hashed with argon2id); fails with
    /// [`Error::UserExists`] if the username is taken in any tenant.
    pub async fn create(&self, user: NewUser, password: &str, actor: &Actor) -> Result<User> {
        check_password(password)?;
        let hash = self.store.inner.hasher.hash(password.to_owned()).await?;
        self.create_with_hash(user, &hash, actor).await
    }

    /// Creates a user with a password hash made elsewhere: an argon2 PHC
    /// string, or a bcrypt hash (`$2b$...`) carried over from another system.
    pub async fn import(&self, user: NewUser, password_hash: &str, actor: &Actor) -> Result<User> {
        if !is_known_hash(password_hash) {
            return Err(Error::InvalidUser {
                reason: "the hash is neither an argon2 PHC string nor bcrypt".to_owned(),
            });
        }
        self.create_with_hash(user, password_hash, actor).await
    }

    async fn create_with_hash(&self, user: NewUser, hash: &str, actor: &Actor) -> Result<User> {
        check_username(&user.username)?;
        let key = user_key(&user.username);
        // HSETNX claims the name; the rest follows only if it was free.
        let claimed: bool = self
            .client()
            .query(
                redis::cmd("HSETNX")
                    .arg(&key)
                    .arg("tenant")
                    .arg(user.tenant.as_str()),
            )
            .await?;
        if !claimed {
            return Err(Error::UserExists {
                username: user.username,
            });
        }
        let admin = if user.admin { "1" } else { "0" };
        let mut fields = vec![("password_hash", hash), ("disabled", "0"), ("admin", admin)];
        if let Some(email) = &user.email {
            fields.push(("email", email));
        }
        if let Some(full_name) = &user.full_name {
            fields.push(("full_name", full_name));
        }
        let mut listed = redis::pipe();
        listed
            .sadd(TenantKeys::new(&user.tenant).users(), &user.username)
            .ignore()
            .add_command(audit_record(
                &self.store.inner,
                &user.tenant,
                actor,
                "create_user",
                &user.username,
            ))
            .ignore();
        let mut record = redis::pipe();
        record.hset_multiple(&key, &fields).ignore();
        // The password hash last: on a cluster, a user is never able to
        // log in before it is listed and recorded.
        slots::apply(self.client(), vec![listed, record]).await?;
        Ok(User {
            username: user.username,
            tenant: user.tenant,
            email: user.email,
            full_name: user.full_name,
            disabled: false,
            admin: user.admin,
        })
    }

    /// The user, from the authentication cache when it serves
    /// ([`TenantKv::cache_auth`]).
    async fn load_cached(&self, username: &str) -> Result<Option<User>> {
        check_username(username)?;
        let inner = &self.store.inner;
        let fields = inner
            .auth_cache
            .fetch(&inner.client, &user_key(username))
            .await?;
        user_from_fields(username, &fields)
    }

    /// The user and its password hash, for a name already checked.
    async fn fetch(&self, username: &str) -> Result<Option<(User, String)>> {
        let mut fields: HashMap<String, String> = self
            .client()
            .query(redis::cmd("HGETALL").arg(user_key(username)))
            .await?;
        let user = user_from_fields(username, &fields)?;
        Ok(user.zip(fields.remove("password_hash")))
    }

    /// The user named `username`. While the authentication cache runs
    /// ([`TenantKv::cache_auth`]), from the cache when it holds the user:
    /// a change made elsewhere shows within the master's invalidation
    /// push, one made through this store at once.
    pub async fn get(&self, username: &str) -> Result<User> {
        match self.load_cached(username).await? {
            Some(user) => Ok(user),
            None => Err(Error::UnknownUser {
                username: username.to_owned(),
            }),
        }
    }

    /// Checks a login, as [`authenticate_from`](Self::authenticate_from)
    /// without a client address.
    pub async fn authenticate(&self, username: &str, password: &str) -> Result<User> {
        self.authenticate_from(username, password, None).await
    }

    /// Checks a login from the client address `source` (a text naming it,
    /// such as an IP address or a network; only throttling uses it).
    ///
    /// A malformed username or a password over [`MAX_PASSWORD_LEN`] is
    /// refused first ([`Error::InvalidUser`]), with nothing hashed or
    /// recorded. Then the attempt is booked against the [`LoginThrottle`]
    /// ([`Error::LoginThrottled`]) and waits for a hashing slot
    /// ([`Error::Overloaded`] when none frees up soon). Unknown users,
    /// wrong passwords and disabled users all fail with
    /// [`Error::InvalidCredentials`] after the same work. A known user's
    /// attempt leaves a `login_success` or `login_failed` record in its
    /// tenant's audit stream (`login_failed` at most at the throttle's
    /// `failed_records` rate); an unknown one, a log record naming only a
    /// fingerprint of the username.
    ///
    /// [`MAX_PASSWORD_LEN`]: crate::MAX_PASSWORD_LEN
    pub async fn authenticate_from(
        &self,
        username: &str,
        password: &str,
        source: Option<&str>,
    ) -> Result<User> {
        check_username(username)?;
        check_password(password)?;
        self.throttle(username, source).await?;
        let hasher = &self.store.inner.hasher;
        let Some((user, hash)) = self.fetch(username).await? else {
            hasher
                .verify(password.to_owned(), DECOY_HASH.to_owned())
                .await?;
            tracing::info!(
                target: "audit",
                action = "login_failed",
                username_sha256 = fingerprint(username),
                reason = "unknown user"
            );
            return Err(Error::InvalidCredentials);
        };
        let matches = hasher.verify(password.to_owned(), hash).await?;
        if matches && !user.disabled {
            let record = audit_record(
                &self.store.inner,
                &user.tenant,
                &Actor::user(&user.username),
                "login_success",
                &user.username,
            );
            let _: String = self.store.inner.bookkeeping.query(&record).await?;
            return Ok(user);
        }
        // Recorded off the answer's path: a known user's failure takes as
        // long to answer as an unknown one's.
        let users = self.clone();
        tokio::spawn(async move {
            if let Err(error) = users.record_failure(&user).await {
                tracing::warn!(%error, username = user.username, "the login_failed record was not written");
            }
        });
        Err(Error::InvalidCredentials)
    }

    /// Books a login attempt against the throttle's limits, all or none.
    async fn throttle(&self, username: &str, source: Option<&str>) -> Result<()> {
        let throttle = &self.store.inner.login_throttle;
        // A caller's odd text becomes a fixed-size name.
        let source = source.map(|source| {
            if source.len() <= 64 && source.bytes().all(|b| b.is_ascii_graphic()) {
                source.to_owned()
            } else {
                fingerprint(source)
            }
        });
        // One hash tag: all of a login's limits are in one slot of a cluster.
        let key = |rest: String| format!("{{login-throttle}}:{rest}");
        let from = source
            .as_deref()
            .map_or_else(String::new, |s| format!(":from:{s}"));
        let limits = [
            (
                "login_username",
                throttle.per_username,
                key(format!("user:{username}{from}")),
            ),
            (
                "login_username",
                throttle.per_username_total.filter(|_| source.is_some()),
                key(format!("user:{username}")),
            ),
            (
                "login_address",
                throttle.per_source.filter(|_| source.is_some()),
                key(format!("source:{}", source.as_deref().unwrap_or_default())),
            ),
        ];
        let checks: Vec<Check> = limits
            .into_iter()
            .filter_map(|(policy, rate, key)| {
                Some(Check {
                    policy,
                    key,
                    rate: rate?,
                })
            })
            .collect();
        let settings = &self.store.inner;
        let statuses = ratelimit::book(&settings.bookkeeping, &settings.refusals, &checks).await?;
        match ratelimit::verdict(statuses) {
            Ok(_) => Ok(()),
            Err(refused) => Err(Error::LoginThrottled {
                retry_after: refused.retry_after.unwrap_or(Duration::from_secs(1)),
            }),
        }
    }

    /// The `login_failed` record of `user`, or only its count when the
    /// tenant's records come faster than the throttle allows.
    async fn record_failure(&self, user: &User) -> Result<()> {
        let settings = &self.store.inner;
        let rate = settings.login_throttle.failed_records;
        let keys = TenantKeys::new(&user.tenant);
        let mut command = LOGIN_FAILED.command(&[
            keys.login_failed_rate(),
            keys.login_failed_suppressed(),
            keys.audit(),
        ]);
        command
            .arg(rate.map_or_else(String::new, |rate| rate.interval_us().to_string()))
            .arg(rate.map_or(1, |rate| rate.burst_size()))
            .arg(settings.audit_max_len)
            .arg(user.tenant.as_str())
            .arg(&user.username);
        let _: u8 = LOGIN_FAILED
            .run(&settings.bookkeeping, &command, false)
            .await?;
        Ok(())
    }

    /// Disables (or enables again) a user: a disabled user cannot log in,
    /// and its tokens and API keys stop working.
    pub async fn set_disabled(
        &self,
        username: &str,
        disabled: bool,
        actor: &Actor,
    ) -> Result<User> {
        let action = if disabled {
            "disable_user"
        } else {
            "enable_user"
        };
        let mut user = self
            .set_flag(username, "disabled", disabled, action, actor)
            .await?;
        user.disabled = disabled;
        Ok(user)
    }

    /// Makes a user an admin of its tenant's API keys, or not any more.
    pub async fn set_admin(&self, username: &str, admin: bool, actor: &Actor) -> Result<User> {
        let action = if admin { "grant_admin" } else { "revoke_admin" };
        let mut user = self
            .set_flag(username, "admin", admin, action, actor)
            .await?;
        user.admin = admin;
        Ok(user)
    }

    /// Sets one of a user's flags, with the `action` audit record; returns
    /// the user as it was.
    async fn set_flag(
        &self,
        username: &str,
        flag: &str,
        on: bool,
        action: &str,
        actor: &Actor,
    ) -> Result<User> {
        check_username(username)?;
        // Not from the cache: the write acts on what Redis holds.
        let Some((user, _)) = self.fetch(username).await? else {
            return Err(Error::UnknownUser {
                username: username.to_owned(),
            });
        };
        let mut record = redis::pipe();
        record
            .add_command(audit_record(
                &self.store.inner,
                &user.tenant,
                actor,
                action,
                username,
            ))
            .ignore();
        let mut change = redis::pipe();
        change
            .hset(user_key(username), flag, if on { "1" } else { "0" })
            .ignore();
        let written = slots::apply(self.client(), vec![record, change]).await;
        // Forgotten here at once, even if the outcome is unknown; other
        // instances hear of it from the master.
        self.store
            .inner
            .auth_cache
            .invalidate([user_key(username).as_str()]);
        written?;
        Ok(user)
    }

    /// The users of `tenant`, by username.
    pub async fn list(&self, tenant: &TenantId) -> Result<Vec<User>> {
        let mut names: Vec<String> = self
            .client()
            .query(redis::cmd("SMEMBERS").arg(TenantKeys::new(tenant).users()))
            .await?;
        names.sort();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let reads = names
            .iter()
            .map(|name| redis::cmd("HGETALL").arg(user_key(name)).clone())
            .collect();
        let all: Vec<HashMap<String, String>> = slots::read_all(self.client(), reads).await?;
        let mut users = Vec::with_capacity(names.len());
        for (name, fields) in names.iter().zip(all) {
            // A user deleted meanwhile is left out.
            if let Some(user) = user_from_fields(name, &fields)? {
                users.push(user);
            }
        }
        Ok(users)
    }
}

/// A user from its hash fields; `None` if there is no such user (a
/// user's hash always has a tenant and a password hash).
fn user_from_fields(username: &str, fields: &HashMap<String, String>) -> Result<Option<User>> {
    // One pass over the fields rather than a lookup (a hash) for each:
    // every authenticated request reads its user.
    let (mut tenant, mut password_hash, mut email, mut full_name) = (None, false, None, None);
    let (mut disabled, mut admin) = (false, false);
    for (name, value) in fields {
        match name.as_str() {
            "tenant" => tenant = Some(value),
            "password_hash" => password_hash = true,
            "email" => email = Some(value),
            "full_name" => full_name = Some(value),
            "disabled" => disabled = value == "1",
            "admin" => admin = value == "1",
            _ => {}
        }
    }
    let Some(tenant) = tenant.filter(|_| password_hash) else {
        return Ok(None);
    };
    let user = User {
        username: username.to_owned(),
        tenant: TenantId::new(tenant.clone())?,
        email: email.cloned(),
        full_name: full_name.cloned(),
        disabled,
        admin,
    };
    Ok(Some(user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_read_from_their_fields() {
        let fields = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect()
        };
        let full = fields(&[
            ("tenant", "acme"),
            ("password_hash", "$argon2id$..."),
            ("email", "a@example.com"),
            ("full_name", "Ann"),
            ("disabled", "1"),
            ("admin", "0"),
            ("created_at", "1"),
        ]);
        let user = user_from_fields("ann", &full).unwrap().unwrap();
        assert_eq!(user.username, "ann");
        assert_eq!(user.tenant.as_str(), "acme");
        assert_eq!(user.email.as_deref(), Some("a@example.com"));
        assert_eq!(user.full_name.as_deref(), Some("Ann"));
        assert!(user.disabled && !user.admin);
        let plain = fields(&[("tenant", "acme"), ("password_hash", "h"), ("admin", "1")]);
        let user = user_from_fields("bo", &plain).unwrap().unwrap();
        assert!(user.admin && !user.disabled && user.email.is_none());
        // A hash without a tenant or a password hash is no user.
        for partial in [
            fields(&[("tenant", "acme")]),
            fields(&[("password_hash", "h")]),
        ] {
            assert!(user_from_fields("cy", &partial).unwrap().is_none());
        }
        let bad = fields(&[("tenant", "not a tenant!"), ("password_hash", "h")]);
        assert!(user_from_fields("di", &bad).is_err());
    }

    #[test]
    fn usernames_are_checked() {
        assert!(check_username("alice@example.com").is_ok());
        for bad in ["", "a b", "a:b", "ü", &"a".repeat(65)] {
            assert!(check_username(bad).is_err(), "{bad:?}");
        }
    }
}
