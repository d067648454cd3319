//! HTTP plumbing shared by the endpoints: reading bodies and parameters
//! one way, and writing JSON answers and errors with their headers.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{HeaderMap, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tenant_kv::RateLimitStatus;

use crate::error::ApiError;
use crate::middleware::ErrorCode;
use crate::schema::{ErrorBody, ErrorDetail};

/// The body of every answer.
pub(crate) type Body = Full<Bytes>;
/// A request's body: once the handler reads it, it may not stall for
/// longer than the body timeout (time spent before reading, say in
/// authentication during a failover, does not count).
pub(crate) type RequestBody = tower_http::timeout::TimeoutBody<hyper::body::Incoming>;

/// `value` as the JSON answer: one of the types of [`crate::schema`],
/// which the OpenAPI document describes.
pub(crate) fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut response = Response::new(Body::from(
        serde_json::to_vec(value).expect("the API's types serialise"),
    ));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn error_response(error: ApiError) -> Response<Body> {
    let body = ErrorBody {
        error: ErrorDetail {
            code: error.code.to_owned(),
            message: error.message,
        },
    };
    let mut response = json_response(error.status, &body);
    response.extensions_mut().insert(ErrorCode(error.code));
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
    if error.status == StatusCode::REQUEST_TIMEOUT {
        // The rest of the body may still come: the connection cannot be reused.
        headers.insert("connection", HeaderValue::from_static("close"));
    }
    if let Some(status) = &error.rate_limit {
        rate_limit_headers(headers, status);
    }
    response
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers):
/// the quota and window of the limit, and what is left of it and when it
/// is whole again, in seconds.
pub(crate) fn rate_limit_headers(headers: &mut HeaderMap, status: &RateLimitStatus) {
    let seconds = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let policy = format!(
        "\"{}\";q={};w={}",
        status.policy,
        status.quota,
        seconds(status.window).max(1)
    );
    let current = format!(
        "\"{}\";r={};t={}",
        status.policy,
        status.remaining,
        seconds(status.reset)
    );
    for (name, value) in [("ratelimit-policy", policy), ("ratelimit", current)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

/// A query parameter, percent-decoded as a path segment is: `+` stays a
/// plus sign (send a space as `%20`), so a key reads the same in `?key=`
/// and in `/data/{key}`. Invalid UTF-8 is refused.
pub(crate) fn query_param(uri: &hyper::Uri, name: &str) -> Result<Option<String>, ApiError> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| decode(value, name))
        .transpose()
}

/// Percent-decodes `raw`, naming `what` if it is not UTF-8 once decoded.
pub(crate) fn decode(raw: &str, what: &str) -> Result<String, ApiError> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_key",
                format!("`{what}` is not UTF-8 once percent-decoded"),
            )
        })
}

pub(crate) fn content_type_is(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(expected))
}

/// The whole body, at most `limit` bytes (413 past it; 408 if it stalls
/// for the body timeout).
pub(crate) async fn read_body(
    request: Request<RequestBody>,
    limit: usize,
) -> Result<Bytes, ApiError> {
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
        Err(error) if error.is::<tower_http::timeout::TimeoutError>() => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the body stopped arriving for longer than the body timeout",
        )),
        Err(error) => Err(ApiError::bad_request(format!(
            "cannot read the body: {error}"
        ))),
    }
}

pub(crate) async fn read_json<T: DeserializeOwned>(
    request: Request<RequestBody>,
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
    // Every body of the API is an object (or nothing): serde would also
    // read a struct from an array of its fields.
    if body.trim_ascii_start().starts_with(b"[") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "invalid JSON body: expected an object, not an array",
        ));
    }
    serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid JSON body: {error}"),
        )
    })
}

/// A time as the API writes it, `"2024-05-01T12:00:00.123Z"`: formatted
/// straight into the answer rather than into a `String` of its own (two
/// to three per item answered).
#[derive(Debug)]
pub(crate) struct Rfc3339(pub(crate) SystemTime);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |secs: u64, millis: u64| {
            let time =
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
            serde_json::to_string(&Rfc3339(time)).unwrap()
        };
        assert_eq!(at(0, 0), r#""1970-01-01T00:00:00.000Z""#);
        assert_eq!(at(951_782_400, 5), r#""2000-02-29T00:00:00.005Z""#);
        assert_eq!(at(1_714_564_800, 123), r#""2024-05-01T12:00:00.123Z""#);
        assert_eq!(at(4_102_444_799, 999), r#""2099-12-31T23:59:59.999Z""#);
    }

    #[test]
    fn a_key_decodes_the_same_in_the_query_and_the_path() {
        for raw in ["a+b", "a%20b", "a%2Fb%2Bc", "%E2%82%AC"] {
            let uri: hyper::Uri = format!("/data?x=1&key={raw}&key=second").parse().unwrap();
            assert_eq!(
                query_param(&uri, "key").unwrap().unwrap(),
                crate::router::find("GET", &format!("/data/{raw}"))
                    .unwrap()
                    .1
                    .unwrap()
            );
        }
        let uri: hyper::Uri = "/data?flag&key=".parse().unwrap();
        assert_eq!(query_param(&uri, "flag").unwrap().as_deref(), Some(""));
        assert_eq!(query_param(&uri, "missing").unwrap(), None);
        assert_eq!(decode("a+b", "key").unwrap(), "a+b");
        assert_eq!(decode("a%20b", "key").unwrap(), "a b");
        assert_eq!(decode("%FF", "key").unwrap_err().code, "invalid_key");
    }

    #[test]
    fn rate_limit_fields() {
        let mut headers = HeaderMap::new();
        let status = RateLimitStatus {
            policy: "tenant",
            quota: 100,
            window: Duration::from_millis(1500),
            remaining: 7,
            reset: Duration::from_millis(200),
            retry_after: None,
        };
        rate_limit_headers(&mut headers, &status);
        assert_eq!(headers["ratelimit-policy"], "\"tenant\";q=100;w=2");
        assert_eq!(headers["ratelimit"], "\"tenant\";r=7;t=1");
    }
}
