//! The route table: one entry per endpoint, the single source of what the
//! router serves (the OpenAPI document is checked against it).

use percent_encoding::percent_decode_str;

use crate::error::ApiError;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    IssueToken,
    CurrentUser,
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
    Health,
    Ready,
    Metrics,
    OpenApi,
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
    route("POST", "/token", Operation::IssueToken),
    route("GET", "/users/me", Operation::CurrentUser),
    route("POST", "/data", Operation::CreateItem),
    route("GET", "/data", Operation::ListItems),
    route("POST", "/data/batch", Operation::Batch),
    route("GET", "/data/{key}", Operation::GetItem),
    route("PUT", "/data/{key}", Operation::PutItem),
    route("DELETE", "/data/{key}", Operation::DeleteItem),
    route("POST", "/api-keys", Operation::CreateApiKey),
    route("GET", "/api-keys", Operation::ListApiKeys),
    route("DELETE", "/api-keys/{key_id}", Operation::RevokeApiKey),
    route("POST", "/api-keys/{key_id}/rotate", Operation::RotateApiKey),
    route("GET", "/healthz", Operation::Health),
    route("GET", "/readyz", Operation::Ready),
    route("GET", "/metrics", Operation::Metrics),
    route("GET", "/openapi.json", Operation::OpenApi),
];

const fn route(method: &'static str, path: &'static str, operation: Operation) -> Route {
    Route {
        method,
        path,
        operation,
    }
}

impl Operation {
    /// Its name in metrics and logs (the OpenAPI `operationId`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::IssueToken => "issue_token",
            Self::CurrentUser => "current_user",
            Self::CreateItem => "create_item",
            Self::ListItems => "list_items",
            Self::Batch => "batch",
            Self::GetItem => "get_item",
            Self::PutItem => "put_item",
            Self::DeleteItem => "delete_item",
            Self::CreateApiKey => "create_api_key",
            Self::ListApiKeys => "list_api_keys",
            Self::RevokeApiKey => "revoke_api_key",
            Self::RotateApiKey => "rotate_api_key",
            Self::Health => "health",
            Self::Ready => "ready",
            Self::Metrics => "metrics",
            Self::OpenApi => "openapi",
        }
    }
}

/// Every route the server answers, as (method, path template).
pub fn routes() -> impl Iterator<Item = (&'static str, &'static str)> {
    ROUTES.iter().map(|route| (route.method, route.path))
}

/// The operation for `method` and `path`, with the path parameter
/// percent-decoded; 404 for an unknown path, 405 (with the methods it
/// has) for a known path and another method.
pub(crate) fn find(method: &str, path: &str) -> Result<(Operation, Option<String>), ApiError> {
    let mut allowed: Vec<&str> = Vec::new();
    for route in ROUTES {
        let Some(param) = match_path(route.path, path) else {
            continue;
        };
        if route.method != method {
            allowed.push(route.method);
            continue;
        }
        let param = param
            .map(|raw| {
                percent_decode_str(raw)
                    .decode_utf8()
                    .map(|decoded| decoded.into_owned())
                    .map_err(|_| {
                        ApiError::new(
                            hyper::StatusCode::BAD_REQUEST,
                            "invalid_key",
                            "the path parameter is not UTF-8 once percent-decoded",
                        )
                    })
            })
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
        assert_eq!(find("POST", "/data/batch").unwrap().0, Operation::Batch);
        assert_eq!(
            find("GET", "/data/batch").unwrap(),
            (Operation::GetItem, Some("batch".to_owned()))
        );
        assert_eq!(
            find("GET", "/data/a/b%2Fc%20d").unwrap(),
            (Operation::GetItem, Some("a/b/c d".to_owned()))
        );
        assert_eq!(
            find("POST", "/api-keys/k1/rotate").unwrap(),
            (Operation::RotateApiKey, Some("k1".to_owned()))
        );
        assert_eq!(find("GET", "/data/").unwrap_err().status, 404);
        assert_eq!(find("DELETE", "/api-keys/a/b").unwrap_err().status, 404);
        assert_eq!(find("GET", "/data/%FF").unwrap_err().code, "invalid_key");
        let not_allowed = find("PATCH", "/data/k").unwrap_err();
        assert_eq!(not_allowed.status, 405);
        assert_eq!(not_allowed.allow.as_deref(), Some("GET, PUT, DELETE"));
    }

    proptest! {
        /// Any key, percent-encoded into the path, comes back exactly.
        #[test]
        fn every_key_round_trips_through_the_path(key in "\\PC{1,40}") {
            let encoded = percent_encoding::utf8_percent_encode(&key, percent_encoding::NON_ALPHANUMERIC);
            let path = format!("/data/{encoded}");
            prop_assert_eq!(find("GET", &path).unwrap(), (Operation::GetItem, Some(key)));
        }
    }
}
