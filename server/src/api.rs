//! The endpoints: request parsing, authorisation, the store call, and the
//! JSON answer.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    CONTENT_LENGTH, CONTENT_TYPE, ETAG, HeaderValue, IF_MATCH, IF_NONE_MATCH, TRANSFER_ENCODING,
};
use hyper::{HeaderMap, Request, Response, StatusCode};
use log_buffer::{LogBuffer, Offloader};
use redis_failover::FailoverClient;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tenant_kv::{
    ApiKey, ApiKeys, Item, NewApiKey, NewItem, Precondition, Scope, TenantId, TenantKv, Write,
    Written,
};

use crate::auth::{JwtConfig, Principal, authenticate};
use crate::error::ApiError;
use crate::limits::Limits;
use crate::metrics::HttpMetrics;
use crate::router::{self, Operation};

pub(crate) type Body = Full<Bytes>;

/// What every request handler shares.
pub(crate) struct App {
    pub(crate) store: TenantKv,
    /// One for the process: it remembers when each key's `last_used` was written.
    pub(crate) api_keys: ApiKeys,
    pub(crate) client: FailoverClient,
    pub(crate) jwt: JwtConfig,
    pub(crate) limits: Limits,
    pub(crate) metrics: HttpMetrics,
    pub(crate) logs: Mutex<LogShipping>,
}

/// The log buffer and offloader this process runs, if any: their figures
/// go to `/metrics`, and shutdown flushes them.
#[derive(Default)]
pub(crate) struct LogShipping {
    pub(crate) buffer: Option<LogBuffer>,
    pub(crate) offloader: Option<Offloader>,
}

struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers one request; never fails (errors are JSON answers).
pub(crate) async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    app.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    // Decrements also when hyper drops this future (the client went away).
    let _in_flight = InFlight(&app.metrics.in_flight);
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned);
    let method = request.method().as_str().to_owned();
    let mut tenant = None;
    let (operation, result) = if request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len())
        > app.limits.max_uri_bytes
    {
        let error = ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            "the request target is too long",
        );
        (None, Err(error))
    } else {
        match router::find(&method, request.uri().path()) {
            Ok((operation, param)) => {
                let answered = tokio::time::timeout(
                    app.limits.request_timeout,
                    dispatch(&app, operation, param, request, &mut tenant),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(ApiError {
                        retry_after: Some(1),
                        ..ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "timeout",
                            "the request took too long",
                        )
                    })
                });
                (Some(operation), answered)
            }
            Err(error) => (None, Err(error)),
        }
    };
    let error_code = result.as_ref().err().map(|error| error.code);
    let mut response = result.unwrap_or_else(error_response);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let route = operation.map_or("unmatched", Operation::name);
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    app.metrics.record(route, status, error_code, elapsed);
    tracing::info!(
        target: "access",
        request_id,
        tenant_id = tenant.as_ref().map(TenantId::as_str),
        method,
        route,
        status,
        micros = elapsed.as_micros() as u64,
    );
    response
}

async fn dispatch(
    app: &App,
    operation: Operation,
    param: Option<String>,
    request: Request<Incoming>,
    tenant: &mut Option<TenantId>,
) -> Result<Response<Body>, ApiError> {
    let param = param.unwrap_or_default();
    match operation {
        Operation::Health => return Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        Operation::Ready => return ready(app).await,
        Operation::Metrics => {
            let text = crate::metrics::render(app);
            let mut response = Response::new(Body::from(text));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return Ok(response);
        }
        Operation::OpenApi => return Ok(json_response(StatusCode::OK, crate::openapi::document())),
        Operation::IssueToken => return issue_token(app, request).await,
        _ => {}
    }
    let principal = authenticate(request.headers(), app).await?;
    *tenant = Some(principal.tenant().clone());
    match operation {
        Operation::CurrentUser => current_user(&principal),
        Operation::CreateItem => create_item(app, &principal, request).await,
        Operation::ListItems => list_items(app, &principal, &request).await,
        Operation::Batch => batch(app, &principal, request).await,
        Operation::GetItem => get_item(app, &principal, &param, request.headers()).await,
        Operation::PutItem => put_item(app, &principal, &param, request).await,
        Operation::DeleteItem => delete_item(app, &principal, &param, request.headers()).await,
        Operation::CreateApiKey => create_api_key(app, &principal, request).await,
        Operation::ListApiKeys => list_api_keys(app, &principal).await,
        Operation::RevokeApiKey => revoke_api_key(app, &principal, &param).await,
        Operation::RotateApiKey => rotate_api_key(app, &principal, &param, request).await,
        Operation::Health
        | Operation::Ready
        | Operation::Metrics
        | Operation::OpenApi
        | Operation::IssueToken => {
            unreachable!("answered above")
        }
    }
}

async fn ready(app: &App) -> Result<Response<Body>, ApiError> {
    // PING goes through the client's retries: a failover that fits in the
    // retry budget does not make the service unready.
    match app
        .client
        .query_idempotent::<String>(&redis::cmd("PING"))
        .await
    {
        Ok(_) => Ok(json_response(StatusCode::OK, &json!({"status": "ready"}))),
        Err(error) => {
            tracing::warn!(%error, "not ready: the Redis master is unreachable");
            Err(ApiError::unavailable("the Redis master is unreachable"))
        }
    }
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
}

async fn issue_token(app: &App, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let form = content_type_is(request.headers(), "application/x-www-form-urlencoded");
    let login: Login = if form {
        let body = read_body(request, app.limits.max_body_bytes).await?;
        let mut fields: std::collections::HashMap<String, String> =
            form_urlencoded::parse(&body).into_owned().collect();
        match (fields.remove("username"), fields.remove("password")) {
            (Some(username), Some(password)) => Login { username, password },
            _ => {
                return Err(ApiError::bad_request(
                    "the form needs `username` and `password`",
                ));
            }
        }
    } else {
        read_json(request, app.limits.max_body_bytes).await?
    };
    let user = app
        .store
        .users()
        .authenticate(&login.username, &login.password)
        .await?;
    let Some(token) = app.jwt.issue(&user.username, &user.tenant) else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "this server verifies tokens but has no key to issue them",
        ));
    };
    let mut response = json_response(
        StatusCode::OK,
        &json!({"access_token": token, "token_type": "bearer", "expires_in": app.jwt.ttl().as_secs()}),
    );
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(response)
}

fn current_user(principal: &Principal) -> Result<Response<Body>, ApiError> {
    let Principal::User(user) = principal else {
        return Err(ApiError::forbidden(
            "an API key is not a user; log in with POST /token",
        ));
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "username": user.username,
            "tenant_id": user.tenant.as_str(),
            "email": user.email,
            "full_name": user.full_name,
            "disabled": user.disabled,
        }),
    ))
}

/// The body of `POST /data` and `PUT /data/{key}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemBody {
    value: Value,
    /// Seconds.
    #[serde(default)]
    ttl: Option<u64>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

impl ItemBody {
    fn into_new_item(self) -> Result<NewItem, ApiError> {
        let mut item = NewItem::new(self.value);
        if let Some(metadata) = self.metadata {
            item = item.metadata(metadata);
        }
        match self.ttl {
            Some(0) => return Err(ApiError::bad_request("`ttl` must be at least 1 second")),
            Some(seconds) => item = item.ttl(Duration::from_secs(seconds)),
            None => {}
        }
        Ok(item)
    }
}

async fn create_item(
    app: &App,
    principal: &Principal,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let key = query_param(&request, "key")
        .ok_or_else(|| ApiError::bad_request("missing query parameter `key`"))?;
    principal.require(Scope::Write, &key)?;
    let body: ItemBody = read_json(request, app.limits.max_body_bytes).await?;
    let item = tenant(app, principal)
        .create(&key, body.into_new_item()?)
        .await?;
    let mut response = item_response(StatusCode::CREATED, &item);
    let location = format!(
        "/data/{}",
        percent_encoding::utf8_percent_encode(&key, percent_encoding::NON_ALPHANUMERIC)
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert("location", value);
    }
    Ok(response)
}

async fn get_item(
    app: &App,
    principal: &Principal,
    key: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Read, key)?;
    let item = tenant(app, principal).get(key).await?;
    if let Some(value) = headers.get(IF_NONE_MATCH) {
        let etag = etag(item.version);
        let matches = value.to_str().unwrap_or_default().split(',').any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag
        });
        if matches {
            let mut response = Response::new(Body::default());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
                .headers_mut()
                .insert(ETAG, etag_header(item.version));
            return Ok(response);
        }
    }
    Ok(item_response(StatusCode::OK, &item))
}

async fn put_item(
    app: &App,
    principal: &Principal,
    key: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Write, key)?;
    let headers = request.headers();
    let create_only = match headers.get(IF_NONE_MATCH) {
        None => false,
        Some(value) if value == "*" => true,
        Some(_) => return Err(ApiError::bad_request("PUT takes only `If-None-Match: *`")),
    };
    let if_match = if_match(headers)?;
    if create_only && if_match != IfMatch::Absent {
        return Err(ApiError::bad_request(
            "send If-Match or If-None-Match, not both",
        ));
    }
    if if_match == IfMatch::Never {
        return Err(ApiError::precondition_failed("no item matches If-Match"));
    }
    let precondition = match if_match {
        IfMatch::Version(version) => Precondition::Version(version),
        // Without a version, PUT replaces an existing item (404 if none).
        _ => Precondition::Exists,
    };
    let body: ItemBody = read_json(request, app.limits.max_body_bytes).await?;
    let new_item = body.into_new_item()?;
    let tenant = tenant(app, principal);
    let item = if create_only {
        match tenant.create(key, new_item).await {
            Err(tenant_kv::Error::AlreadyExists { .. }) => {
                return Err(ApiError::precondition_failed(
                    "the item exists (If-None-Match: *)",
                ));
            }
            other => other?,
        }
    } else {
        match put_replacing(app, &tenant, key, new_item, precondition).await {
            // A failed If-Match is a failed precondition, whether or not the item exists.
            Err(tenant_kv::Error::NotFound { .. }) if if_match != IfMatch::Absent => {
                return Err(ApiError::precondition_failed("no item matches If-Match"));
            }
            other => other?,
        }
    };
    Ok(item_response(StatusCode::OK, &item))
}

/// A PUT: an unconditional replacement whose outcome is unknown (the
/// master failed mid-request), or that no replica confirmed in time, is
/// sent again within the retry budget, as HTTP lets a server do with an
/// idempotent method: either way the item ends up holding the body.
async fn put_replacing(
    app: &App,
    tenant: &tenant_kv::Tenant,
    key: &str,
    item: NewItem,
    precondition: Precondition,
) -> tenant_kv::Result<Item> {
    use redis_failover::Error as Failover;
    let started = Instant::now();
    loop {
        match tenant.put(key, item.clone(), precondition).await {
            Err(tenant_kv::Error::Redis(
                Failover::OutcomeUnknown { .. }
                | Failover::NotReplicated { .. }
                | Failover::ReplicationUnknown { .. },
            )) if precondition == Precondition::Exists
                && started.elapsed() < app.client.retry_budget() =>
            {
                tracing::info!(key, "PUT not confirmed during a failover; sending it again");
                app.metrics.puts_resent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(PUT_RESEND_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Between two sends of a PUT: time for a new master or a replica to settle.
const PUT_RESEND_PAUSE: Duration = Duration::from_millis(100);

async fn delete_item(
    app: &App,
    principal: &Principal,
    key: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Delete, key)?;
    let if_match = if_match(headers)?;
    let expected = match if_match {
        IfMatch::Never => return Err(ApiError::precondition_failed("no item matches If-Match")),
        IfMatch::Version(version) => Some(version),
        IfMatch::Absent | IfMatch::Any => None,
    };
    let version = match tenant(app, principal).delete(key, expected).await {
        Err(tenant_kv::Error::NotFound { .. }) if if_match != IfMatch::Absent => {
            return Err(ApiError::precondition_failed("no item matches If-Match"));
        }
        other => other?,
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"key": key, "deleted": true, "version": version}),
    ))
}

async fn list_items(
    app: &App,
    principal: &Principal,
    request: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let prefix = query_param(request, "prefix").unwrap_or_default();
    principal.require(Scope::List, &prefix)?;
    let limit = match query_param(request, "limit") {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=1000).contains(limit))
            .ok_or_else(|| ApiError::bad_request("`limit` must be 1 to 1000"))?,
    };
    let cursor = query_param(request, "cursor");
    let page = tenant(app, principal)
        .list(&prefix, limit, cursor.as_deref())
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"keys": page.keys, "cursor": page.cursor}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    operations: Vec<BatchOperation>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum BatchOp {
    Create,
    Put,
    Delete,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchOperation {
    op: BatchOp,
    key: String,
    /// `Some(Null)` for `"value": null`, `None` when absent.
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
    #[serde(default)]
    ttl: Option<u64>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    if_version: Option<u64>,
}

fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

impl BatchOperation {
    /// The write, if the caller may do it.
    fn into_write(self, index: usize, principal: &Principal) -> Result<Write, ApiError> {
        let invalid = |what: &str| ApiError::bad_request(format!("operation {index}: {what}"));
        let Self {
            op,
            key,
            value,
            ttl,
            metadata,
            if_version,
        } = self;
        if let BatchOp::Delete = op {
            if value.is_some() || ttl.is_some() || metadata.is_some() {
                return Err(invalid("a delete takes only `key` and `if_version`"));
            }
            principal.require(Scope::Delete, &key)?;
            return Ok(Write::Delete {
                key,
                expected_version: if_version,
            });
        }
        principal.require(Scope::Write, &key)?;
        let value = value.ok_or_else(|| invalid("`value` is required"))?;
        let item = ItemBody {
            value,
            ttl,
            metadata,
        }
        .into_new_item()?;
        match (op, if_version) {
            (BatchOp::Create, None) => Ok(Write::Create { key, item }),
            (BatchOp::Create, Some(_)) => Err(invalid("a create takes no `if_version`")),
            (_, version) => {
                let precondition = version.map_or(Precondition::Exists, Precondition::Version);
                Ok(Write::Put {
                    key,
                    item,
                    precondition,
                })
            }
        }
    }
}

async fn batch(
    app: &App,
    principal: &Principal,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: BatchBody = read_json(request, app.limits.max_body_bytes).await?;
    let count = body.operations.len();
    if count == 0 || count > app.limits.max_batch {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1 to {} operations, not {count}",
            app.limits.max_batch
        )));
    }
    let writes = body
        .operations
        .into_iter()
        .enumerate()
        .map(|(index, operation)| operation.into_write(index, principal))
        .collect::<Result<Vec<_>, _>>()?;
    let written = tenant(app, principal).batch(writes).await?;
    let results: Vec<Value> = written
        .iter()
        .map(|written| match written {
            Written::Stored(item) => item_json(item),
            Written::Deleted { key, version } => {
                json!({"key": key, "deleted": true, "version": version})
            }
            _ => Value::Null,
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"results": results})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyBody {
    name: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    key_prefix: Option<String>,
    /// Seconds.
    #[serde(default)]
    ttl: Option<u64>,
}

const DEFAULT_SCOPES: [Scope; 4] = [Scope::Read, Scope::Write, Scope::Delete, Scope::List];

async fn create_api_key(
    app: &App,
    principal: &Principal,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Admin, "")?;
    let body: ApiKeyBody = read_json(request, app.limits.max_body_bytes).await?;
    let scopes = match body.scopes {
        None => DEFAULT_SCOPES.to_vec(),
        Some(names) => names
            .iter()
            .map(|name| name.parse::<Scope>())
            .collect::<Result<Vec<_>, _>>()?,
    };
    let ttl = match body.ttl {
        Some(0) => return Err(ApiError::bad_request("`ttl` must be at least 1 second")),
        ttl => ttl.map(Duration::from_secs),
    };
    let expires_at = ttl.and_then(|ttl| SystemTime::now().checked_add(ttl));
    may_manage(principal, &scopes, body.key_prefix.as_deref(), expires_at)?;
    let new = NewApiKey {
        name: body.name,
        scopes,
        key_prefix: body.key_prefix,
        ttl,
    };
    let (key, secret) = app
        .api_keys
        .create(principal.tenant(), new, &principal.actor())
        .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &api_key_json(&key, Some(&secret)),
    ))
}

async fn list_api_keys(app: &App, principal: &Principal) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Admin, "")?;
    let keys = app.api_keys.list(principal.tenant()).await?;
    let keys: Vec<Value> = keys.iter().map(|key| api_key_json(key, None)).collect();
    Ok(json_response(StatusCode::OK, &json!({"api_keys": keys})))
}

async fn revoke_api_key(
    app: &App,
    principal: &Principal,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Admin, "")?;
    may_manage_key(app, principal, id).await?;
    app.api_keys
        .revoke(principal.tenant(), id, &principal.actor())
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"key_id": id, "revoked": true}),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default)]
    grace_seconds: u64,
}

async fn rotate_api_key(
    app: &App,
    principal: &Principal,
    id: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Admin, "")?;
    may_manage_key(app, principal, id).await?;
    let headers = request.headers();
    let empty = headers.get(CONTENT_LENGTH).is_none_or(|len| len == "0")
        && headers.get(TRANSFER_ENCODING).is_none();
    let body: RotateBody = if empty {
        RotateBody::default()
    } else {
        read_json(request, app.limits.max_body_bytes).await?
    };
    let grace = Duration::from_secs(body.grace_seconds);
    let (key, secret) = app
        .api_keys
        .rotate(principal.tenant(), id, grace, &principal.actor())
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &api_key_json(&key, Some(&secret)),
    ))
}

/// An API key manages (creates, rotates, revokes) only keys that may do no
/// more than itself: no other scope, no wider prefix, no longer life.
fn may_manage(
    principal: &Principal,
    scopes: &[Scope],
    key_prefix: Option<&str>,
    expires_at: Option<SystemTime>,
) -> Result<(), ApiError> {
    let Principal::ApiKey(own) = principal else {
        return Ok(());
    };
    let prefix = key_prefix.unwrap_or_default();
    if let Some(scope) = scopes.iter().find(|scope| !own.allows(**scope, prefix)) {
        return Err(ApiError::forbidden(format!(
            "this API key cannot manage a key with `{}` under this prefix",
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
    Ok(())
}

async fn may_manage_key(app: &App, principal: &Principal, id: &str) -> Result<(), ApiError> {
    if let Principal::ApiKey(_) = principal {
        let target = app.api_keys.get(principal.tenant(), id).await?;
        may_manage(
            principal,
            &target.scopes,
            target.key_prefix.as_deref(),
            target.expires_at,
        )?;
    }
    Ok(())
}

fn tenant(app: &App, principal: &Principal) -> tenant_kv::Tenant {
    app.store
        .tenant(principal.tenant().clone(), principal.actor())
}

fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

fn etag_header(version: u64) -> HeaderValue {
    HeaderValue::from_str(&etag(version)).expect("digits and quotes")
}

/// What `If-Match` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IfMatch {
    Absent,
    /// `*`: the item must exist.
    Any,
    /// One strong ETag.
    Version(u64),
    /// A weak or foreign tag, which strong comparison never matches.
    Never,
}

fn if_match(headers: &HeaderMap) -> Result<IfMatch, ApiError> {
    let Some(value) = headers.get(IF_MATCH) else {
        return Ok(IfMatch::Absent);
    };
    let value = value.to_str().unwrap_or_default().trim();
    if value == "*" {
        return Ok(IfMatch::Any);
    }
    if value.contains(',') {
        return Err(ApiError::bad_request("send one ETag in If-Match"));
    }
    Ok(value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse().ok())
        .map_or(IfMatch::Never, IfMatch::Version))
}

fn item_json(item: &Item) -> Value {
    json!({
        "key": item.key,
        "value": item.value,
        "metadata": item.metadata,
        "version": item.version,
        "created_at": rfc3339(item.created_at),
        "updated_at": rfc3339(item.updated_at),
        "expires_at": item.expires_at.map(rfc3339),
    })
}

fn item_response(status: StatusCode, item: &Item) -> Response<Body> {
    let mut response = json_response(status, &item_json(item));
    response
        .headers_mut()
        .insert(ETAG, etag_header(item.version));
    response
}

fn api_key_json(key: &ApiKey, secret: Option<&str>) -> Value {
    let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
    let mut value = json!({
        "key_id": key.id,
        "name": key.name,
        "scopes": scopes,
        "key_prefix": key.key_prefix,
        "created_at": rfc3339(key.created_at),
        "expires_at": key.expires_at.map(rfc3339),
        "last_used": key.last_used.map(rfc3339),
    });
    if let Some(secret) = secret {
        value["api_key"] = Value::from(secret);
    }
    value
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Body::from(
        serde_json::to_vec(value).expect("a Value serialises"),
    ));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn error_response(error: ApiError) -> Response<Body> {
    let mut response = json_response(
        error.status,
        &json!({"error": {"code": error.code, "message": error.message}}),
    );
    let headers = response.headers_mut();
    if let Some(seconds) = error.retry_after {
        headers.insert("retry-after", HeaderValue::from(seconds));
    }
    if let Some(allow) = error
        .allow
        .as_deref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert("allow", allow);
    }
    if error.status == StatusCode::UNAUTHORIZED {
        headers.insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    response
}

fn query_param(request: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(request.uri().query()?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn content_type_is(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(expected))
}

async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over the limit of {limit} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(error) => Err(ApiError::bad_request(format!(
            "cannot read the body: {error}"
        ))),
    }
}

async fn read_json<T: DeserializeOwned>(
    request: Request<Incoming>,
    limit: usize,
) -> Result<T, ApiError> {
    if !content_type_is(request.headers(), "application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as `Content-Type: application/json`",
        ));
    }
    let body = read_body(request, limit).await?;
    serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid JSON body: {error}"),
        )
    })
}

/// `2024-05-01T12:00:00.123Z`.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let (seconds, millis) = (since.as_secs(), since.subsec_millis());
    let days = (seconds / 86_400) as i64;
    let secs_of_day = seconds % 86_400;
    // Days since 1970-01-01 to a civil date, in the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |secs: u64, millis: u64| {
            rfc3339(
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis),
            )
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_714_564_800, 123), "2024-05-01T12:00:00.123Z");
        assert_eq!(at(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
    }
}
