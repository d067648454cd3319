//! `/metrics` in the Prometheus text format: HTTP figures kept here, and
//! the failover client's, the log buffer's and the offloader's own.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use log_buffer::TenantMetrics;

use crate::api::App;

/// Upper bounds of the latency histogram's buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct RouteStats {
    by_status: BTreeMap<u16, u64>,
    /// Error answers by their `code`.
    by_error: BTreeMap<&'static str, u64>,
    /// Requests at or under each bound of [`BUCKETS`] (not cumulative).
    buckets: [u64; BUCKETS.len()],
    seconds: f64,
    count: u64,
}

/// Requests by route and status, latency by route, open connections.
#[derive(Default)]
pub(crate) struct HttpMetrics {
    routes: Mutex<BTreeMap<&'static str, RouteStats>>,
    pub(crate) open_connections: AtomicI64,
    pub(crate) in_flight: AtomicI64,
    /// Connections closed at accept: their address had its share open.
    pub(crate) connections_refused: AtomicU64,
    /// Connections closed because an answer made no progress.
    pub(crate) send_timeouts: AtomicU64,
}

impl HttpMetrics {
    pub(crate) fn record(
        &self,
        route: &'static str,
        status: u16,
        error: Option<&'static str>,
        elapsed: Duration,
    ) {
        let seconds = elapsed.as_secs_f64();
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let stats = routes.entry(route).or_default();
        *stats.by_status.entry(status).or_default() += 1;
        if let Some(code) = error {
            *stats.by_error.entry(code).or_default() += 1;
        }
        if let Some(bucket) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            stats.buckets[bucket] += 1;
        }
        stats.seconds += seconds;
        stats.count += 1;
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The offloader's figures with one value per tenant: name, type, help, value.
type TenantFigure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&TenantMetrics) -> f64,
);

const PER_TENANT: [TenantFigure; 6] = [
    (
        "log_offloader_sent_lines_total",
        "counter",
        "Lines the sink accepted, by tenant.",
        |m| m.sent_lines as f64,
    ),
    (
        "log_offloader_sent_bytes_total",
        "counter",
        "Bytes of lines the sink accepted, by tenant.",
        |m| m.sent_bytes as f64,
    ),
    (
        "log_offloader_retried_pushes_total",
        "counter",
        "Pushes retried, by tenant.",
        |m| m.retried_pushes as f64,
    ),
    (
        "log_offloader_depth",
        "gauge",
        "Entries waiting in the tenant's stream.",
        |m| m.depth as f64,
    ),
    (
        "log_offloader_oldest_age_seconds",
        "gauge",
        "Age of the tenant's oldest waiting entry.",
        |m| m.oldest_age.map_or(0.0, |age| age.as_secs_f64()),
    ),
    (
        "log_offloader_dead_letter_depth",
        "gauge",
        "Entries in the tenant's dead-letter streams.",
        |m| m.dead_letter_depth as f64,
    ),
];

pub(crate) fn render(app: &App) -> String {
    let mut out = String::with_capacity(8192);
    {
        let routes = app.metrics.routes.lock().unwrap_or_else(|e| e.into_inner());
        header(
            &mut out,
            "http_requests_total",
            "counter",
            "Requests answered, by route and status.",
        );
        for (route, stats) in routes.iter() {
            for (status, count) in &stats.by_status {
                let _ = writeln!(
                    out,
                    "http_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
                );
            }
        }
        header(
            &mut out,
            "http_errors_total",
            "counter",
            "Error answers by route and code: the store's outcomes (not_found, conflict, precondition_failed, quota_exceeded, rate_limited, login_throttled, overloaded, request_timeout, outcome_unknown, unavailable) among them.",
        );
        for (route, stats) in routes.iter() {
            for (code, count) in &stats.by_error {
                let _ = writeln!(
                    out,
                    "http_errors_total{{route=\"{route}\",code=\"{code}\"}} {count}"
                );
            }
        }
        header(
            &mut out,
            "http_request_duration_seconds",
            "histogram",
            "Time to answer, by route.",
        );
        for (route, stats) in routes.iter() {
            let mut cumulative = 0;
            for (bound, count) in BUCKETS.iter().zip(stats.buckets) {
                cumulative += count;
                let _ = writeln!(
                    out,
                    "http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                stats.count
            );
            let _ = writeln!(
                out,
                "http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                stats.seconds
            );
            let _ = writeln!(
                out,
                "http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                stats.count
            );
        }
    }
    header(
        &mut out,
        "http_requests_in_flight",
        "gauge",
        "Requests being answered.",
    );
    let _ = writeln!(
        out,
        "http_requests_in_flight {}",
        app.metrics.in_flight.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "http_open_connections",
        "gauge",
        "Open client connections.",
    );
    let _ = writeln!(
        out,
        "http_open_connections {}",
        app.metrics.open_connections.load(Ordering::Relaxed)
    );

    for (name, help, counter) in [
        (
            "http_connections_refused_total",
            "Connections closed at accept: their client address had max_connections_per_address open.",
            &app.metrics.connections_refused,
        ),
        (
            "http_send_timeouts_total",
            "Connections closed because the client read nothing of an answer within send_timeout.",
            &app.metrics.send_timeouts,
        ),
    ] {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
    }

    let failover = app.client.metrics();
    let counters = [
        (
            "master_changes",
            failover.master_changes,
            "Times the client switched to another master.",
        ),
        (
            "readonly_replies",
            failover.readonly_replies,
            "READONLY replies (a write reached a replica).",
        ),
        (
            "retries",
            failover.retries,
            "Requests sent again after a failure.",
        ),
        (
            "outcome_unknown",
            failover.outcome_unknown,
            "Writes whose outcome is unknown (connection lost after sending).",
        ),
        (
            "budget_exhausted",
            failover.budget_exhausted,
            "Requests that failed after the retry budget.",
        ),
        (
            "discoveries",
            failover.discoveries,
            "Master discoveries run.",
        ),
        ("fenced", failover.fenced, "Writes refused by fencing."),
        (
            "replica_reads",
            failover.replica_reads,
            "Reads served by replicas.",
        ),
        (
            "master_reads",
            failover.master_reads,
            "Reads served by the master.",
        ),
        (
            "unreplicated_writes",
            failover.unreplicated_writes,
            "Durable writes not acknowledged by enough replicas.",
        ),
        (
            "durable_writes_held",
            failover.durable_writes_held,
            "Durable writes that waited for replicas before running.",
        ),
        (
            "stale_masters_demoted",
            failover.stale_masters_demoted,
            "Replaced masters made replicas by this client.",
        ),
    ];
    for (name, value, help) in counters {
        header(
            &mut out,
            &format!("redis_failover_{name}_total"),
            "counter",
            help,
        );
        let _ = writeln!(out, "redis_failover_{name}_total {value}");
    }
    header(
        &mut out,
        "redis_failover_master_known",
        "gauge",
        "1 when the client knows a master.",
    );
    let _ = writeln!(
        out,
        "redis_failover_master_known {}",
        u8::from(app.client.master().is_some())
    );
    if let Some(status) = app.client.replication_status() {
        let gauges = [
            (
                "redis_failover_replicas_asked",
                "Replicas durable writes ask for.",
                f64::from(status.asked),
            ),
            (
                "redis_failover_replicas_online",
                "Replicas online at the master's last count (NaN: not counted yet).",
                status.online.map_or(f64::NAN, f64::from),
            ),
            (
                "redis_failover_replicas_waited_for",
                "Replicas durable writes wait for now: fewer than asked once one has been gone for redis_replica_lost_after.",
                f64::from(status.waits_for),
            ),
            (
                "redis_failover_durable_writes_blocked",
                "1 while durable writes are held back: fewer replicas online than they wait for.",
                f64::from(u8::from(!status.writable())),
            ),
        ];
        for (name, help, value) in gauges {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
    }

    let logs = app.logs.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(buffer) = &logs.buffer {
        let m = buffer.metrics();
        header(
            &mut out,
            "log_buffer_records_total",
            "counter",
            "Log records by outcome: queued, appended to Redis, trimmed away, or dropped by reason.",
        );
        for (outcome, value) in [
            ("queued", m.queued),
            ("appended", m.appended),
            ("trimmed", m.trimmed),
            ("dropped_queue_full", m.dropped_queue_full),
            ("dropped_closed", m.dropped_closed),
            ("dropped_redis_failed", m.dropped_redis_failed),
            ("dropped_shutdown", m.dropped_shutdown),
        ] {
            let _ = writeln!(
                out,
                "log_buffer_records_total{{outcome=\"{outcome}\"}} {value}"
            );
        }
    }
    if let Some(offloader) = &logs.offloader {
        let tenants = offloader.metrics();
        for (name, kind, help, value) in PER_TENANT {
            header(&mut out, name, kind, help);
            for (tenant, m) in &tenants {
                let _ = writeln!(out, "{name}{{tenant_id=\"{tenant}\"}} {}", value(m));
            }
        }
        header(
            &mut out,
            "log_offloader_dead_lettered_total",
            "counter",
            "Entries moved to the dead-letter stream, by tenant and reason.",
        );
        for (tenant, m) in &tenants {
            for (reason, count) in &m.dead_lettered {
                let _ = writeln!(
                    out,
                    "log_offloader_dead_lettered_total{{tenant_id=\"{tenant}\",reason=\"{reason}\"}} {count}"
                );
            }
        }
        header(
            &mut out,
            "log_offloader_push_seconds",
            "summary",
            "Time of accepted pushes, by tenant.",
        );
        for (tenant, m) in &tenants {
            let _ = writeln!(
                out,
                "log_offloader_push_seconds_sum{{tenant_id=\"{tenant}\"}} {}\nlog_offloader_push_seconds_count{{tenant_id=\"{tenant}\"}} {}",
                m.push_latency.as_secs_f64(),
                m.pushes
            );
        }
    }
    out
}
