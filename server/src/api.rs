//! Answering a request: routing, authentication and admission, and the
//! endpoints that are neither items nor API keys.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use log_buffer::{LogBuffer, Offloader};
use redis_failover::FailoverClient;
use serde::Deserialize;
use serde_json::{Map, Value, json};
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

/// The largest login body: a username and a password, with room to spare.
const LOGIN_BODY_LIMIT: usize = 4096;
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
    let operation = match operation {
        Operation::Open(open) => return answer_open(app, open, request, facts).await,
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
    match operation {
        TenantOp::CurrentUser => current_user(&principal),
        TenantOp::Usage => usage(app, &principal).await,
        TenantOp::CreateItem => crate::items::create(app, &principal, request).await,
        TenantOp::ListItems => crate::items::list(app, &principal, &request).await,
        TenantOp::Batch => crate::items::batch(app, &principal, request).await,
        TenantOp::GetItem => crate::items::get(app, &principal, &key, request.headers()).await,
        TenantOp::PutItem => crate::items::put(app, &principal, &key, request).await,
        TenantOp::DeleteItem => {
            crate::items::delete(app, &principal, &key, request.headers()).await
        }
        TenantOp::CreateApiKey => crate::api_keys::create(app, &principal, request).await,
        TenantOp::ListApiKeys => crate::api_keys::list(app, &principal, &request).await,
        TenantOp::RevokeApiKey => crate::api_keys::revoke(app, &principal, &key).await,
        TenantOp::RotateApiKey => crate::api_keys::rotate(app, &principal, &key, request).await,
    }
}

async fn answer_open(
    app: &App,
    open: Open,
    request: Request<RequestBody>,
    facts: &Facts,
) -> Result<Response<Body>, ApiError> {
    match open {
        Open::Health => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
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
            let mut response = Response::new(Body::from(crate::openapi::serialised()));
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

/// Ready while the master answers. Where durable writes stand is in the
/// answer (`writes`), not in its status: writes held back for want of
/// replicas still leave reads to serve, and a load balancer that took
/// every instance out for it would stop those too.
async fn ready(app: &App) -> Result<Response<Body>, ApiError> {
    // PING goes through the client's retries: a failover that fits in the
    // retry budget does not make the service unready.
    match app
        .client
        .query_idempotent::<String>(&redis::cmd("PING"))
        .await
    {
        Ok(_) => {
            let mut body = json!({"status": "ready"});
            if let Some(status) = app.client.replication_status() {
                let state = if !status.writable() {
                    "held"
                } else if status.degraded() {
                    "degraded"
                } else {
                    "ok"
                };
                body["writes"] = json!({
                    "state": state,
                    "replicas_asked": status.asked,
                    "replicas_online": status.online,
                    "replicas_waited_for": status.waits_for,
                });
            }
            Ok(json_response(StatusCode::OK, &body))
        }
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

async fn issue_token(
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
            "admin": user.admin,
        }),
    ))
}

/// The tenant's usage and the quotas it is held to (`null`: no limit).
async fn usage(app: &App, principal: &Principal) -> Result<Response<Body>, ApiError> {
    let tenant = principal.tenant();
    let usage = app
        .store
        .tenant(tenant.clone(), principal.actor())
        .usage()
        .await?;
    let quotas = app.store.quotas(tenant).await?;
    let limits: Map<String, Value> = tenant_kv::Quota::ALL
        .into_iter()
        .map(|quota| (quota.as_str().to_owned(), json!(quotas.get(quota))))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "tenant_id": tenant.as_str(),
            "usage": {"keys": usage.keys, "bytes": usage.bytes},
            "quotas": limits,
        }),
    ))
}

/// The store's view of the principal's tenant, acting as the principal.
pub(crate) fn tenant(app: &App, principal: &Principal) -> tenant_kv::Tenant {
    app.store
        .tenant(principal.tenant().clone(), principal.actor())
}
