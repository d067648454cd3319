//! The tower layers every request passes through before the router
//! ([`crate::api::handle`]), outermost first:
//!
//! 1. `Cache-Control: private, no-cache` unless an answer says otherwise
//!    (answers carry a tenant's data), and the body timeout;
//! 2. the request id (tower-http): a well-formed `X-Request-Id` is kept,
//!    any other replaced by a random one, and the answer carries it;
//! 3. [`ObserveLayer`]: the in-flight gauge, the request's figures, the
//!    rate-limit fields and the access log;
//! 4. the request-target limit (414) and the request timeout (503), whose
//!    refusals [`answer_refusal`] turns into JSON answers.
//!
//! What the router learns while answering (the route, the tenant, the rate
//! limit) reaches layer 3 through the request's [`Facts`], which outlive a
//! timeout that drops the router's future.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::header::{CACHE_CONTROL, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tenant_kv::{RateLimitStatus, TenantId};
use tower::timeout::error::Elapsed;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutBody};
use tracing::Level;

use crate::api::App;
use crate::error::ApiError;
use crate::http::{Body, error_response, rate_limit_headers};
use crate::limits::Limits;
use crate::metrics::HttpMetrics;
use crate::router::{Operation, Surface};

/// The longest `X-Request-Id` kept from a client.
const MAX_REQUEST_ID: usize = 64;

/// The service answering one connection's requests: the layers above
/// around [`crate::api::handle`].
pub(crate) fn connection_service(
    app: &Arc<App>,
    surface: Surface,
    peer: IpAddr,
) -> impl Service<
    Request<hyper::body::Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ use<> {
    let handler = app.clone();
    // Boxed here, the handler's future (about 3 KiB) is moved once, into
    // its box, rather than again by every layer wrapping it.
    let router = service_fn(move |request| Box::pin(crate::api::handle(handler.clone(), request)));
    let observe = ObserveLayer {
        metrics: app.metrics.http.clone(),
        surface,
        peer,
    };
    layered(router, observe, &app.limits)
}

/// `router` inside every layer; generic over the body for the tests.
fn layered<B, S>(
    router: S,
    observe: ObserveLayer,
    limits: &Limits,
) -> impl Service<Request<B>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ use<B, S>
where
    B: hyper::body::Body + Send + 'static,
    S: Service<Request<TimeoutBody<B>>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let max_uri_bytes = limits.max_uri_bytes;
    ServiceBuilder::new()
        .layer(SetResponseHeaderLayer::if_not_present(
            CACHE_CONTROL,
            HeaderValue::from_static("private, no-cache"),
        ))
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .map_request(drop_malformed_request_id)
        .layer(SetRequestIdLayer::x_request_id(RandomRequestId))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(observe)
        .filter(move |request: Request<_>| within_target_limit(request, max_uri_bytes))
        .timeout(limits.request_timeout)
        .service(router)
}

/// Where a request came from, and what answering it learnt: the router
/// fills it in, [`ObserveLayer`] reports it.
#[derive(Clone, Debug)]
pub(crate) struct Facts(Arc<Mutex<Learnt>>);

#[derive(Debug)]
pub(crate) struct Learnt {
    pub(crate) surface: Surface,
    pub(crate) peer: IpAddr,
    pub(crate) route: Option<Operation>,
    pub(crate) tenant: Option<TenantId>,
    pub(crate) rate_limit: Option<RateLimitStatus>,
}

impl Facts {
    fn new(surface: Surface, peer: IpAddr) -> Self {
        Self(Arc::new(Mutex::new(Learnt {
            surface,
            peer,
            route: None,
            tenant: None,
            rate_limit: None,
        })))
    }

    /// The facts, to read or fill in; never held across an `.await`.
    pub(crate) fn get(&self) -> MutexGuard<'_, Learnt> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The error code of an answer that is an error, for the request's
/// figures; [`error_response`] sets it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ErrorCode(pub(crate) &'static str);

/// A client's id is kept only if it is short, printable ASCII: it goes
/// into logs and back into a header.
fn drop_malformed_request_id<B>(mut request: Request<B>) -> Request<B> {
    let well_formed = |id: &HeaderValue| {
        let id = id.as_bytes();
        !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.iter().all(u8::is_ascii_graphic)
    };
    if request
        .headers()
        .get("x-request-id")
        .is_some_and(|id| !well_formed(id))
    {
        request.headers_mut().remove("x-request-id");
    }
    request
}

#[derive(Clone, Copy)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        HeaderValue::from_bytes(&hex16(rand::random()))
            .ok()
            .map(RequestId::new)
    }
}

/// `bits` as sixteen lower-case hex digits, as `format!("{bits:016x}")`
/// writes them but in place: every request without an id makes one.
fn hex16(bits: u64) -> [u8; 16] {
    let mut digits = [0; 16];
    hex::encode_to_slice(bits.to_be_bytes(), &mut digits).expect("8 bytes make 16 digits");
    digits
}

fn within_target_limit<B>(
    request: Request<B>,
    max_uri_bytes: usize,
) -> Result<Request<B>, ApiError> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |t| t.as_str().len());
    if target > max_uri_bytes {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            "the request target is too long",
        ));
    }
    Ok(request)
}

/// The JSON answer to a request the inner layers refused: the target
/// limit's [`ApiError`], or the request timeout's 503.
fn answer_refusal(refusal: BoxError) -> Response<Body> {
    let error = match refusal.downcast::<ApiError>() {
        Ok(error) => *error,
        Err(other) if other.is::<Elapsed>() => ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request took too long",
            )
        },
        Err(other) => {
            tracing::error!(error = %other, "a layer failed a request");
            ApiError::internal("the request failed on the server")
        }
    };
    error_response(error)
}

/// Records every request: the in-flight gauge, its figures, the rate-limit
/// fields of its answer and the access log; answers what the inner layers
/// refused.
#[derive(Clone)]
struct ObserveLayer {
    metrics: HttpMetrics,
    surface: Surface,
    peer: IpAddr,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    /// Always ready: each request waits for a clone of the inner service
    /// to be ready, so that a refusal there is answered too.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Answer {
        let ObserveLayer {
            metrics,
            surface,
            peer,
        } = self.layer.clone();
        let facts = Facts::new(surface, peer);
        request.extensions_mut().insert(facts.clone());
        let seen = Seen::new(metrics, &request);
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut response = match inner.oneshot(request).await {
                Ok(response) => response,
                Err(refusal) => answer_refusal(refusal.into()),
            };
            seen.report(&facts, &mut response);
            Ok(response)
        })
    }
}

/// A request being answered, as the access log and figures will show it.
struct Seen {
    metrics: HttpMetrics,
    started: Instant,
    // Kept as they came: copying them to text would cost every request
    // allocations, even when the access log is filtered out.
    method: hyper::Method,
    request_id: Option<HeaderValue>,
}

impl Seen {
    fn new<B>(metrics: HttpMetrics, request: &Request<B>) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            started: Instant::now(),
            method: request.method().clone(),
            request_id: request
                .extensions()
                .get::<RequestId>()
                .map(|id| id.header_value().clone()),
        }
    }

    fn report(&self, facts: &Facts, response: &mut Response<Body>) {
        let learnt = facts.get();
        if let Some(status) = &learnt.rate_limit {
            rate_limit_headers(response.headers_mut(), status);
        }
        let route = learnt.route.map_or("unmatched", Operation::name);
        let tenant = learnt.tenant.as_ref().map(TenantId::as_str);
        let status = response.status().as_u16();
        let error_code = response.extensions().get::<ErrorCode>().map(|code| code.0);
        let elapsed = self.started.elapsed();
        self.metrics
            .record(route, status, error_code, tenant, elapsed);
        // The fields are worked out only when the level is enabled: most
        // answers log at DEBUG, which production filters out.
        macro_rules! access_log {
            ($level:expr) => {
                tracing::event!(
                    target: "access",
                    $level,
                    request_id = self
                        .request_id
                        .as_ref()
                        .and_then(|id| id.to_str().ok())
                        .unwrap_or_default(),
                    tenant_id = tenant,
                    method = self.method.as_str(),
                    route,
                    status,
                    micros = micros(elapsed),
                )
            };
        }
        // `event!` takes its level as a constant.
        match access_level(status) {
            Level::WARN => access_log!(Level::WARN),
            Level::INFO => access_log!(Level::INFO),
            _ => access_log!(Level::DEBUG),
        }
    }
}

/// Decrements also when hyper drops the answer's future (the client went
/// away).
impl Drop for Seen {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

/// The access log's level for an answer's status: server errors at WARN,
/// client errors at INFO, the rest at DEBUG. As with tower-http's trace
/// layer (responses at DEBUG), a request answered well leaves no INFO
/// line. Each record is appended to the log buffer, replicated, read and
/// shipped to the tenant's Loki; at INFO this one doubled the records an
/// answered request ships, while its operation's audit record and the
/// request figures already say what it did.
fn access_level(status: u16) -> Level {
    match status {
        500.. => Level::WARN,
        400..=499 => Level::INFO,
        _ => Level::DEBUG,
    }
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use tower::ServiceExt;

    use super::*;
    use crate::http::json_response;
    use crate::router::{Open, TenantOp};

    type Stub = fn(Request<TimeoutBody<Empty<Bytes>>>) -> Answer;

    /// The layers around `router`, with their figures.
    fn stack(
        router: Stub,
    ) -> (
        impl Service<Request<Empty<Bytes>>, Response = Response<Body>, Error = Infallible>,
        HttpMetrics,
    ) {
        let metrics = HttpMetrics::new().expect("valid metrics");
        let observe = ObserveLayer {
            metrics: metrics.clone(),
            surface: Surface::Public,
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        (
            layered(service_fn(router), observe, &Limits::default()),
            metrics,
        )
    }

    fn request(target: &str, request_id: Option<&str>) -> Request<Empty<Bytes>> {
        let mut builder = Request::get(target);
        if let Some(id) = request_id {
            builder = builder.header("x-request-id", id);
        }
        builder.body(Empty::new()).expect("a valid request")
    }

    async fn error_code(response: Response<Body>) -> String {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        value["error"]["code"].as_str().unwrap().to_owned()
    }

    fn healthy(_: Request<TimeoutBody<Empty<Bytes>>>) -> Answer {
        Box::pin(async {
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
            ))
        })
    }

    /// Learns its route and tenant, then never answers.
    fn stuck(request: Request<TimeoutBody<Empty<Bytes>>>) -> Answer {
        let facts = request.extensions().get::<Facts>().unwrap().clone();
        let mut learnt = facts.get();
        learnt.route = Some(Operation::Tenant(TenantOp::GetItem));
        learnt.tenant = Some(TenantId::new("acme").unwrap());
        learnt.rate_limit = Some(RateLimitStatus {
            policy: "tenant",
            quota: 10,
            window: Duration::from_secs(1),
            remaining: 9,
            reset: Duration::from_millis(100),
            retry_after: None,
        });
        Box::pin(std::future::pending())
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_timeout_is_answered_503_and_counted_with_what_it_learnt() {
        let (service, metrics) = stack(stuck);
        let response = service.oneshot(request("/data/k", None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(response.headers()["ratelimit"], "\"tenant\";r=9;t=1");
        assert_eq!(error_code(response).await, "timeout");
        assert_eq!(metrics.errors("get_item", "timeout"), 1);
        assert_eq!(metrics.in_flight.get(), 0);
    }

    #[tokio::test]
    async fn a_long_target_is_refused_before_the_router() {
        fn unreachable_router(_: Request<TimeoutBody<Empty<Bytes>>>) -> Answer {
            panic!("the router was called")
        }
        let (service, metrics) = stack(unreachable_router);
        let long = format!("/data/{}", "k".repeat(Limits::default().max_uri_bytes));
        let response = service.oneshot(request(&long, None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::URI_TOO_LONG);
        assert_eq!(error_code(response).await, "uri_too_long");
        assert_eq!(metrics.errors("unmatched", "uri_too_long"), 1);
    }

    #[tokio::test]
    async fn request_ids_are_kept_when_well_formed_and_made_otherwise() {
        let answer_id = |id: Option<&'static str>| async move {
            let (service, _) = stack(healthy);
            let response = service.oneshot(request("/healthz", id)).await.unwrap();
            assert_eq!(response.headers()[CACHE_CONTROL], "private, no-cache");
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(answer_id(Some("trace-42")).await, "trace-42");
        let long = "x".repeat(MAX_REQUEST_ID + 1).leak();
        let mut made_ids = std::collections::HashSet::new();
        for replaced in [None, Some("two words"), Some(""), Some(&*long)] {
            let made = answer_id(replaced).await;
            assert_eq!(made.len(), 16, "{made:?} for {replaced:?}");
            assert!(
                made.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{made:?}"
            );
            made_ids.insert(made);
        }
        assert_eq!(made_ids.len(), 4, "random: {made_ids:?}");
        for bits in [0, u64::MAX, 0x0123_4567_89ab_cdef, 0xf0e1_d2c3_b4a5_9687] {
            assert_eq!(hex16(bits), format!("{bits:016x}").as_bytes(), "{bits:x}");
        }
    }

    #[test]
    fn the_access_log_is_levelled_by_the_answer() {
        for (status, level) in [
            (200, Level::DEBUG),
            (304, Level::DEBUG),
            (400, Level::INFO),
            (404, Level::INFO),
            (499, Level::INFO),
            (500, Level::WARN),
            (503, Level::WARN),
        ] {
            assert_eq!(access_level(status), level, "{status}");
        }
    }

    #[tokio::test]
    async fn an_abandoned_request_leaves_the_in_flight_gauge() {
        fn open_route(request: Request<TimeoutBody<Empty<Bytes>>>) -> Answer {
            let facts = request.extensions().get::<Facts>().unwrap().clone();
            facts.get().route = Some(Operation::Open(Open::Health));
            Box::pin(std::future::pending())
        }
        let (mut service, metrics) = stack(open_route);
        let answer = service.ready().await.unwrap().call(request("/", None));
        assert_eq!(metrics.in_flight.get(), 1);
        drop(answer);
        assert_eq!(metrics.in_flight.get(), 0);
    }
}
