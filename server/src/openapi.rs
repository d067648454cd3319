//! The OpenAPI 3 document served at `/openapi.json`, written out by hand;
//! a test checks that its paths and methods are exactly the router's.

use std::sync::LazyLock;

use serde_json::{Value, json};

fn error(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn body(name: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema(name)}}})
}

/// An authenticated operation: adds 401, 403 (scope), 408, 429 and 503,
/// and the rate-limit fields sent when a request rate applies.
fn authed(mut operation: Value) -> Value {
    operation["security"] = json!([{"bearer": []}, {"apiKey": []}]);
    let responses = operation["responses"].as_object_mut().expect("responses");
    for response in responses.values_mut() {
        let headers = response
            .as_object_mut()
            .expect("a response")
            .entry("headers")
            .or_insert_with(|| json!({}));
        headers["RateLimit-Policy"] = json!({"description": "the request rate that applies: `\"<tenant|api_key>\";q=<quota>;w=<window seconds>` (draft-ietf-httpapi-ratelimit-headers)", "schema": {"type": "string"}});
        headers["RateLimit"] = json!({"description": "what is left of it: `\"<policy>\";r=<remaining>;t=<seconds until whole>`", "schema": {"type": "string"}});
    }
    responses.insert(
        "401".into(),
        error("missing, invalid or expired credential"),
    );
    responses.insert(
        "403".into(),
        error("the API key lacks the scope, or a storage quota is reached"),
    );
    responses.insert(
        "408".into(),
        error("the body stalled for longer than the body timeout"),
    );
    responses.insert(
        "429".into(),
        error("the tenant's or API key's request rate, or the write rate quota, is exceeded; see Retry-After and RateLimit"),
    );
    responses.insert(
        "503".into(),
        error("Redis unreachable past the retry budget, or the request timed out"),
    );
    operation
}

fn key_param() -> Value {
    json!({"name": "key", "in": "path", "required": true, "schema": {"type": "string"},
           "description": "The item's key, percent-encoded; it may contain `/`."})
}

fn key_id_param() -> Value {
    json!({"name": "key_id", "in": "path", "required": true, "schema": {"type": "string"}})
}

fn etag_header() -> Value {
    json!({"ETag": {"description": "The item's version, quoted", "schema": {"type": "string"}}})
}

static DOCUMENT: LazyLock<Value> = LazyLock::new(|| {
    let item_ok = |description: &str| {
        let mut response = ok(description, schema("Item"));
        response["headers"] = etag_header();
        response
    };
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Multi-tenant key-value service",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Items, users and API keys of many tenants, stored in Redis through failovers. The tenant comes only from the verified credential. Every error is `{\"error\": {\"code\", \"message\"}}`."
        },
        "paths": {
            "/token": {"post": {
                "operationId": "issue_token",
                "summary": "Log in: username and password (form or JSON) for a JWT",
                "requestBody": {"required": true, "content": {
                    "application/x-www-form-urlencoded": {"schema": schema("Login")},
                    "application/json": {"schema": schema("Login")}}},
                "responses": {
                    "200": ok("a token", schema("Token")),
                    "400": error("missing field, malformed JSON, a malformed username or a password over 1024 bytes"),
                    "401": error("wrong username or password, or disabled user"),
                    "408": error("the body stalled"),
                    "413": error("body over 4 KiB"),
                    "415": error("neither a form nor JSON"),
                    "429": error("too many attempts on this username or from this address lately; see Retry-After"),
                    "501": error("this server has no key to issue tokens"),
                    "503": error("Redis unreachable, or too many passwords being checked (see Retry-After)")}}},
            "/users/me": {"get": authed(json!({
                "operationId": "current_user",
                "summary": "The logged-in user (tokens only)",
                "responses": {"200": ok("the user", schema("User"))}}))},
            "/usage": {"get": authed(json!({
                "operationId": "usage",
                "summary": "The tenant's usage, and the quotas it is held to",
                "responses": {"200": ok("usage and quotas", schema("Usage"))}}))},
            "/data": {
                "post": authed(json!({
                    "operationId": "create_item",
                    "summary": "Create an item",
                    "parameters": [{"name": "key", "in": "query", "required": true, "schema": {"type": "string"},
                        "description": "The item's key, percent-encoded as in a path: `+` is a plus sign (send a space as `%20`)."}],
                    "requestBody": body("ItemInput"),
                    "responses": {
                        "201": item_ok("created"),
                        "400": error("missing key, invalid key, malformed JSON or invalid item"),
                        "409": error("an item with this key exists"),
                        "413": error("body over the limit"),
                        "415": error("not JSON")}})),
                "get": authed(json!({
                    "operationId": "list_items",
                    "summary": "List keys by prefix, one page at a time",
                    "parameters": [
                        {"name": "prefix", "in": "query", "schema": {"type": "string", "default": ""}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "the `cursor` of the previous page"}],
                    "responses": {
                        "200": ok("a page of keys", schema("Page")),
                        "400": error("bad limit or cursor")}}))},
            "/data/batch": {"post": authed(json!({
                "operationId": "batch",
                "summary": "Several writes, all or nothing",
                "requestBody": body("Batch"),
                "responses": {
                    "200": ok("what each operation did", schema("BatchResult")),
                    "400": error("empty or oversized batch, malformed JSON, or an invalid operation"),
                    "404": error("an operation's item does not exist; nothing was done"),
                    "409": error("a create's item exists; nothing was done"),
                    "412": error("an operation's version did not match; nothing was done"),
                    "413": error("body over the limit"),
                    "415": error("not JSON")}}))},
            "/data/{key}": {
                "get": authed(json!({
                    "operationId": "get_item",
                    "summary": "Read an item",
                    "parameters": [key_param(), {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}],
                    "responses": {
                        "200": item_ok("the item"),
                        "304": {"description": "the item still has the ETag sent", "headers": etag_header()},
                        "400": error("invalid key"),
                        "404": error("no such item")}})),
                "put": authed(json!({
                    "operationId": "put_item",
                    "summary": "Replace an item; create it with `If-None-Match: *`; compare-and-set with `If-Match`",
                    "parameters": [key_param(),
                        {"name": "If-Match", "in": "header", "schema": {"type": "string"}},
                        {"name": "If-None-Match", "in": "header", "schema": {"type": "string", "enum": ["*"]}}],
                    "requestBody": body("ItemInput"),
                    "responses": {
                        "200": item_ok("stored"),
                        "400": error("invalid key, malformed JSON or invalid item"),
                        "404": error("no such item (without preconditions)"),
                        "412": error("the precondition failed"),
                        "413": error("body over the limit"),
                        "415": error("not JSON")}})),
                "delete": authed(json!({
                    "operationId": "delete_item",
                    "summary": "Delete an item, optionally only at a version (`If-Match`)",
                    "parameters": [key_param(), {"name": "If-Match", "in": "header", "schema": {"type": "string"}}],
                    "responses": {
                        "200": ok("deleted", schema("Deleted")),
                        "400": error("invalid key"),
                        "404": error("no such item"),
                        "412": error("the version did not match")}}))},
            "/api-keys": {
                "post": authed(json!({
                    "operationId": "create_api_key",
                    "summary": "Create an API key (needs a user or the `admin` scope); its secret is shown once",
                    "requestBody": body("ApiKeyInput"),
                    "responses": {
                        "201": ok("the key, with its secret", schema("ApiKey")),
                        "400": error("invalid settings or malformed JSON"),
                        "415": error("not JSON")}})),
                "get": authed(json!({
                    "operationId": "list_api_keys",
                    "summary": "API keys, oldest first, without secrets: every key of the tenant for an admin, one's own otherwise",
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 100}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "the `cursor` of the previous page"}],
                    "responses": {
                        "200": ok("a page of keys", json!({"type": "object", "properties": {
                            "api_keys": {"type": "array", "items": schema("ApiKey")},
                            "cursor": {"type": "string", "nullable": true}}})),
                        "400": error("bad limit or cursor")}}))},
            "/api-keys/{key_id}": {"delete": authed(json!({
                "operationId": "revoke_api_key",
                "summary": "Revoke an API key at once",
                "parameters": [key_id_param()],
                "responses": {
                    "200": ok("revoked", json!({"type": "object", "properties": {"key_id": {"type": "string"}, "revoked": {"type": "boolean"}}})),
                    "404": error("no such key in the tenant")}}))},
            "/api-keys/{key_id}/rotate": {"post": authed(json!({
                "operationId": "rotate_api_key",
                "summary": "Give a key a new secret; the old one stays valid for `grace_seconds`",
                "parameters": [key_id_param()],
                "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "properties": {"grace_seconds": {"type": "integer", "minimum": 0, "maximum": 86400, "default": 0}}}}}},
                "responses": {
                    "200": ok("the key, with its new secret", schema("ApiKey")),
                    "404": error("no such key in the tenant")}}))},
            "/healthz": {"get": {"operationId": "health", "summary": "The process is up",
                "responses": {"200": ok("up", json!({"type": "object"}))}}},
            "/readyz": {"get": {"operationId": "ready", "summary": "The Redis master answers (within the retry budget)",
                "responses": {"200": ok("ready", json!({"type": "object"})), "503": error("the master is unreachable")}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                "responses": {"200": ok("OpenAPI 3", json!({"type": "object"}))}}}
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "Login": {"type": "object", "required": ["username", "password"], "properties": {
                    "username": {"type": "string"}, "password": {"type": "string"}}},
                "Token": {"type": "object", "properties": {"access_token": {"type": "string"},
                    "token_type": {"type": "string", "enum": ["bearer"]}, "expires_in": {"type": "integer"}}},
                "User": {"type": "object", "properties": {"username": {"type": "string"}, "tenant_id": {"type": "string"},
                    "email": {"type": "string", "nullable": true}, "full_name": {"type": "string", "nullable": true}, "disabled": {"type": "boolean"},
                    "admin": {"type": "boolean", "description": "manages every API key of the tenant"}}},
                "Usage": {"type": "object", "properties": {"tenant_id": {"type": "string"},
                    "usage": {"type": "object", "properties": {"keys": {"type": "integer"}, "bytes": {"type": "integer"}}},
                    "quotas": {"type": "object", "description": "each quota's value, null for no limit",
                        "additionalProperties": {"type": "integer", "nullable": true}}}},
                "ItemInput": {"type": "object", "required": ["value"], "additionalProperties": false, "properties": {
                    "value": {"description": "any JSON value"},
                    "ttl": {"type": "integer", "minimum": 1, "description": "seconds"},
                    "metadata": {"type": "object"}}},
                "Item": {"type": "object", "properties": {"key": {"type": "string"}, "value": {},
                    "metadata": {"type": "object", "nullable": true}, "version": {"type": "integer"},
                    "created_at": {"type": "string", "format": "date-time"}, "updated_at": {"type": "string", "format": "date-time"},
                    "expires_at": {"type": "string", "format": "date-time", "nullable": true}}},
                "Deleted": {"type": "object", "properties": {"key": {"type": "string"}, "deleted": {"type": "boolean"}, "version": {"type": "integer"}}},
                "Page": {"type": "object", "properties": {"keys": {"type": "array", "items": {"type": "string"}},
                    "cursor": {"type": "string", "nullable": true}}},
                "Batch": {"type": "object", "required": ["operations"], "properties": {"operations": {"type": "array", "items": {
                    "type": "object", "required": ["op", "key"], "properties": {
                        "op": {"type": "string", "enum": ["create", "put", "delete"]},
                        "key": {"type": "string"}, "value": {}, "ttl": {"type": "integer", "minimum": 1},
                        "metadata": {"type": "object"},
                        "if_version": {"type": "integer", "description": "put and delete: the version the item must have"}}}}}},
                "BatchResult": {"type": "object", "properties": {"results": {"type": "array", "items": {"type": "object"}}}},
                "ApiKeyInput": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 128, "description": "at most 128 bytes, without control characters"},
                    "scopes": {"type": "array", "items": {"type": "string", "enum": ["read", "write", "delete", "list", "admin"]},
                        "default": ["read", "write", "delete", "list"]},
                    "key_prefix": {"type": "string", "maxLength": 1024, "description": "the key may only touch items under this prefix"},
                    "ttl": {"type": "integer", "minimum": 1, "description": "seconds until the key expires"},
                    "requests_per_second": {"type": "integer", "minimum": 1, "maximum": 1000000, "description": "the key's own request rate, instead of the tenant's default for keys"}}},
                "ApiKey": {"type": "object", "properties": {"key_id": {"type": "string"}, "name": {"type": "string"},
                    "scopes": {"type": "array", "items": {"type": "string"}}, "key_prefix": {"type": "string", "nullable": true},
                    "owner": {"type": "string", "nullable": true, "description": "the user the key acts for; disabling the user disables the key"},
                    "requests_per_second": {"type": "integer", "nullable": true},
                    "created_at": {"type": "string", "format": "date-time"},
                    "expires_at": {"type": "string", "format": "date-time", "nullable": true},
                    "last_used": {"type": "string", "format": "date-time", "nullable": true},
                    "api_key": {"type": "string", "description": "the secret, only when created or rotated"}}}
            }
        }
    })
});

/// The document serialised once: it is the largest answer, and anyone may
/// ask for it.
static SERIALISED: LazyLock<bytes::Bytes> = LazyLock::new(|| {
    serde_json::to_vec(&*DOCUMENT)
        .expect("a Value serialises")
        .into()
});

/// The document.
#[cfg(test)]
pub(crate) fn document() -> &'static Value {
    &DOCUMENT
}

/// The document as JSON text.
pub(crate) fn serialised() -> bytes::Bytes {
    SERIALISED.clone()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_document_has_exactly_the_routers_routes() {
        let routed: BTreeSet<(String, String)> = crate::router::routes()
            .map(|(method, path)| (method.to_ascii_lowercase(), path.to_owned()))
            .collect();
        let documented: BTreeSet<(String, String)> = document()["paths"]
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
}
