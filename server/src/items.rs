//! The item endpoints: create, read, replace, delete, list and batches,
//! with ETags and conditional requests.

use std::time::Duration;

use hyper::header::{ETAG, HeaderValue, IF_MATCH, IF_NONE_MATCH};
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tenant_kv::{Item, NewItem, Precondition, Scope, Write, Written};

use crate::api::{App, tenant};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::http::{Body, RequestBody, json_response, query_param, read_json, rfc3339};

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

pub(crate) async fn create(
    app: &App,
    principal: &Principal,
    request: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let key = query_param(request.uri(), "key")?
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

pub(crate) async fn get(
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

pub(crate) async fn put(
    app: &App,
    principal: &Principal,
    key: &str,
    request: Request<RequestBody>,
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
        let written = match if_match {
            IfMatch::Version(version) => {
                tenant
                    .put(key, new_item, Precondition::Version(version))
                    .await
            }
            // Without a version, PUT replaces an existing item (404 if
            // none), sent again through a failover as HTTP allows.
            _ => tenant.replace(key, new_item).await,
        };
        match written {
            // A failed If-Match is a failed precondition, whether or not the item exists.
            Err(tenant_kv::Error::NotFound { .. }) if if_match != IfMatch::Absent => {
                return Err(ApiError::precondition_failed("no item matches If-Match"));
            }
            other => other?,
        }
    };
    Ok(item_response(StatusCode::OK, &item))
}

pub(crate) async fn delete(
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

pub(crate) async fn list(
    app: &App,
    principal: &Principal,
    request: &Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let prefix = query_param(request.uri(), "prefix")?.unwrap_or_default();
    principal.require(Scope::List, &prefix)?;
    let limit = match query_param(request.uri(), "limit")? {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=1000).contains(limit))
            .ok_or_else(|| ApiError::bad_request("`limit` must be 1 to 1000"))?,
    };
    let cursor = query_param(request.uri(), "cursor")?;
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

pub(crate) async fn batch(
    app: &App,
    principal: &Principal,
    request: Request<RequestBody>,
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
