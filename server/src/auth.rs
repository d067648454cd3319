//! Credentials: JWTs issued by `POST /token` (or by another issuer sharing
//! the key) and API keys; both name the tenant, which nothing else may.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::HeaderMap;
use hyper::header::AUTHORIZATION;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tenant_kv::{Actor, ApiKey, Scope, TenantId, User};

use crate::api::App;

use crate::error::{ApiError, SettingError};
use crate::settings::JwtSettings;
use crate::verified_tokens::VerifiedTokens;

/// How tokens are verified and issued: one pinned algorithm, `exp`, `sub`
/// and `tenant_id` always required, `iss` and `aud` required when set.
#[derive(Clone)]
pub struct JwtConfig {
    algorithm: Algorithm,
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    issuer: Option<String>,
    audience: Option<String>,
    ttl: Duration,
    /// Built once: it depends only on the settings.
    validation: Validation,
    /// Tokens verified already, shared by the clones.
    verified: Arc<VerifiedTokens<VerifiedClaims>>,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("algorithm", &self.algorithm)
            .field("issues_tokens", &self.encoding.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .field("leeway_secs", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

/// Shortest HMAC secret accepted: the hash's output size for HS256.
const MIN_SECRET_BYTES: usize = 32;

impl JwtConfig {
    /// HS256 with `secret` (at least 32 bytes), tokens living 30 minutes,
    /// 5 s of leeway, no issuer or audience.
    pub fn hs256(secret: &[u8]) -> Result<Self, SettingError> {
        Self::from_settings(&JwtSettings {
            algorithm: Algorithm::HS256,
            secret: Some(secret.to_vec()),
            private_key: None,
            public_key: None,
            issuer: None,
            audience: None,
            ttl: Duration::from_secs(30 * 60),
            leeway: Duration::from_secs(5),
        })
    }

    /// Builds the keys the settings describe.
    pub fn from_settings(settings: &JwtSettings) -> Result<Self, SettingError> {
        use Algorithm::*;
        let (encoding, decoding) = match settings.algorithm {
            HS256 | HS384 | HS512 => {
                let secret = settings.secret.as_deref().unwrap_or_default();
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(SettingError::invalid(
                        "jwt_secret",
                        format!("HMAC tokens need a secret of at least {MIN_SECRET_BYTES} bytes"),
                    ));
                }
                (
                    Some(EncodingKey::from_secret(secret)),
                    DecodingKey::from_secret(secret),
                )
            }
            algorithm => {
                let public = settings.public_key.as_deref().ok_or_else(|| {
                    SettingError::invalid("jwt_public_key_file", "needed for this algorithm")
                })?;
                let bad = |setting, e: jsonwebtoken::errors::Error| {
                    SettingError::invalid(setting, format!("not a PEM key for {algorithm:?}: {e}"))
                };
                let decoding = match algorithm {
                    ES256 | ES384 => DecodingKey::from_ec_pem(public),
                    EdDSA => DecodingKey::from_ed_pem(public),
                    _ => DecodingKey::from_rsa_pem(public),
                }
                .map_err(|e| bad("jwt_public_key_file", e))?;
                let encoding = settings
                    .private_key
                    .as_deref()
                    .map(|private| match algorithm {
                        ES256 | ES384 => EncodingKey::from_ec_pem(private),
                        EdDSA => EncodingKey::from_ed_pem(private),
                        _ => EncodingKey::from_rsa_pem(private),
                    })
                    .transpose()
                    .map_err(|e| bad("jwt_private_key_file", e))?;
                (encoding, decoding)
            }
        };
        Ok(Self {
            algorithm: settings.algorithm,
            encoding,
            decoding,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            ttl: settings.ttl,
            validation: validation(settings),
            verified: Arc::default(),
        })
    }

    /// Lifetime of issued tokens.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A token for `username` of `tenant`, or `None` if this server has no
    /// signing key (tokens come from another issuer).
    pub(crate) fn issue(&self, username: &str, tenant: &TenantId) -> Option<String> {
        let encoding = self.encoding.as_ref()?;
        let now = unix_now();
        let claims = IssuedClaims {
            sub: username,
            tenant_id: tenant.as_str(),
            iat: now,
            nbf: now,
            exp: now + self.ttl.as_secs(),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        match jsonwebtoken::encode(&Header::new(self.algorithm), &claims, encoding) {
            Ok(token) => Some(token),
            Err(error) => {
                tracing::error!(%error, "cannot sign a token");
                None
            }
        }
    }

    /// The claims of `token` once its signature, algorithm and claims
    /// check out; from [`VerifiedTokens`] when it was checked before.
    fn verify(&self, token: &str) -> Result<Arc<VerifiedClaims>, jsonwebtoken::errors::Error> {
        let (now, leeway) = (unix_now(), self.validation.leeway);
        if let Some(claims) = self.verified.get(token, now, leeway) {
            return Ok(claims);
        }
        let claims =
            jsonwebtoken::decode::<VerifiedClaims>(token, &self.decoding, &self.validation)?.claims;
        let (exp, claims) = (claims.exp, Arc::new(claims));
        self.verified
            .insert(token, Arc::clone(&claims), exp, now, leeway);
        Ok(claims)
    }
}

/// What a token must satisfy: the one algorithm, `exp` and `sub`, `nbf`
/// if present, and the configured issuer and audience.
fn validation(settings: &JwtSettings) -> Validation {
    let mut validation = Validation::new(settings.algorithm);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    // Setting an issuer or audience does not make the claim required by itself.
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match &settings.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    tenant_id: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// The claims the service relies on; a token without them, or with an
/// `exp` that is not a number, does not decode.
#[derive(Deserialize)]
struct VerifiedClaims {
    sub: String,
    tenant_id: String,
    exp: u64,
}

/// Who made a request, as proven by its credential.
#[derive(Clone, Debug)]
pub(crate) enum Principal {
    /// A user, by a token, as stored when the request came in.
    User(User),
    /// An API key, and the user it acts for (checked not disabled) if any.
    ApiKey(ApiKey, Option<User>),
}

impl Principal {
    pub(crate) fn tenant(&self) -> &TenantId {
        match self {
            Self::User(user) => &user.tenant,
            Self::ApiKey(key, _) => &key.tenant,
        }
    }

    pub(crate) fn actor(&self) -> Actor {
        match self {
            Self::User(user) => Actor::user(&user.username),
            Self::ApiKey(key, _) => Actor::api_key(&key.id),
        }
    }

    /// The user the request acts for: the token's, or the key's owner.
    pub(crate) fn user(&self) -> Option<&User> {
        match self {
            Self::User(user) => Some(user),
            Self::ApiKey(_, owner) => owner.as_ref(),
        }
    }

    /// Whether it may manage every API key of its tenant (an admin user,
    /// or a key owned by one); others manage their own only.
    pub(crate) fn is_admin(&self) -> bool {
        self.user().is_some_and(|user| user.admin)
    }

    /// Users may do anything in their tenant; API keys what their scopes
    /// and key prefix allow (`key` is the item, or the listing's prefix).
    pub(crate) fn require(&self, scope: Scope, key: &str) -> Result<(), ApiError> {
        match self {
            Self::User(_) => Ok(()),
            Self::ApiKey(api_key, _) if api_key.allows(scope, key) => Ok(()),
            Self::ApiKey(..) => Err(ApiError::forbidden(format!(
                "this API key lacks the `{}` scope for this key",
                scope.as_str()
            ))),
        }
    }
}

/// Checks the request's `Authorization: Bearer` token or `X-API-Key`.
/// Every failure is the same 401, whatever was wrong.
pub(crate) async fn authenticate(headers: &HeaderMap, app: &App) -> Result<Principal, ApiError> {
    let (jwt, store) = (&app.jwt, &app.store);
    let invalid = || ApiError::unauthorized("invalid or expired credentials");
    if let Some(value) = headers.get(AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| ApiError::unauthorized("expected `Authorization: Bearer <token>`"))?;
        let claims = jwt.verify(token).map_err(|error| {
            tracing::debug!(%error, "token refused");
            invalid()
        })?;
        let tenant = TenantId::new(&claims.tenant_id).map_err(|_| invalid())?;
        // A tenant past its request rate is refused before any lookup: a
        // flood over the limit costs the signature check and nothing more.
        if let Some(status) = store.request_refused(&tenant) {
            return Err(tenant_kv::Error::RequestRateLimited { status }.into());
        }
        // Looked up on every request so that a disabled user is refused at once.
        let user = match store.users().get(&claims.sub).await {
            Ok(user) => user,
            Err(tenant_kv::Error::UnknownUser { .. } | tenant_kv::Error::InvalidUser { .. }) => {
                return Err(invalid());
            }
            Err(other) => return Err(other.into()),
        };
        if user.disabled || user.tenant != tenant {
            return Err(invalid());
        }
        return Ok(Principal::User(user));
    }
    if let Some(value) = headers.get("x-api-key") {
        let presented = value.to_str().map_err(|_| invalid())?;
        return match app.api_keys.verify_with_owner(presented).await {
            Ok((key, owner)) => Ok(Principal::ApiKey(key, owner)),
            Err(tenant_kv::Error::InvalidApiKey) => Err(invalid()),
            Err(other) => Err(other.into()),
        };
    }
    Err(ApiError::unauthorized(
        "send `Authorization: Bearer <token>` or `X-API-Key: <key>`",
    ))
}
