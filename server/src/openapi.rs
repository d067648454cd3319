//! The OpenAPI 3.1 document served at `/openapi.json`, derived from the
//! request and response types ([`crate::schema`]) and the handlers'
//! `#[utoipa::path]` attributes; what every operation of a kind shares
//! (credentials, rate limits, the request id, the statuses any request
//! can get) is added here from the route table. Tests check that its
//! paths and methods are exactly the router's, and its constraints the
//! store's.

use std::sync::Mutex;

use bytes::Bytes;
use serde_json::{Value, json};
use utoipa::OpenApi;

use crate::limits::Limits;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Multi-tenant key-value service",
        description = "Items, users and API keys of many tenants, stored in Redis through failovers. \
The tenant comes only from the verified credential. Every error is `{\"error\": {\"code\", \"message\"}}`. \
A known path asked with a method it does not take gets 405 with `Allow`; a `GET` route answers `HEAD` too. \
A request head over the server's limit gets 431."
    ),
    paths(
        crate::api::issue_token,
        crate::api::current_user,
        crate::api::usage,
        crate::items::create,
        crate::items::list,
        crate::items::batch,
        crate::items::get,
        crate::items::put,
        crate::items::delete,
        crate::api_keys::create,
        crate::api_keys::list,
        crate::api_keys::revoke,
        crate::api_keys::rotate,
        crate::api::health,
        crate::api::ready,
        serialised,
    )
)]
struct ApiDoc;

fn error(description: &str) -> Value {
    json!({"description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn header(description: &str, schema: Value) -> Value {
    json!({"description": description, "schema": schema})
}

/// The headers many answers carry, once in `components.headers`.
fn shared_headers() -> Value {
    json!({
        "X-Request-Id": header(
            "The request's id: the one sent, if 1 to 64 visible ASCII characters, or a new one",
            json!({"type": "string"}),
        ),
        "RateLimit-Policy": header(
            "The request rate that applies, if any: `\"<tenant|api_key>\";q=<quota>;w=<window seconds>` (draft-ietf-httpapi-ratelimit-headers)",
            json!({"type": "string"}),
        ),
        "RateLimit": header(
            "What is left of it: `\"<policy>\";r=<remaining>;t=<seconds until whole>`",
            json!({"type": "string"}),
        ),
        "Retry-After": header(
            "Seconds to wait before trying again",
            json!({"type": "integer", "minimum": 1}),
        ),
    })
}

/// A reference to one of [`shared_headers`].
fn shared(name: &str) -> Value {
    json!({"$ref": format!("#/components/headers/{name}")})
}

/// The statuses and headers every operation can get, and those of the
/// operations that take a credential or a body.
fn add_common(operation: &mut Value, takes_credential: bool) {
    let has_body = operation.get("requestBody").is_some();
    let asks_the_store = takes_credential || operation["operationId"] == "issue_token";
    let responses = operation["responses"].as_object_mut().expect("responses");
    let mut add = |status: &str, response: Value| {
        responses.entry(status).or_insert(response);
    };
    add(
        "414",
        error("the request target is over the server's limit"),
    );
    let mut unavailable =
        error("Redis unreachable past the retry budget, overloaded, or the request took too long");
    unavailable["headers"] = json!({"Retry-After": shared("Retry-After")});
    add("503", unavailable);
    // Where the store is asked.
    if asks_the_store {
        add(
            "500",
            error("the store refused a request it should not have (a bug)"),
        );
    }
    if has_body {
        let mut stalled = error("the body stalled for longer than the body timeout");
        stalled["headers"] = json!({"Connection": header("`close`", json!({"type": "string"}))});
        add("408", stalled);
        add("413", error("the body is over the server's limit"));
        add(
            "415",
            error("the body is not of a media type the operation takes"),
        );
    }
    if takes_credential {
        let mut unauthorized = error("a missing, invalid or expired credential");
        unauthorized["headers"] =
            json!({"WWW-Authenticate": header("`Bearer`", json!({"type": "string"}))});
        add("401", unauthorized);
        add(
            "403",
            error("the API key lacks the scope or key prefix, or a storage quota is reached"),
        );
        let mut limited =
            error("the tenant's or API key's request rate, or the write rate quota, is exceeded");
        limited["headers"] = json!({"Retry-After": shared("Retry-After")});
        add("429", limited);
    }
    for response in responses.values_mut() {
        let headers = response
            .as_object_mut()
            .expect("a response")
            .entry("headers")
            .or_insert_with(|| json!({}));
        headers["X-Request-Id"] = shared("X-Request-Id");
        if takes_credential {
            headers["RateLimit-Policy"] = shared("RateLimit-Policy");
            headers["RateLimit"] = shared("RateLimit");
        }
    }
    let parameters = operation
        .as_object_mut()
        .expect("an operation")
        .entry("parameters")
        .or_insert_with(|| json!([]));
    parameters.as_array_mut().expect("parameters").push(json!({
        "name": "X-Request-Id", "in": "header", "required": false,
        "description": "An id for the request's log lines, echoed in the answer; the server makes one if this is not 1 to 64 visible ASCII characters",
        "schema": {"type": "string"}}));
    if takes_credential {
        operation["security"] = json!([{"bearer": []}, {"apiKey": []}]);
    }
}

/// The whole document, for a server with `limits`.
fn document(limits: &Limits) -> Value {
    let mut document = serde_json::to_value(ApiDoc::openapi()).expect("the document serialises");
    for (path, item) in document["paths"].as_object_mut().expect("paths") {
        for (method, operation) in item.as_object_mut().expect("a path item") {
            let takes_credential =
                crate::router::takes_credential(&method.to_ascii_uppercase(), path);
            add_common(operation, takes_credential);
        }
    }
    document["components"]["securitySchemes"] = json!({
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
            "description": "A token from `POST /token`"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
            "description": "An API key from `POST /api-keys`"}
    });
    // Answers of no operation: to a method a path does not take, and to a
    // request head over the server's limit (hyper's, without a body).
    let mut not_allowed = error("the path does not take the method");
    not_allowed["headers"] = json!({"Allow": header(
        "The methods the path takes (`HEAD` with `GET`)",
        json!({"type": "string"}),
    )});
    document["components"]["headers"] = shared_headers();
    document["components"]["responses"] = json!({
        "MethodNotAllowed": not_allowed,
        "RequestHeaderFieldsTooLarge": {"description": "the request head is over the server's limit (431)"},
    });
    let schemas = &mut document["components"]["schemas"];
    // The batch size is a setting: the document says this server's.
    schemas["BatchInput"]["properties"]["operations"]["maxItems"] = json!(limits.max_batch);
    // utoipa leaves `deny_unknown_fields` out of an enum's variants.
    for variant in schemas["BatchOperation"]["oneOf"]
        .as_array_mut()
        .expect("the operations")
    {
        variant["additionalProperties"] = json!(false);
    }
    document
}

/// The last document serialised, and the batch size it was made for: it
/// is the largest answer, and anyone may ask for it.
static SERIALISED: Mutex<Option<(usize, Bytes)>> = Mutex::new(None);

/// This document.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "probes",
    responses((status = 200, description = "the OpenAPI 3.1 document", body = Object)))]
pub(crate) fn serialised(limits: &Limits) -> Bytes {
    let mut cached = SERIALISED
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    match &*cached {
        Some((max_batch, bytes)) if *max_batch == limits.max_batch => bytes.clone(),
        _ => {
            let bytes =
                Bytes::from(serde_json::to_vec(&document(limits)).expect("a Value serialises"));
            *cached = Some((limits.max_batch, bytes.clone()));
            bytes
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_document_has_exactly_the_routers_routes() {
        let document = document(&Limits::default());
        assert_eq!(document["openapi"], "3.1.0");
        let routed: BTreeSet<(String, String)> = crate::router::routes()
            .map(|(method, path)| (method.to_ascii_lowercase(), path.to_owned()))
            .collect();
        let documented: BTreeSet<(String, String)> = document["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, methods)| {
                methods
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(move |method| (method.clone(), path.clone()))
            })
            .collect();
        assert_eq!(routed, documented);
    }

    /// The document states the store's own limits, which the schema's
    /// attributes can only spell as literals.
    #[test]
    fn the_constraints_are_the_stores() {
        let document = document(&Limits::default());
        let schemas = &document["components"]["schemas"];
        // Any JSON, whether the handler answers with a parsed value or
        // the text as stored.
        assert_eq!(
            schemas["Item"]["properties"]["value"],
            serde_json::json!({})
        );
        let ttl_max = tenant_kv::MAX_TTL.as_secs();
        for variant in schemas["BatchOperation"]["oneOf"].as_array().unwrap() {
            let key = &variant["properties"]["key"];
            assert_eq!(key["maxLength"], tenant_kv::MAX_KEY_LEN);
            assert_eq!(
                key["pattern"],
                schemas["ApiKeyInput"]["properties"]["name"]["pattern"]
            );
            if let Some(ttl) = variant["properties"].get("ttl") {
                assert_eq!(ttl["maximum"], ttl_max);
            }
        }
        assert_eq!(
            schemas["BatchInput"]["properties"]["operations"]["maxItems"],
            Limits::default().max_batch
        );
        assert_eq!(
            schemas["ItemInput"]["properties"]["ttl"]["maximum"],
            ttl_max
        );
        let api_key = &schemas["ApiKeyInput"]["properties"];
        assert_eq!(
            api_key["name"]["maxLength"],
            tenant_kv::MAX_API_KEY_NAME_LEN
        );
        assert_eq!(api_key["key_prefix"]["maxLength"], tenant_kv::MAX_KEY_LEN);
        assert_eq!(api_key["ttl"]["maximum"], ttl_max);
        assert_eq!(
            schemas["RotateInput"]["properties"]["grace_seconds"]["maximum"],
            tenant_kv::MAX_ROTATION_GRACE.as_secs()
        );
        let login = &schemas["Login"]["properties"];
        assert_eq!(login["username"]["maxLength"], tenant_kv::MAX_USERNAME_LEN);
        assert_eq!(login["password"]["maxLength"], tenant_kv::MAX_PASSWORD_LEN);
        let paths = &document["paths"];
        let key = &paths["/data/{key}"]["get"]["parameters"][0];
        assert_eq!(
            (&key["name"], &key["schema"]["maxLength"]),
            (&json!("key"), &json!(tenant_kv::MAX_KEY_LEN))
        );
        let limit = &paths["/api-keys"]["get"]["parameters"][0];
        assert_eq!(limit["schema"]["maximum"], tenant_kv::MAX_API_KEY_PAGE);
        // One pattern for keys, names and prefixes (the attributes take only
        // literals), which leaves out what the store refuses.
        let pattern = key["schema"]["pattern"].as_str().unwrap();
        let query_key = &paths["/data"]["post"]["parameters"][0]["schema"]["pattern"];
        let prefix = api_key["key_prefix"]["pattern"].as_str().unwrap();
        assert_eq!(query_key, pattern);
        assert_eq!(prefix.replace("]*$", "]+$"), pattern);
        for c in [
            '\u{0}', '\u{1f}', '\u{7f}', '\u{9f}', '\u{61c}', '\u{200e}', '\u{2028}', '\u{202e}',
            '\u{2069}',
        ] {
            assert!(tenant_kv::is_unsafe_char(c));
            assert!(pattern.contains(&format!("\\u{:04x}", c as u32)), "{c:?}");
        }
    }

    #[test]
    fn operations_with_a_credential_say_so() {
        let document = document(&Limits::default());
        for (path, methods) in document["paths"].as_object().unwrap() {
            for (method, operation) in methods.as_object().unwrap() {
                let responses = &operation["responses"];
                assert!(responses.get("414").is_some(), "{method} {path}");
                let takes = crate::router::takes_credential(&method.to_ascii_uppercase(), path);
                assert_eq!(
                    operation.get("security").is_some(),
                    takes,
                    "{method} {path}"
                );
                assert_eq!(
                    responses.get("401").is_some(),
                    takes || path == "/token",
                    "{method} {path}"
                );
                let has_body = operation.get("requestBody").is_some();
                assert_eq!(responses.get("415").is_some(), has_body, "{method} {path}");
            }
        }
    }
}
