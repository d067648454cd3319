//! The route tables: one entry per endpoint, the single source of what the
//! listeners serve (the OpenAPI document is checked against the public
//! one). The admin listener serves what names tenants (metrics) and the
//! probes; the public one never names a tenant but the caller's.

use crate::error::ApiError;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    /// Answered without a credential.
    Open(Open),
    /// Answered for the tenant of the request's credential.
    Tenant(TenantOp),
}

/// The operations that take no credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Open {
    IssueToken,
    Health,
    Ready,
    Metrics,
    ApiDocument,
}

/// The operations on the credential's tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TenantOp {
    CurrentUser,
    Usage,
    CreateItem,
    ListItems,
    Batch,
    GetItem,
    PutItem,
    DeleteItem,
    CreateApiKey,
    ListApiKeys,
    RevokeApiKey,
    RotateApiKey,
}

struct Route {
    method: &'static str,
    /// `{key}` at the end takes the rest of the path, slashes included;
    /// any other `{param}` takes one segment.
    path: &'static str,
    operation: Operation,
}

// Fixed paths come before templates that would also match them.
const ROUTES: &[Route] = &[
    open("POST", "/token", Open::IssueToken),
    tenant("GET", "/users/me", TenantOp::CurrentUser),
    tenant("GET", "/usage", TenantOp::Usage),
    tenant("POST", "/data", TenantOp::CreateItem),
    tenant("GET", "/data", TenantOp::ListItems),
    tenant("POST", "/data/batch", TenantOp::Batch),
    tenant("GET", "/data/{key}", TenantOp::GetItem),
    tenant("PUT", "/data/{key}", TenantOp::PutItem),
    tenant("DELETE", "/data/{key}", TenantOp::DeleteItem),
    tenant("POST", "/api-keys", TenantOp::CreateApiKey),
    tenant("GET", "/api-keys", TenantOp::ListApiKeys),
    tenant("DELETE", "/api-keys/{key_id}", TenantOp::RevokeApiKey),
    tenant("POST", "/api-keys/{key_id}/rotate", TenantOp::RotateApiKey),
    open("GET", "/healthz", Open::Health),
    open("GET", "/readyz", Open::Ready),
    open("GET", "/openapi.json", Open::ApiDocument),
];

/// What the admin listener serves.
const ADMIN_ROUTES: &[Route] = &[
    open("GET", "/metrics", Open::Metrics),
    open("GET", "/healthz", Open::Health),
    open("GET", "/readyz", Open::Ready),
];

/// Which listener a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Surface {
    /// The service's own port.
    Public,
    /// `admin_listen`: metrics and probes.
    Admin,
}

const fn open(method: &'static str, path: &'static str, operation: Open) -> Route {
    Route {
        method,
        path,
        operation: Operation::Open(operation),
    }
}

const fn tenant(method: &'static str, path: &'static str, operation: TenantOp) -> Route {
    Route {
        method,
        path,
        operation: Operation::Tenant(operation),
    }
}

impl Operation {
    /// Its name in metrics and logs (the OpenAPI `operationId`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Open(Open::IssueToken) => "issue_token",
            Self::Open(Open::Health) => "health",
            Self::Open(Open::Ready) => "ready",
            Self::Open(Open::Metrics) => "metrics",
            Self::Open(Open::ApiDocument) => "openapi",
            Self::Tenant(TenantOp::CurrentUser) => "current_user",
            Self::Tenant(TenantOp::Usage) => "usage",
            Self::Tenant(TenantOp::CreateItem) => "create_item",
            Self::Tenant(TenantOp::ListItems) => "list_items",
            Self::Tenant(TenantOp::Batch) => "batch",
            Self::Tenant(TenantOp::GetItem) => "get_item",
            Self::Tenant(TenantOp::PutItem) => "put_item",
            Self::Tenant(TenantOp::DeleteItem) => "delete_item",
            Self::Tenant(TenantOp::CreateApiKey) => "create_api_key",
            Self::Tenant(TenantOp::ListApiKeys) => "list_api_keys",
            Self::Tenant(TenantOp::RevokeApiKey) => "revoke_api_key",
            Self::Tenant(TenantOp::RotateApiKey) => "rotate_api_key",
        }
    }
}

/// Every route the public listener answers, as (method, path template);
/// `GET` routes answer `HEAD` too.
pub fn routes() -> impl Iterator<Item = (&'static str, &'static str)> {
    ROUTES.iter().map(|route| (route.method, route.path))
}

/// Whether the public route `method path` (a template) answers for the
/// tenant of a credential.
pub(crate) fn takes_credential(method: &str, path: &str) -> bool {
    ROUTES.iter().any(|route| {
        route.method == method
            && route.path == path
            && matches!(route.operation, Operation::Tenant(_))
    })
}

/// The operation for `method` and `path` on the public listener.
#[cfg(test)]
pub(crate) fn find(method: &str, path: &str) -> Result<(Operation, Option<String>), ApiError> {
    find_on(Surface::Public, method, path)
}

/// The operation for `method` and `path` on `surface`, with the path
/// parameter percent-decoded (as [`crate::http::decode`] does for query
/// parameters); 404 for an unknown path, 405 (with the methods it has)
/// for a known path and another method. `HEAD` is `GET` without a body.
pub(crate) fn find_on(
    surface: Surface,
    method: &str,
    path: &str,
) -> Result<(Operation, Option<String>), ApiError> {
    let table = match surface {
        Surface::Public => ROUTES,
        Surface::Admin => ADMIN_ROUTES,
    };
    let wanted = if method == "HEAD" { "GET" } else { method };
    let mut allowed: Vec<&str> = Vec::new();
    // `Allow` names the methods of the most specific template that fits,
    // as the OpenAPI document does (`/data/batch` is POST there, though
    // GET on it reads the item `batch`).
    let mut fitting: Option<&str> = None;
    for route in table {
        let Some(param) = match_path(route.path, path) else {
            continue;
        };
        if route.method != wanted {
            if *fitting.get_or_insert(route.path) != route.path {
                continue;
            }
            allowed.push(route.method);
            if route.method == "GET" {
                allowed.push("HEAD");
            }
            continue;
        }
        let param = param
            .map(|raw| crate::http::decode(raw, "key"))
            .transpose()?;
        return Ok((route.operation, param));
    }
    if allowed.is_empty() {
        return Err(ApiError::new(
            hyper::StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {path}"),
        ));
    }
    allowed.dedup();
    Err(ApiError {
        allow: Some(allowed.join(", ")),
        ..ApiError::new(
            hyper::StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} does not take {method}"),
        )
    })
}

/// The raw parameter if `path` fits `template` (`Some(None)` for a
/// template without one).
fn match_path<'a>(template: &str, path: &'a str) -> Option<Option<&'a str>> {
    let Some(open) = template.find('{') else {
        return (template == path).then_some(None);
    };
    let close = open + template[open..].find('}')?;
    let (prefix, suffix) = (&template[..open], &template[close + 1..]);
    let raw = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let takes_rest = &template[open..=close] == "{key}";
    if raw.is_empty() || (!takes_rest && raw.contains('/')) {
        return None;
    }
    Some(Some(raw))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fixed_paths_and_parameters() {
        let op = Operation::Tenant;
        assert_eq!(find("POST", "/data/batch").unwrap().0, op(TenantOp::Batch));
        assert_eq!(
            find("GET", "/data/batch").unwrap(),
            (op(TenantOp::GetItem), Some("batch".to_owned()))
        );
        assert_eq!(
            find("GET", "/data/a/b%2Fc%20d").unwrap(),
            (op(TenantOp::GetItem), Some("a/b/c d".to_owned()))
        );
        assert_eq!(
            find("POST", "/api-keys/k1/rotate").unwrap(),
            (op(TenantOp::RotateApiKey), Some("k1".to_owned()))
        );
        assert_eq!(find("GET", "/data/").unwrap_err().status, 404);
        assert_eq!(find("DELETE", "/api-keys/a/b").unwrap_err().status, 404);
        assert_eq!(find("GET", "/data/%FF").unwrap_err().code, "invalid_key");
        let not_allowed = find("PATCH", "/data/k").unwrap_err();
        assert_eq!(not_allowed.status, 405);
        assert_eq!(not_allowed.allow.as_deref(), Some("GET, HEAD, PUT, DELETE"));
        assert_eq!(find("HEAD", "/data/k").unwrap().0, op(TenantOp::GetItem));
        assert_eq!(find("GET", "/metrics").unwrap_err().status, 404);
        assert_eq!(
            find_on(Surface::Admin, "GET", "/metrics").unwrap().0,
            Operation::Open(Open::Metrics)
        );
        assert_eq!(
            find_on(Surface::Admin, "GET", "/usage").unwrap_err().status,
            404
        );
    }

    proptest! {
        /// Any key, percent-encoded into the path, comes back exactly.
        #[test]
        fn every_key_round_trips_through_the_path(key in "\\PC{1,40}") {
            let encoded = percent_encoding::utf8_percent_encode(&key, percent_encoding::NON_ALPHANUMERIC);
            let path = format!("/data/{encoded}");
            prop_assert_eq!(find("GET", &path).unwrap(), (Operation::Tenant(TenantOp::GetItem), Some(key)));
        }
    }
}
