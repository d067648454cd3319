//! The API key endpoints. A key belongs to the user who created it (a key
//! created with a key belongs to that key's owner); users manage their
//! own keys, admins every key of their tenant, and a key never manages a
//! key that could do more than itself.

use std::time::{Duration, SystemTime};

use hyper::header::{CACHE_CONTROL, CONTENT_LENGTH, HeaderValue, TRANSFER_ENCODING};
use hyper::{Request, Response, StatusCode};
use tenant_kv::{ApiKey, MAX_API_KEY_PAGE, NewApiKey, Scope};

use crate::api::App;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::http::{Body, RequestBody, json_response, query_param, read_json};
use crate::schema::{ApiKeyInput, ApiKeyPage, ApiKeyView, ErrorBody, Revoked, RotateInput};

const DEFAULT_SCOPES: [Scope; 4] = [Scope::Read, Scope::Write, Scope::Delete, Scope::List];

/// Create an API key (a user, or a key with the `admin` scope); its
/// secret is shown once.
#[utoipa::path(post, path = "/api-keys", operation_id = "create_api_key", tag = "api keys",
    request_body = ApiKeyInput,
    responses(
        (status = 201, description = "the key, with its secret", body = ApiKeyView, headers(
            ("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, description = "invalid settings or malformed JSON", body = ErrorBody)))]
pub(crate) async fn create(
    app: &App,
    principal: &Principal,
    request: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Admin, "")?;
    let body: ApiKeyInput = read_json(request, app.limits.max_body_bytes).await?;
    let scopes = match body.scopes {
        None => DEFAULT_SCOPES.to_vec(),
        Some(names) => names.into_iter().map(Scope::from).collect(),
    };
    let ttl = match body.ttl {
        Some(0) => return Err(ApiError::bad_request("`ttl` must be at least 1 second")),
        ttl => ttl.map(Duration::from_secs),
    };
    let expires_at = ttl.and_then(|ttl| SystemTime::now().checked_add(ttl));
    may_manage(principal, &scopes, expires_at, body.requests_per_second)?;
    let new = NewApiKey {
        name: body.name,
        scopes,
        key_prefix: body.key_prefix,
        ttl,
        owner: principal.user().map(|user| user.username.clone()),
        requests_per_second: body.requests_per_second,
    };
    let (key, secret) = app
        .api_keys
        .create(principal.tenant(), new, &principal.actor())
        .await?;
    Ok(with_secret(StatusCode::CREATED, &key, &secret))
}

/// An answer carrying a key's secret: no cache, private or shared, keeps it.
fn with_secret(status: StatusCode, key: &ApiKey, secret: &str) -> Response<Body> {
    let mut response = json_response(status, &ApiKeyView::new(key, Some(secret)));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A page of the keys the principal manages: every key of the tenant for
/// an admin, its own otherwise.
#[utoipa::path(get, path = "/api-keys", operation_id = "list_api_keys", tag = "api keys",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Keys per page; 100 without"),
        ("cursor" = Option<String>, Query, min_length = 1,
            description = "The `cursor` of the previous page; any other is refused (400)")),
    responses(
        (status = 200, description = "API keys, oldest first, without secrets", body = ApiKeyPage),
        (status = 400, description = "bad limit or cursor", body = ErrorBody)))]
pub(crate) async fn list(
    app: &App,
    principal: &Principal,
    request: &Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Admin, "")?;
    let limit = match query_param(request.uri(), "limit")? {
        None => MAX_API_KEY_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=MAX_API_KEY_PAGE).contains(limit))
            .ok_or_else(|| {
                ApiError::bad_request(format!("`limit` must be 1 to {MAX_API_KEY_PAGE}"))
            })?,
    };
    let cursor = query_param(request.uri(), "cursor")?;
    let owner = (!principal.is_admin()).then(|| owner_of(principal));
    let page = app
        .api_keys
        .list_page(principal.tenant(), owner, limit, cursor.as_deref())
        .await?;
    let page = ApiKeyPage {
        api_keys: page
            .keys
            .iter()
            .map(|key| ApiKeyView::new(key, None))
            .collect(),
        cursor: page.cursor,
    };
    Ok(json_response(StatusCode::OK, &page))
}

/// The owner a principal's own keys have: its user's name, `None` for a
/// key of no user (which manages only keys of no user).
fn owner_of(principal: &Principal) -> Option<&str> {
    principal.user().map(|user| user.username.as_str())
}

/// Revoke an API key at once.
#[utoipa::path(delete, path = "/api-keys/{key_id}", operation_id = "revoke_api_key", tag = "api keys",
    params(KeyIdParam),
    responses(
        (status = 200, description = "revoked", body = Revoked),
        (status = 400, description = "a key id that is not UTF-8 once percent-decoded", body = ErrorBody),
        (status = 404, description = "no such key that the caller manages", body = ErrorBody)))]
pub(crate) async fn revoke(
    app: &App,
    principal: &Principal,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Admin, "")?;
    may_manage_key(app, principal, id).await?;
    app.api_keys
        .revoke(principal.tenant(), id, &principal.actor())
        .await?;
    let revoked = Revoked {
        key_id: id.to_owned(),
        revoked: true,
    };
    Ok(json_response(StatusCode::OK, &revoked))
}

/// The `{key_id}` of `/api-keys/{key_id}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only its description is used: the router reads the id.
struct KeyIdParam {
    /// The key's id: 16 hex digits (the part of the key between its first two `_`).
    #[param(pattern = "^[0-9a-fA-F]{16}$")]
    key_id: String,
}

/// Give a key a new secret; the old one stays valid for `grace_seconds`.
#[utoipa::path(post, path = "/api-keys/{key_id}/rotate", operation_id = "rotate_api_key", tag = "api keys",
    params(KeyIdParam),
    request_body(content = Option<RotateInput>, description = "May be left out (no grace period)"),
    responses(
        (status = 200, description = "the key, with its new secret", body = ApiKeyView, headers(
            ("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, description = "malformed JSON or grace period", body = ErrorBody),
        (status = 404, description = "no such key that the caller manages", body = ErrorBody),
        (status = 409, description = "the key changed (rotated or revoked) meanwhile", body = ErrorBody)))]
pub(crate) async fn rotate(
    app: &App,
    principal: &Principal,
    id: &str,
    request: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Admin, "")?;
    may_manage_key(app, principal, id).await?;
    let headers = request.headers();
    let empty = headers.get(CONTENT_LENGTH).is_none_or(|len| len == "0")
        && headers.get(TRANSFER_ENCODING).is_none();
    // No body, or `null`, is no grace period.
    let body: RotateInput = if empty {
        RotateInput::default()
    } else {
        read_json::<Option<RotateInput>>(request, app.limits.max_body_bytes)
            .await?
            .unwrap_or_default()
    };
    let grace = Duration::from_secs(body.grace_seconds);
    let (key, secret) = app
        .api_keys
        .rotate(principal.tenant(), id, grace, &principal.actor())
        .await?;
    Ok(with_secret(StatusCode::OK, &key, &secret))
}

/// An API key manages (creates, rotates, revokes) only keys that may do no
/// more than itself: no other scope, no longer life, no higher request
/// rate. (Only keys without a key prefix have the `admin` scope.)
fn may_manage(
    principal: &Principal,
    scopes: &[Scope],
    expires_at: Option<SystemTime>,
    requests_per_second: Option<u32>,
) -> Result<(), ApiError> {
    let Principal::ApiKey(own, _) = principal else {
        return Ok(());
    };
    if let Some(scope) = scopes.iter().find(|scope| !own.scopes.contains(scope)) {
        return Err(ApiError::forbidden(format!(
            "this API key cannot manage a key with `{}`",
            scope.as_str()
        )));
    }
    if let Some(own_expiry) = own.expires_at
        && expires_at.is_none_or(|at| at > own_expiry)
    {
        return Err(ApiError::forbidden(
            "this API key cannot manage a key that outlives it",
        ));
    }
    if let Some(own_rate) = own.requests_per_second
        && requests_per_second.is_none_or(|rate| rate > own_rate)
    {
        return Err(ApiError::forbidden(format!(
            "this API key cannot manage a key allowed more than its {own_rate} requests per second"
        )));
    }
    Ok(())
}

/// The principal may manage key `id`: it is an admin or the key is its
/// own, and (for an API key) the key can do no more than itself. Another
/// user's key is answered as missing to a non-admin, as another tenant's.
async fn may_manage_key(app: &App, principal: &Principal, id: &str) -> Result<(), ApiError> {
    let target = app.api_keys.get(principal.tenant(), id).await?;
    if !principal.is_admin() && target.owner.as_deref() != owner_of(principal) {
        return Err(tenant_kv::Error::UnknownApiKey { id: id.to_owned() }.into());
    }
    may_manage(
        principal,
        &target.scopes,
        target.expires_at,
        target.requests_per_second,
    )
}
