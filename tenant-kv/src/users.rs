//! Users: global usernames, each in one tenant, with argon2id password
//! hashes (bcrypt hashes imported from elsewhere still verify).

use std::collections::HashMap;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::error::{Error, Result};
use crate::keys::{TenantId, TenantKeys};
use crate::store::{Actor, TenantKv, audit_record};

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
    /// A disabled user cannot log in.
    pub disabled: bool,
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
}

/// Users of every tenant, from [`TenantKv::users`].
#[derive(Clone, Debug)]
pub struct Users {
    store: TenantKv,
}

fn user_key(username: &str) -> String {
    format!("user:{username}")
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
        Err(Error::InvalidUser {
            reason: format!(
                "{username:?} must be 1 to {MAX_USERNAME_LEN} ASCII letters, digits or _.@-"
            ),
        })
    }
}

/// Hashes `password` with argon2id and a random salt, off the async threads.
async fn hash_password(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
            .expect("16 bytes make a valid salt");
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| Error::InvalidUser {
                reason: format!("the password cannot be hashed: {e}"),
            })
    })
    .await
    .expect("hashing does not panic")
}

/// Checks `password` against a stored argon2 (PHC string) or bcrypt hash.
async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        if hash.starts_with("$2") {
            bcrypt::verify(&password, &hash).unwrap_or(false)
        } else {
            PasswordHash::new(&hash).is_ok_and(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
        }
    })
    .await
    .unwrap_or(false)
}

/// A hash to check unknown usernames against, so they take as long as known ones.
const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$8CeSqt1f8C3sYBRE0GnCWc5d5RWq8bIPI+6VGbCFP0c";

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
        if password.is_empty() {
            return Err(Error::InvalidUser {
                reason: "the password is empty".to_owned(),
            });
        }
        let hash = hash_password(password.to_owned()).await?;
        self.create_with_hash(user, &hash, actor).await
    }

    /// Creates a user with a password hash made elsewhere: an argon2 PHC
    /// string, or a bcrypt hash (`$2b$...`) carried over from another system.
    pub async fn import(&self, user: NewUser, password_hash: &str, actor: &Actor) -> Result<User> {
        let known = password_hash.starts_with("$2") || PasswordHash::new(password_hash).is_ok();
        if !known {
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
        let mut fields = vec![("password_hash", hash), ("disabled", "0")];
        if let Some(email) = &user.email {
            fields.push(("email", email));
        }
        if let Some(full_name) = &user.full_name {
            fields.push(("full_name", full_name));
        }
        let settings = &self.store.inner;
        let _: () = self
            .client()
            .query_pipeline(
                redis::pipe()
                    .atomic()
                    .hset_multiple(&key, &fields)
                    .ignore()
                    .sadd(TenantKeys::new(&user.tenant).users(), &user.username)
                    .ignore()
                    .add_command(audit_record(
                        settings,
                        &user.tenant,
                        actor,
                        "create_user",
                        &user.username,
                    ))
                    .ignore(),
            )
            .await?;
        Ok(User {
            username: user.username,
            tenant: user.tenant,
            email: user.email,
            full_name: user.full_name,
            disabled: false,
        })
    }

    async fn load(&self, username: &str) -> Result<Option<(User, String)>> {
        check_username(username)?;
        let fields: HashMap<String, String> = self
            .client()
            .query(redis::cmd("HGETALL").arg(user_key(username)))
            .await?;
        user_from_fields(username, fields)
    }

    /// The user named `username`.
    pub async fn get(&self, username: &str) -> Result<User> {
        match self.load(username).await? {
            Some((user, _)) => Ok(user),
            None => Err(Error::UnknownUser {
                username: username.to_owned(),
            }),
        }
    }

    /// Checks a login. Unknown users, wrong passwords and disabled users
    /// all fail with [`Error::InvalidCredentials`] (after the same work),
    /// and each attempt on a known user leaves a `login_success` or
    /// `login_failed` audit record in its tenant.
    pub async fn authenticate(&self, username: &str, password: &str) -> Result<User> {
        let loaded = match check_username(username) {
            Ok(()) => self.load(username).await?,
            Err(_) => None,
        };
        let Some((user, hash)) = loaded else {
            verify_password(password.to_owned(), DECOY_HASH.to_owned()).await;
            tracing::info!(target: "audit", action = "login_failed", username, reason = "unknown user");
            return Err(Error::InvalidCredentials);
        };
        let matches = verify_password(password.to_owned(), hash).await;
        let ok = matches && !user.disabled;
        let action = if ok { "login_success" } else { "login_failed" };
        let record = audit_record(
            &self.store.inner,
            &user.tenant,
            &Actor::user(&user.username),
            action,
            &user.username,
        );
        let _: String = self.client().query(&record).await?;
        if ok {
            Ok(user)
        } else {
            Err(Error::InvalidCredentials)
        }
    }

    /// Disables (or enables again) a user: a disabled user cannot log in.
    pub async fn set_disabled(
        &self,
        username: &str,
        disabled: bool,
        actor: &Actor,
    ) -> Result<User> {
        let mut user = self.get(username).await?;
        let action = if disabled {
            "disable_user"
        } else {
            "enable_user"
        };
        let _: () = self
            .client()
            .query_pipeline(
                redis::pipe()
                    .atomic()
                    .hset(
                        user_key(username),
                        "disabled",
                        if disabled { "1" } else { "0" },
                    )
                    .ignore()
                    .add_command(audit_record(
                        &self.store.inner,
                        &user.tenant,
                        actor,
                        action,
                        username,
                    ))
                    .ignore(),
            )
            .await?;
        user.disabled = disabled;
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
        let mut pipeline = redis::pipe();
        for name in &names {
            pipeline.cmd("HGETALL").arg(user_key(name));
        }
        let all: Vec<HashMap<String, String>> = self.client().query_pipeline(&pipeline).await?;
        let mut users = Vec::with_capacity(names.len());
        for (name, fields) in names.iter().zip(all) {
            // A user deleted meanwhile is left out.
            if let Some((user, _)) = user_from_fields(name, fields)? {
                users.push(user);
            }
        }
        Ok(users)
    }
}

/// A user and its password hash from its hash fields; `None` if there is no such user.
fn user_from_fields(
    username: &str,
    fields: HashMap<String, String>,
) -> Result<Option<(User, String)>> {
    let (Some(tenant), Some(hash)) = (fields.get("tenant"), fields.get("password_hash")) else {
        return Ok(None);
    };
    let user = User {
        username: username.to_owned(),
        tenant: TenantId::new(tenant.clone())?,
        email: fields.get("email").cloned(),
        full_name: fields.get("full_name").cloned(),
        disabled: fields.get("disabled").is_some_and(|d| d == "1"),
    };
    Ok(Some((user, hash.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_checked() {
        assert!(check_username("alice@example.com").is_ok());
        for bad in ["", "a b", "a:b", "ü", &"a".repeat(65)] {
            assert!(check_username(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn argon2_and_bcrypt_hashes_both_verify() {
        let argon = hash_password("s3cret".to_owned()).await.unwrap();
        assert!(argon.starts_with("$argon2id$"));
        assert!(verify_password("s3cret".into(), argon.clone()).await);
        assert!(!verify_password("wrong".into(), argon).await);
        let bcrypt = bcrypt::hash("s3cret", 4).unwrap();
        assert!(verify_password("s3cret".into(), bcrypt.clone()).await);
        assert!(!verify_password("wrong".into(), bcrypt).await);
        assert!(!verify_password("s3cret".into(), "garbage".into()).await);
        assert!(PasswordHash::new(DECOY_HASH).is_ok());
    }
}
