//! Answering a request: routing, authentication and admission, and the
//! endpoints that are neither items nor API keys.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use log_buffer::{LogBuffer, Offloader};
use redis_failover::FailoverClient;
use tenant_kv::{ApiKeys, TenantKv};

use crate::auth::{JwtConfig, Principal, authenticate};
use crate::conn::client_group;
use crate::error::ApiError;
use crate::http::{
    Body, RequestBody, content_type_is, error_response, json_response, read_body, read_json,
};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::middleware::Facts;
use crate::router::{self, Open, Operation, TenantOp};
use crate::schema::{
    ErrorBody, Health, Login, Readiness, Token, TokenType, UsageFigures, UsageReport, UserInfo,
    WriteState,
};

/// The largest login body: the longest username and password, each byte
/// escaped in six (`\u0001` in JSON), with room to spare.
const LOGIN_BODY_LIMIT: usize = 8192;
/// The longest a throttled login's answer is held back: a client that
/// keeps guessing gets its refusals at this pace at most, so it cannot
/// spend the server's CPU on them faster.
const THROTTLED_LOGIN_DELAY: Duration = Duration::from_secs(1);

/// What every request handler shares.
pub(crate) struct App {
    pub(crate) store: TenantKv,
    /// One for the process: it remembers when each key's `last_used` was written.
    pub(crate) api_keys: ApiKeys,
    pub(crate) client: FailoverClient,
    pub(crate) jwt: JwtConfig,
    pub(crate) limits: Limits,
    /// The header a trusted proxy puts the client's address in, if any.
    pub(crate) client_address_header: Option<HeaderName>,
    pub(crate) metrics: Metrics,
    /// Shared with the metrics' log collector, which reads their figures.
    pub(crate) logs: Arc<Mutex<LogShipping>>,
}

/// The log buffer and offloader this process runs, if any: their figures
/// go to `/metrics`, and shutdown flushes them.
#[derive(Debug, Default)]
pub(crate) struct LogShipping {
    pub(crate) buffer: Option<LogBuffer>,
    pub(crate) offloader: Option<Offloader>,
}

/// Routes and answers one request; never fails (errors are JSON answers).
/// The layers around it ([`crate::middleware`]) log and count it.
pub(crate) async fn handle(
    app: Arc<App>,
    request: Request<RequestBody>,
) -> Result<Response<Body>, Infallible> {
    let Some(facts) = request.extensions().get::<Facts>().cloned() else {
        // Only a service built without the layers gets here.
        return Ok(error_response(ApiError::internal(
            "the request has no facts",
        )));
    };
    let surface = facts.get().surface;
    let answer = match router::find_on(surface, request.method().as_str(), request.uri().path()) {
        Ok((operation, param)) => {
            facts.get().route = Some(operation);
            dispatch(&app, operation, param, request, &facts).await
        }
        Err(error) => Err(error),
    };
    Ok(answer.unwrap_or_else(error_response))
}

async fn dispatch(
    app: &App,
    operation: Operation,
    param: Option<String>,
    request: Request<RequestBody>,
    facts: &Facts,
) -> Result<Response<Body>, ApiError> {
    // Every operation's future but the hottest, `GetItem`'s, is boxed:
    // the largest (2.2–2.8 KiB each) made this future 4.7 KiB for all,
    // and moving it cost more than allocating.
    let operation = match operation {
        Operation::Open(open) => return Box::pin(answer_open(app, open, request, facts)).await,
        Operation::Tenant(operation) => operation,
    };
    let principal = authenticate(request.headers(), app).await?;
    facts.get().tenant = Some(principal.tenant().clone());
    let api_key = match &principal {
        Principal::ApiKey(key, _) => Some(key),
        Principal::User(_) => None,
    };
    let rate_limit = app.store.admit_request(principal.tenant(), api_key).await?;
    facts.get().rate_limit = rate_limit;
    let key = param.unwrap_or_default();
    let principal = &principal;
    let answer: Answer<'_> = match operation {
        TenantOp::GetItem => {
            return crate::items::get(app, principal, &key, request.headers()).await;
        }
        TenantOp::CurrentUser => return current_user(principal),
        TenantOp::Usage => Box::pin(usage(app, principal)),
        TenantOp::CreateItem => Box::pin(crate::items::create(app, principal, request)),
        TenantOp::ListItems => {
            Box::pin(async move { crate::items::list(app, principal, &request).await })
        }
        TenantOp::Batch => Box::pin(crate::items::batch(app, principal, request)),
        TenantOp::PutItem => Box::pin(crate::items::put(app, principal, &key, request)),
        TenantOp::DeleteItem => {
            Box::pin(
                async move { crate::items::delete(app, principal, &key, request.headers()).await },
            )
        }
        TenantOp::CreateApiKey => Box::pin(crate::api_keys::create(app, principal, request)),
        TenantOp::ListApiKeys => {
            Box::pin(async move { crate::api_keys::list(app, principal, &request).await })
        }
        TenantOp::RevokeApiKey => Box::pin(crate::api_keys::revoke(app, principal, &key)),
        TenantOp::RotateApiKey => Box::pin(crate::api_keys::rotate(app, principal, &key, request)),
    };
    answer.await
}

/// An operation's answer, boxed.
type Answer<'a> = Pin<Box<dyn Future<Output = Result<Response<Body>, ApiError>> + Send + 'a>>;

async fn answer_open(
    app: &App,
    open: Open,
    request: Request<RequestBody>,
    facts: &Facts,
) -> Result<Response<Body>, ApiError> {
    match open {
        Open::Health => Ok(health()),
        Open::Ready => ready(app).await,
        Open::Metrics => {
            let mut response = Response::new(Body::from(app.metrics.render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            Ok(response)
        }
        Open::ApiDocument => {
            let document = crate::openapi::serialised(&app.limits);
            let mut response = Response::new(Body::from(document));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(response)
        }
        Open::IssueToken => {
            let peer = facts.get().peer;
            let source = client_group(app, peer, request.headers());
            issue_token(app, request, &source).await
        }
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", operation_id = "health", tag = "probes",
    responses((status = 200, description = "up", body = Health)))]
pub(crate) fn health() -> Response<Body> {
    let health = Health {
        status: "ok".to_owned(),
    };
    json_response(StatusCode::OK, &health)
}

/// Ready while the master answers. Where durable writes stand is in the
/// answer (`writes`), not in its status: writes held back for want of
/// replicas still leave reads to serve, and a load balancer that took
/// every instance out for it would stop those too.
#[utoipa::path(get, path = "/readyz", operation_id = "ready", tag = "probes",
    responses(
        (status = 200, description = "the Redis master answers (within the retry budget)", body = Readiness),
        (status = 503, description = "the master is unreachable", body = ErrorBody)))]
pub(crate) async fn ready(app: &App) -> Result<Response<Body>, ApiError> {
    // PING goes through the client's retries: a failover that fits in the
    // retry budget does not make the service unready.
    match app
        .client
        .query_idempotent::<String>(&redis::cmd("PING"))
        .await
    {
        Ok(_) => {
            let writes = app.client.replication_status().map(|status| {
                let state = if !status.writable() {
                    "held"
                } else if status.degraded() {
                    "degraded"
                } else {
                    "ok"
                };
                WriteState {
                    state: state.to_owned(),
                    replicas_asked: status.asked,
                    replicas_online: status.online,
                    replicas_waited_for: status.waits_for,
                }
            });
            let body = Readiness {
                status: "ready".to_owned(),
                writes,
            };
            Ok(json_response(StatusCode::OK, &body))
        }
        Err(error) => {
            tracing::warn!(%error, "not ready: the Redis master is unreachable");
            Err(ApiError::unavailable("the Redis master is unreachable"))
        }
    }
}

/// Log in: a username and password (as a form or JSON) for a JWT.
#[utoipa::path(post, path = "/token", operation_id = "issue_token", tag = "users",
    request_body(content(
        (Login = "application/x-www-form-urlencoded"),
        (Login = "application/json"))),
    responses(
        (status = 200, description = "a token", body = Token, headers(
            ("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, description = "a missing field, malformed JSON or a malformed username", body = ErrorBody),
        (status = 401, description = "wrong username or password, or a disabled user", body = ErrorBody),
        (status = 413, description = "a body over 8 KiB", body = ErrorBody),
        (status = 429, description = "too many attempts on this username or from this address lately", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 501, description = "this server verifies tokens but has no key to issue them", body = ErrorBody),
        (status = 503, description = "Redis unreachable, or too many passwords being checked", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait")))))]
pub(crate) async fn issue_token(
    app: &App,
    request: Request<RequestBody>,
    source: &str,
) -> Result<Response<Body>, ApiError> {
    let limit = LOGIN_BODY_LIMIT.min(app.limits.max_body_bytes);
    let form = content_type_is(request.headers(), "application/x-www-form-urlencoded");
    let login: Login = if form {
        let body = read_body(request, limit).await?;
        let (mut username, mut password) = (None, None);
        for (name, value) in form_urlencoded::parse(&body) {
            match name.as_ref() {
                "username" => username = Some(value.into_owned()),
                "password" => password = Some(value.into_owned()),
                _ => {}
            }
        }
        match (username, password) {
            (Some(username), Some(password)) => Login { username, password },
            _ => {
                return Err(ApiError::bad_request(
                    "the form needs `username` and `password`",
                ));
            }
        }
    } else {
        read_json(request, limit).await?
    };
    let user = match app
        .store
        .users()
        .authenticate_from(&login.username, &login.password, Some(source))
        .await
    {
        Err(tenant_kv::Error::LoginThrottled { retry_after }) => {
            tokio::time::sleep(retry_after.min(THROTTLED_LOGIN_DELAY)).await;
            return Err(tenant_kv::Error::LoginThrottled { retry_after }.into());
        }
        other => other?,
    };
    let Some(token) = app.jwt.issue(&user.username, &user.tenant) else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "this server verifies tokens but has no key to issue them",
        ));
    };
    let token = Token {
        access_token: token,
        token_type: TokenType::Bearer,
        expires_in: app.jwt.ttl().as_secs(),
    };
    let mut response = json_response(StatusCode::OK, &token);
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The logged-in user (tokens only: an API key gets 403).
#[utoipa::path(get, path = "/users/me", operation_id = "current_user", tag = "users",
    responses((status = 200, description = "the user", body = UserInfo)))]
pub(crate) fn current_user(principal: &Principal) -> Result<Response<Body>, ApiError> {
    let Principal::User(user) = principal else {
        return Err(ApiError::forbidden(
            "an API key is not a user; log in with POST /token",
        ));
    };
    let info = UserInfo {
        username: user.username.clone(),
        tenant_id: user.tenant.as_str().to_owned(),
        email: user.email.clone(),
        full_name: user.full_name.clone(),
        disabled: user.disabled,
        admin: user.admin,
    };
    Ok(json_response(StatusCode::OK, &info))
}

/// The tenant's usage and the quotas it is held to (`null`: no limit).
#[utoipa::path(get, path = "/usage", operation_id = "usage", tag = "users",
    responses((status = 200, description = "usage and quotas", body = UsageReport)))]
pub(crate) async fn usage(app: &App, principal: &Principal) -> Result<Response<Body>, ApiError> {
    let tenant = principal.tenant();
    let usage = app
        .store
        .tenant(tenant.clone(), principal.actor())
        .usage()
        .await?;
    let quotas = app.store.quotas(tenant).await?;
    let report = UsageReport {
        tenant_id: tenant.as_str().to_owned(),
        usage: UsageFigures {
            keys: usage.keys,
            bytes: usage.bytes,
        },
        quotas: tenant_kv::Quota::ALL
            .into_iter()
            .map(|quota| (quota.as_str().to_owned(), quotas.get(quota)))
            .collect(),
    };
    Ok(json_response(StatusCode::OK, &report))
}

/// The store's view of the principal's tenant, acting as the principal.
pub(crate) fn tenant(app: &App, principal: &Principal) -> tenant_kv::Tenant {
    app.store
        .tenant(principal.tenant().clone(), principal.actor())
}
