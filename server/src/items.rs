//! The item endpoints: create, read, replace, delete, list and batches,
//! with ETags and conditional requests.

use std::time::Duration;

use hyper::header::{ETAG, HeaderValue, IF_MATCH, IF_NONE_MATCH};
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value};
use tenant_kv::{Item, NewItem, Precondition, Scope, Write, Written};

use crate::api::{App, tenant};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::http::{Body, RequestBody, json_response, query_param, read_json};
use crate::schema::{
    BatchInput, BatchOperation, BatchOutcome, BatchResult, Deleted, ErrorBody, ItemInput, ItemView,
    Page,
};

impl ItemInput {
    fn into_new_item(self) -> Result<NewItem, ApiError> {
        new_item(self.value, self.ttl, self.metadata)
    }
}

fn new_item(
    value: Value,
    ttl: Option<u64>,
    metadata: Option<Map<String, Value>>,
) -> Result<NewItem, ApiError> {
    let mut item = NewItem::new(value);
    if let Some(metadata) = metadata {
        item = item.metadata(metadata);
    }
    match ttl {
        Some(0) => return Err(ApiError::bad_request("`ttl` must be at least 1 second")),
        // The store checks it too; here, so that a request no precondition
        // could let through is still refused as invalid.
        Some(seconds) if seconds > tenant_kv::MAX_TTL.as_secs() => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_item",
                format!("`ttl` is at most {} seconds", tenant_kv::MAX_TTL.as_secs()),
            ));
        }
        Some(seconds) => item = item.ttl(Duration::from_secs(seconds)),
        None => {}
    }
    Ok(item)
}

/// Create an item.
#[utoipa::path(post, path = "/data", operation_id = "create_item", tag = "items",
    params(("key" = String, Query, min_length = 1, max_length = 1024,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200e\\u200f\\u2028-\\u202e\\u2066-\\u2069]+$",
        description = "The item's key (1 to 1024 bytes), percent-encoded as in a path: `+` is a plus sign (send a space as `%20`).")),
    request_body = ItemInput,
    responses(
        (status = 201, description = "created", body = ItemView, headers(
            ("ETag" = String, description = "The item's version, quoted"),
            ("Location" = String, description = "The item's path"))),
        (status = 400, description = "missing or invalid key, malformed JSON or invalid item", body = ErrorBody),
        (status = 409, description = "an item with this key exists", body = ErrorBody)))]
pub(crate) async fn create(
    app: &App,
    principal: &Principal,
    request: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let key = query_param(request.uri(), "key")?
        .ok_or_else(|| ApiError::bad_request("missing query parameter `key`"))?;
    principal.require(Scope::Write, &key)?;
    let body: ItemInput = read_json(request, app.limits.max_body_bytes).await?;
    let item = tenant(app, principal)
        .create(&key, body.into_new_item()?)
        .await?;
    let mut response = item_response(StatusCode::CREATED, item);
    let location = format!(
        "/data/{}",
        percent_encoding::utf8_percent_encode(&key, percent_encoding::NON_ALPHANUMERIC)
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert("location", value);
    }
    Ok(response)
}

/// Read an item; `If-None-Match` answers 304 while it has a tag sent.
#[utoipa::path(get, path = "/data/{key}", operation_id = "get_item", tag = "items",
    params(KeyParam,
        ("If-None-Match" = Option<String>, Header, nullable = false,
            description = "ETags, or `*`: 304 if the item has one")),
    responses(
        (status = 200, description = "the item", body = ItemView, headers(
            ("ETag" = String, description = "The item's version, quoted"))),
        (status = 304, description = "the item still has a tag sent", headers(
            ("ETag" = String, description = "The item's version, quoted"))),
        (status = 400, description = "invalid key", body = ErrorBody),
        (status = 404, description = "no such item", body = ErrorBody)))]
pub(crate) async fn get(
    app: &App,
    principal: &Principal,
    key: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Read, key)?;
    let item = tenant(app, principal).get_raw(key).await?;
    if let Some(value) = headers.get(IF_NONE_MATCH) {
        let etag = Etag::new(item.version);
        let matches = value.to_str().unwrap_or_default().split(',').any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == etag.as_bytes()
        });
        if matches {
            let mut response = Response::new(Body::default());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response.headers_mut().insert(ETAG, etag.header());
            return Ok(response);
        }
    }
    Ok(item_response(StatusCode::OK, item))
}

/// The `{key}` of `/data/{key}`, as every item operation documents it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only its description is used: the router reads the key.
struct KeyParam {
    /// The item's key (1 to 1024 bytes), percent-encoded; it may contain `/`.
    #[param(
        min_length = 1,
        max_length = 1024,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u061c\\u200e\\u200f\\u2028-\\u202e\\u2066-\\u2069]+$"
    )]
    key: String,
}

/// Replace an item, which must exist; create it instead with
/// `If-None-Match: *`; compare-and-set with `If-Match`.
#[utoipa::path(put, path = "/data/{key}", operation_id = "put_item", tag = "items",
    params(KeyParam,
        ("If-Match" = Option<String>, Header, nullable = false, pattern = "^[^,]*$",
            description = "One ETag (the item's version, quoted) or `*` (the item exists); a weak or unknown tag never matches (412). Sent with `If-None-Match: *`, the preconditions never both hold (412)."),
        ("If-None-Match" = Option<String>, Header, nullable = false, pattern = "^\\*$",
            description = "`*`: create the item, 412 if it exists")),
    request_body = ItemInput,
    responses(
        (status = 200, description = "stored", body = ItemView, headers(
            ("ETag" = String, description = "The item's version, quoted"))),
        (status = 400, description = "invalid key, conditional header, malformed JSON or invalid item", body = ErrorBody),
        (status = 404, description = "no such item (without a precondition)", body = ErrorBody),
        (status = 412, description = "a precondition failed", body = ErrorBody)))]
pub(crate) async fn put(
    app: &App,
    principal: &Principal,
    key: &str,
    request: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Write, key)?;
    let headers = request.headers();
    // An empty list field is as good as none (RFC 9110 5.6.1).
    let create_only = match headers.get(IF_NONE_MATCH).filter(|value| !is_blank(value)) {
        None => false,
        Some(value) if value == "*" => true,
        Some(_) => return Err(ApiError::bad_request("PUT takes only `If-None-Match: *`")),
    };
    let if_match = if_match(headers)?;
    let body: ItemInput = read_json(request, app.limits.max_body_bytes).await?;
    let new_item = body.into_new_item()?;
    let tenant = tenant(app, principal);
    // RFC 9110 13.2.2: If-Match is evaluated first, and where it holds the
    // item exists, so `If-None-Match: *` fails; either way, 412.
    if if_match == IfMatch::Never || (create_only && if_match != IfMatch::Absent) {
        return Err(never_matches(&tenant, key).await);
    }
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
    Ok(item_response(StatusCode::OK, item))
}

/// Delete an item, optionally only at a version (`If-Match`).
#[utoipa::path(delete, path = "/data/{key}", operation_id = "delete_item", tag = "items",
    params(KeyParam,
        ("If-Match" = Option<String>, Header, nullable = false, pattern = "^[^,]*$",
            description = "One ETag (the item's version, quoted) or `*` (the item exists); a weak or unknown tag never matches (412)")),
    responses(
        (status = 200, description = "deleted", body = Deleted),
        (status = 400, description = "invalid key or If-Match", body = ErrorBody),
        (status = 404, description = "no such item (without If-Match)", body = ErrorBody),
        (status = 412, description = "no item matches If-Match", body = ErrorBody)))]
pub(crate) async fn delete(
    app: &App,
    principal: &Principal,
    key: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    principal.require(Scope::Delete, key)?;
    let if_match = if_match(headers)?;
    let tenant = tenant(app, principal);
    let expected = match if_match {
        IfMatch::Never => return Err(never_matches(&tenant, key).await),
        IfMatch::Version(version) => Some(version),
        IfMatch::Absent | IfMatch::Any => None,
    };
    let version = match tenant.delete(key, expected).await {
        Err(tenant_kv::Error::NotFound { .. }) if if_match != IfMatch::Absent => {
            return Err(ApiError::precondition_failed("no item matches If-Match"));
        }
        other => other?,
    };
    let deleted = Deleted {
        key: key.to_owned(),
        deleted: true,
        version,
    };
    Ok(json_response(StatusCode::OK, &deleted))
}

/// List keys by prefix, one page at a time.
#[utoipa::path(get, path = "/data", operation_id = "list_items", tag = "items",
    params(
        ("prefix" = Option<String>, Query, description = "Only keys starting with this (all keys without)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Keys per page; 100 without"),
        ("cursor" = Option<String>, Query, min_length = 1,
            description = "The `cursor` of the previous page, with the same `prefix`; sealed by the server, so any other is refused (400)")),
    responses(
        (status = 200, description = "a page of keys", body = Page),
        (status = 400, description = "bad limit or cursor", body = ErrorBody)))]
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
    let page = Page {
        keys: page.keys,
        cursor: page.cursor,
    };
    Ok(json_response(StatusCode::OK, &page))
}

impl BatchOperation {
    /// The write, if the caller may do it. (`if_version` is never
    /// negative: it is read as a whole number of at most 2^63 - 1.)
    fn into_write(self, principal: &Principal) -> Result<Write, ApiError> {
        match self {
            Self::Delete { key, if_version } => {
                principal.require(Scope::Delete, &key)?;
                Ok(Write::Delete {
                    key,
                    expected_version: if_version.map(i64::unsigned_abs),
                })
            }
            Self::Create {
                key,
                value,
                ttl,
                metadata,
            } => {
                principal.require(Scope::Write, &key)?;
                let item = new_item(value, ttl, metadata)?;
                Ok(Write::Create { key, item })
            }
            Self::Put {
                key,
                value,
                ttl,
                metadata,
                if_version,
            } => {
                principal.require(Scope::Write, &key)?;
                let item = new_item(value, ttl, metadata)?;
                let precondition = if_version
                    .map(i64::unsigned_abs)
                    .map_or(Precondition::Exists, Precondition::Version);
                Ok(Write::Put {
                    key,
                    item,
                    precondition,
                })
            }
        }
    }
}

/// Several writes, all or nothing.
#[utoipa::path(post, path = "/data/batch", operation_id = "batch", tag = "items",
    request_body = BatchInput,
    responses(
        (status = 200, description = "what each operation did", body = BatchResult),
        (status = 400, description = "empty or oversized batch, malformed JSON, an invalid operation, or a key in two operations", body = ErrorBody),
        (status = 404, description = "an operation's item does not exist; nothing was done", body = ErrorBody),
        (status = 409, description = "a create's item exists; nothing was done", body = ErrorBody),
        (status = 412, description = "an operation's version did not match; nothing was done", body = ErrorBody)))]
pub(crate) async fn batch(
    app: &App,
    principal: &Principal,
    request: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let body: BatchInput = read_json(request, app.limits.max_body_bytes).await?;
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
        .map(|(index, operation)| {
            operation.into_write(principal).map_err(|error| ApiError {
                message: format!("operation {index}: {}", error.message),
                ..error
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let written = tenant(app, principal).batch(writes).await?;
    let results = written
        .into_iter()
        .map(|written| match written {
            Written::Stored(item) => Ok(BatchOutcome::Stored(item.into())),
            Written::Deleted { key, version } => Ok(BatchOutcome::Deleted(Deleted {
                key,
                deleted: true,
                version,
            })),
            // The store names no other outcome today.
            _ => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the store answered a write this server does not know",
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json_response(StatusCode::OK, &BatchResult { results }))
}

/// An item's ETag, its version quoted, written in place: every answer
/// with an item carries one.
struct Etag {
    /// `"`, up to 20 digits, `"`.
    text: [u8; 22],
    len: usize,
}

impl Etag {
    fn new(version: u64) -> Self {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(version).as_bytes();
        let mut text = [b'"'; 22];
        text[1..=digits.len()].copy_from_slice(digits);
        Self {
            text,
            len: digits.len() + 2,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len]
    }

    fn header(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).expect("digits and quotes")
    }
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

fn is_blank(value: &HeaderValue) -> bool {
    value.as_bytes().iter().all(|b| b.is_ascii_whitespace())
}

fn if_match(headers: &HeaderMap) -> Result<IfMatch, ApiError> {
    let Some(value) = headers.get(IF_MATCH).filter(|value| !is_blank(value)) else {
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

/// The answer to preconditions no item can meet: 412, once the key is
/// known to be valid (an invalid one is a bad request, whatever the headers).
async fn never_matches(tenant: &tenant_kv::Tenant, key: &str) -> ApiError {
    match tenant.get_raw(key).await {
        Ok(_) | Err(tenant_kv::Error::NotFound { .. }) => {
            ApiError::precondition_failed("no item matches the preconditions")
        }
        Err(error) => error.into(),
    }
}

fn item_response<V: Serialize>(status: StatusCode, item: Item<V>) -> Response<Body> {
    let version = item.version;
    let mut response = json_response(status, &ItemView::from(item));
    response
        .headers_mut()
        .insert(ETAG, Etag::new(version).header());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_the_version_quoted() {
        for version in [0, 1, 42, 1_000_000_007, u64::MAX] {
            let etag = Etag::new(version);
            assert_eq!(etag.as_bytes(), format!("\"{version}\"").as_bytes());
            assert_eq!(etag.header(), format!("\"{version}\"").as_str());
        }
    }
}
