//! Metric families whose values are copied from another crate's snapshot
//! at each scrape. The crates keep their own counters (they take no
//! Prometheus dependency); a collector here reads them when `/metrics` is
//! asked, so nothing is copied between scrapes.

use std::collections::HashMap;

use prometheus::core::Desc;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType, Summary};

/// One sample's value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value {
    /// A counter's or a gauge's value.
    Number(f64),
    /// A summary without quantiles: the total and the number observed.
    Summary { sum: f64, count: u64 },
}

impl From<u64> for Value {
    fn from(value: u64) -> Self {
        // Counters stay far below 2^53, where f64 starts to round.
        Self::Number(value as f64)
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Self {
        Self::Number(value)
    }
}

/// The description of one family: registered once, so the registry
/// refuses a name two collectors would both export.
pub(crate) struct Family {
    desc: Desc,
    kind: MetricType,
}

impl Family {
    pub(crate) fn counter(name: &str, help: &str, labels: &[&str]) -> Self {
        Self::new(name, help, labels, MetricType::COUNTER)
    }

    pub(crate) fn gauge(name: &str, help: &str, labels: &[&str]) -> Self {
        Self::new(name, help, labels, MetricType::GAUGE)
    }

    pub(crate) fn summary(name: &str, help: &str, labels: &[&str]) -> Self {
        Self::new(name, help, labels, MetricType::SUMMARY)
    }

    fn new(name: &str, help: &str, labels: &[&str], kind: MetricType) -> Self {
        let labels = labels.iter().map(|l| (*l).to_owned()).collect();
        // Names and labels are constants of this crate: an invalid one is a
        // bug that the collectors' unit test meets first.
        let desc = Desc::new(name.to_owned(), help.to_owned(), labels, HashMap::new())
            .unwrap_or_else(|error| panic!("metric {name}: {error}"));
        Self { desc, kind }
    }

    pub(crate) fn desc(&self) -> &Desc {
        &self.desc
    }

    /// The family with one sample per item: its label values (in the order
    /// the family was given its label names) and its value.
    pub(crate) fn samples<'a, V: Into<Value>>(
        &self,
        samples: impl IntoIterator<Item = (Vec<&'a str>, V)>,
    ) -> MetricFamily {
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(self.kind);
        let metrics = samples
            .into_iter()
            .map(|(values, value)| self.metric(&values, value.into()))
            .collect();
        family.set_metric(metrics);
        family
    }

    /// The family with a single sample and no labels.
    pub(crate) fn single(&self, value: impl Into<Value>) -> MetricFamily {
        self.samples([(Vec::new(), value)])
    }

    fn metric(&self, values: &[&str], value: Value) -> Metric {
        debug_assert_eq!(values.len(), self.desc.variable_labels.len());
        let labels = self
            .desc
            .variable_labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.clone());
                pair.set_value((*value).to_owned());
                pair
            })
            .collect();
        let mut metric = Metric::from_label(labels);
        match (self.kind, value) {
            (MetricType::COUNTER, Value::Number(v)) => {
                let mut counter = Counter::default();
                counter.set_value(v);
                metric.set_counter(counter);
            }
            (MetricType::SUMMARY, Value::Summary { sum, count }) => {
                let mut summary = Summary::default();
                summary.set_sample_sum(sum);
                summary.set_sample_count(count);
                metric.set_summary(summary);
            }
            (_, Value::Number(v)) => {
                let mut gauge = Gauge::default();
                gauge.set_value(v);
                metric.set_gauge(gauge);
            }
            (_, Value::Summary { .. }) => unreachable!("a summary value for a {:?}", self.kind),
        }
        metric
    }
}
