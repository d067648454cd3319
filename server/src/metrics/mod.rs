//! `/metrics` in the Prometheus text format, through the `prometheus`
//! crate: the HTTP figures are its metric types, recorded as requests are
//! answered; the failover client's, the log buffer's and the offloader's
//! are read from those crates' own snapshots by a collector each
//! ([`failover`], [`logs`]) when `/metrics` is asked, and so are the
//! store's authentication cache's ([`auth_cache`]).

mod auth_cache;
mod failover;
mod family;
mod logs;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use redis_failover::FailoverClient;
use tenant_kv::TenantKv;

use crate::api::LogShipping;

/// What `/metrics` answers with.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the latency histogram's buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Requests by route and status, latency by route, open connections.
/// Clones count together.
#[derive(Clone)]
pub(crate) struct HttpMetrics {
    requests: IntCounterVec,
    errors: IntCounterVec,
    tenant_requests: IntCounterVec,
    duration: HistogramVec,
    pub(crate) open_connections: IntGauge,
    pub(crate) in_flight: IntGauge,
    /// Connections closed at accept: their address had its share open.
    pub(crate) connections_refused: IntCounter,
    /// Connections closed because an answer made no progress.
    pub(crate) send_timeouts: IntCounter,
}

impl HttpMetrics {
    pub(crate) fn new() -> prometheus::Result<Self> {
        Ok(Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "http_requests_total",
                    "Requests answered, by route and status.",
                ),
                &["route", "status"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "http_errors_total",
                    "Error answers by route and code: the store's outcomes (not_found, conflict, precondition_failed, quota_exceeded, rate_limited, login_throttled, overloaded, request_timeout, outcome_unknown, unavailable) among them.",
                ),
                &["route", "code"],
            )?,
            tenant_requests: IntCounterVec::new(
                Opts::new(
                    "http_tenant_requests_total",
                    "Requests of authenticated principals answered, by tenant and status.",
                ),
                &["tenant_id", "status"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "Time to answer, by route.")
                    .buckets(BUCKETS.to_vec()),
                &["route"],
            )?,
            open_connections: IntGauge::new("http_open_connections", "Open client connections.")?,
            in_flight: IntGauge::new("http_requests_in_flight", "Requests being answered.")?,
            connections_refused: IntCounter::new(
                "http_connections_refused_total",
                "Connections closed at accept: their client address had max_connections_per_address open.",
            )?,
            send_timeouts: IntCounter::new(
                "http_send_timeouts_total",
                "Connections closed because the client read nothing of an answer within send_timeout.",
            )?,
        })
    }

    fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.errors.clone()))?;
        registry.register(Box::new(self.tenant_requests.clone()))?;
        registry.register(Box::new(self.duration.clone()))?;
        registry.register(Box::new(self.open_connections.clone()))?;
        registry.register(Box::new(self.in_flight.clone()))?;
        registry.register(Box::new(self.connections_refused.clone()))?;
        registry.register(Box::new(self.send_timeouts.clone()))
    }

    /// Error answers counted for `route` and `code`.
    #[cfg(test)]
    pub(crate) fn errors(&self, route: &str, code: &str) -> u64 {
        self.errors.with_label_values(&[route, code]).get()
    }

    pub(crate) fn record(
        &self,
        route: &'static str,
        status: u16,
        error: Option<&'static str>,
        tenant: Option<&str>,
        elapsed: Duration,
    ) {
        // The code's own text, without formatting a string per request.
        let code = hyper::StatusCode::from_u16(status).ok();
        let status = code.as_ref().map_or("000", hyper::StatusCode::as_str);
        self.requests.with_label_values(&[route, status]).inc();
        if let Some(code) = error {
            self.errors.with_label_values(&[route, code]).inc();
        }
        if let Some(tenant) = tenant {
            self.tenant_requests
                .with_label_values(&[tenant, status])
                .inc();
        }
        self.duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }
}

/// The registry of one server: its HTTP figures and the collectors of the
/// crates it composes. One per server, not the process-wide default, so
/// servers sharing a process (as in the end-to-end tests) count apart.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) http: HttpMetrics,
}

impl Metrics {
    pub(crate) fn new(
        client: FailoverClient,
        store: TenantKv,
        logs: Arc<Mutex<LogShipping>>,
    ) -> Self {
        let registry = pipeline(client, logs);
        registry
            .register(Box::new(auth_cache::AuthCacheCollector::new(store)))
            .unwrap_or_else(|error| panic!("the authentication cache's metrics: {error}"));
        // Every name is a constant of this crate and registered once, so a
        // failure here is a bug (the unit test below meets it first).
        let http = HttpMetrics::new()
            .and_then(|http| http.register(&registry).map(|()| http))
            .unwrap_or_else(|error| panic!("the server's HTTP metrics: {error}"));
        Self { registry, http }
    }

    /// Every family in the text format, sorted by name.
    pub(crate) fn render(&self) -> String {
        render(&self.registry)
    }
}

/// A registry of the figures every process of the service has, a server or
/// an offloader alone: the failover client's and the log pipeline's.
pub(crate) fn pipeline(client: FailoverClient, logs: Arc<Mutex<LogShipping>>) -> Registry {
    let registry = Registry::new();
    registry
        .register(Box::new(failover::FailoverCollector::new(client)))
        .and_then(|()| registry.register(Box::new(logs::LogCollector::new(logs))))
        .unwrap_or_else(|error| panic!("the pipeline's metrics: {error}"));
    registry
}

/// Every family of `registry` in the text format, sorted by name.
pub(crate) fn render(registry: &Registry) -> String {
    // The encoder refuses only families the registry's checks at
    // registration rule out; an empty answer is then better than none.
    TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|error| {
            tracing::error!(%error, "cannot encode /metrics");
            String::new()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_collector_registers_and_renders_its_families() {
        let node = "127.0.0.1:1".parse().unwrap();
        let client = FailoverClient::candidates([node]).build().unwrap();
        let store = TenantKv::builder(client.clone()).build().unwrap();
        let metrics = Metrics::new(client, store, Arc::default());
        let http = &metrics.http;
        http.record(
            "get_item",
            200,
            None,
            Some("acme"),
            Duration::from_millis(3),
        );
        http.record(
            "get_item",
            404,
            Some("not_found"),
            None,
            Duration::from_secs(9),
        );
        http.in_flight.inc();
        let text = metrics.render();
        for line in [
            "# TYPE http_requests_total counter",
            "http_requests_total{route=\"get_item\",status=\"200\"} 1",
            "http_errors_total{code=\"not_found\",route=\"get_item\"} 1",
            "http_tenant_requests_total{status=\"200\",tenant_id=\"acme\"} 1",
            "http_request_duration_seconds_bucket{route=\"get_item\",le=\"0.005\"} 1",
            "http_request_duration_seconds_bucket{route=\"get_item\",le=\"+Inf\"} 2",
            "http_request_duration_seconds_count{route=\"get_item\"} 2",
            "http_requests_in_flight 1",
            "http_open_connections 0",
            "# TYPE redis_failover_master_changes_total counter",
            "redis_failover_master_changes_total 0",
            "redis_failover_master_known 0",
            "# TYPE tenant_kv_auth_cache_hits_total counter",
            "tenant_kv_auth_cache_hits_total 0",
            "tenant_kv_auth_cache_serving 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        // Without a log buffer or an offloader, no log family is exported.
        assert!(!text.contains("log_"), "{text}");
    }
}
