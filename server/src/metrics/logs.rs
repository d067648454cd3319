//! The log buffer's and the offloader's figures, from the ones this process
//! runs (none once shutdown has taken them).

use std::sync::{Arc, Mutex};

use log_buffer::TenantMetrics;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

use super::family::{Family, Value};
use crate::api::LogShipping;

/// Reads one tenant's value of a figure.
type TenantValue = fn(&TenantMetrics) -> f64;

/// The offloader's figures with one value per tenant: name, help, value.
type TenantFigure = (&'static str, &'static str, TenantValue);

const TENANT_COUNTERS: [TenantFigure; 3] = [
    (
        "log_offloader_sent_lines_total",
        "Lines the sink accepted, by tenant.",
        |m| m.sent_lines as f64,
    ),
    (
        "log_offloader_sent_bytes_total",
        "Bytes of lines the sink accepted, by tenant.",
        |m| m.sent_bytes as f64,
    ),
    (
        "log_offloader_retried_pushes_total",
        "Pushes retried, by tenant.",
        |m| m.retried_pushes as f64,
    ),
];

const TENANT_GAUGES: [TenantFigure; 3] = [
    (
        "log_offloader_depth",
        "Entries waiting in the tenant's stream.",
        |m| m.depth as f64,
    ),
    (
        "log_offloader_oldest_age_seconds",
        "Age of the tenant's oldest waiting entry.",
        |m| m.oldest_age.map_or(0.0, |age| age.as_secs_f64()),
    ),
    (
        "log_offloader_dead_letter_depth",
        "Entries in the tenant's dead-letter streams.",
        |m| m.dead_letter_depth as f64,
    ),
];

/// Reads the buffer and the offloader at each scrape.
pub(crate) struct LogCollector {
    logs: Arc<Mutex<LogShipping>>,
    records: Family,
    per_tenant: Vec<(Family, TenantValue)>,
    dead_lettered: Family,
    push_seconds: Family,
}

impl LogCollector {
    pub(crate) fn new(logs: Arc<Mutex<LogShipping>>) -> Self {
        let tenant = &["tenant_id"];
        let counters = TENANT_COUNTERS
            .iter()
            .map(|(name, help, value)| (Family::counter(name, help, tenant), *value));
        let gauges = TENANT_GAUGES
            .iter()
            .map(|(name, help, value)| (Family::gauge(name, help, tenant), *value));
        Self {
            logs,
            records: Family::counter(
                "log_buffer_records_total",
                "Log records by outcome: queued, appended to Redis, or dropped by reason; trimmed counts stream entries (of up to 64 records) trimmed away.",
                &["outcome"],
            ),
            per_tenant: counters.chain(gauges).collect(),
            dead_lettered: Family::counter(
                "log_offloader_dead_lettered_total",
                "Entries moved to the dead-letter stream, by tenant and reason.",
                &["tenant_id", "reason"],
            ),
            push_seconds: Family::summary(
                "log_offloader_push_seconds",
                "Time of accepted pushes, by tenant.",
                tenant,
            ),
        }
    }
}

impl Collector for LogCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = vec![
            self.records.desc(),
            self.dead_lettered.desc(),
            self.push_seconds.desc(),
        ];
        descs.extend(self.per_tenant.iter().map(|(family, _)| family.desc()));
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let mut families = Vec::new();
        if let Some(buffer) = &logs.buffer {
            let m = buffer.metrics();
            families.push(self.records.samples([
                (vec!["queued"], m.queued),
                (vec!["appended"], m.appended),
                (vec!["trimmed"], m.trimmed),
                (vec!["dropped_queue_full"], m.dropped_queue_full),
                (vec!["dropped_closed"], m.dropped_closed),
                (vec!["dropped_redis_failed"], m.dropped_redis_failed),
                (vec!["dropped_shutdown"], m.dropped_shutdown),
            ]));
        }
        let Some(offloader) = &logs.offloader else {
            return families;
        };
        let tenants = offloader.metrics();
        for (family, value) in &self.per_tenant {
            let samples = tenants.iter().map(|(t, m)| (vec![t.as_str()], value(m)));
            families.push(family.samples(samples));
        }
        let dead_lettered = tenants.iter().flat_map(|(tenant, m)| {
            let counts = m.dead_lettered.iter();
            counts.map(move |(reason, count)| (vec![tenant.as_str(), *reason], *count))
        });
        families.push(self.dead_lettered.samples(dead_lettered));
        let pushes = tenants.iter().map(|(tenant, m)| {
            let sum = m.push_latency.as_secs_f64();
            (
                vec![tenant.as_str()],
                Value::Summary {
                    sum,
                    count: m.pushes,
                },
            )
        });
        families.push(self.push_seconds.samples(pushes));
        families
    }
}
