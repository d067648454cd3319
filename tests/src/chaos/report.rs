//! What a chaos run saw, as figures, JSON and printed totals.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::fault::Fault;

/// What one round saw.
#[derive(Clone, Debug)]
pub struct Round {
    /// The fault.
    pub fault: Fault,
    /// Requests that failed although they had not used up the retry budget.
    pub errors_within_budget: u64,
    /// Requests that failed after the whole retry budget.
    pub errors_past_budget: u64,
    /// Requests answered at once with 503 `store_full` or
    /// `store_not_persisting`: the master refused the write (not errors
    /// the budget should hide; only faults that refuse writes cause them).
    pub refusals: u64,
    /// The slowest of those answers.
    pub slowest_refusal: Duration,
    /// From the fault's injection until it is over (the old master back as
    /// a replica, the receiver answering again) and every traffic task has
    /// written since.
    pub recovery: Duration,
}

/// What the whole run saw.
#[derive(Clone, Debug)]
pub struct Report {
    /// The server every node ran, and its version ("Redis 7.0").
    pub server: String,
    /// Each round.
    pub rounds: Vec<Round>,
    /// Writes acknowledged to clients.
    pub acknowledged_writes: u64,
    /// Acknowledged writes whose value was not found at the end.
    pub lost_writes: Vec<String>,
    /// Reads answered during the run.
    pub reads: u64,
    /// Reads during the run that missed an acknowledged write.
    pub stale_reads: Vec<String>,
    /// Acknowledged mutations whose audit record never reached the receiver.
    pub missing_audit_records: Vec<String>,
    /// Audit records that reached the receiver more than once.
    pub duplicate_lines: u64,
    /// The first failed requests, described.
    pub failures: Vec<String>,
    /// Audit entries the offloaders dead-lettered, by reason.
    pub dead_lettered: BTreeMap<String, u64>,
}

impl Report {
    /// Client errors that the retry budget should have hidden.
    pub fn errors_within_budget(&self) -> u64 {
        self.rounds.iter().map(|r| r.errors_within_budget).sum()
    }

    /// Client errors after the whole retry budget.
    pub fn errors_past_budget(&self) -> u64 {
        self.rounds.iter().map(|r| r.errors_past_budget).sum()
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let rounds: Vec<Value> = self
            .rounds
            .iter()
            .enumerate()
            .map(|(i, r)| {
                json!({"round": i + 1, "fault": r.fault.name(),
                       "errors_within_budget": r.errors_within_budget,
                       "errors_past_budget": r.errors_past_budget,
                       "refusals": r.refusals,
                       "slowest_refusal_ms": r.slowest_refusal.as_secs_f64() * 1e3,
                       "recovery_ms": r.recovery.as_millis() as u64})
            })
            .collect();
        json!({
            "server": self.server,
            "rounds": rounds,
            "acknowledged_writes": self.acknowledged_writes,
            "lost_writes": self.lost_writes.len(),
            "reads": self.reads,
            "stale_reads": self.stale_reads.len(),
            "missing_audit_records": self.missing_audit_records.len(),
            "duplicate_lines": self.duplicate_lines,
            "dead_lettered": self.dead_lettered,
            "errors_within_budget": self.errors_within_budget(),
            "errors_past_budget": self.errors_past_budget(),
        })
    }
}

/// Prints the rounds as a Markdown table, one row per round, and the
/// run's totals (for the README's chaos table).
pub fn print_table(report: &Report) {
    println!(
        "| fault ({}) | errors within budget | past budget | refused at once (slowest) | recovery |",
        report.server
    );
    println!("|---|---:|---:|---:|---:|");
    for round in &report.rounds {
        println!(
            "| {} | {} | {} | {} ({:.0} ms) | {} |",
            round.fault.name(),
            round.errors_within_budget,
            round.errors_past_budget,
            round.refusals,
            round.slowest_refusal.as_secs_f64() * 1e3,
            if round.fault == Fault::RestartMasterEmpty {
                "none: the data is gone".to_owned()
            } else {
                format!("{:.2} s", round.recovery.as_secs_f64())
            }
        );
    }
    println!(
        "\n{} acknowledged writes: {} lost; {} reads: {} stale; {} audit records missing at the receiver",
        report.acknowledged_writes,
        report.lost_writes.len(),
        report.reads,
        report.stale_reads.len(),
        report.missing_audit_records.len()
    );
}

/// Prints a report's totals.
pub fn print_totals(report: &Report) {
    let recoveries: Vec<f64> = report
        .rounds
        .iter()
        .map(|r| r.recovery.as_secs_f64())
        .collect();
    let worst = recoveries.iter().copied().fold(0.0, f64::max);
    println!(
        "chaos on {}: {} rounds, {} acknowledged writes, {} lost, {} reads, {} stale, {} audit records missing, \
         {} duplicate lines, {} errors within the retry budget, {} past it, worst recovery {worst:.2} s",
        report.server,
        report.rounds.len(),
        report.acknowledged_writes,
        report.lost_writes.len(),
        report.reads,
        report.stale_reads.len(),
        report.missing_audit_records.len(),
        report.duplicate_lines,
        report.errors_within_budget(),
        report.errors_past_budget(),
    );
    if !report.dead_lettered.is_empty() {
        println!(
            "  dead-lettered by the offloaders: {:?}",
            report.dead_lettered
        );
    }
    for failure in &report.failures {
        println!("  failed: {failure}");
    }
    for lost in report.lost_writes.iter().take(10) {
        println!("  lost: {lost}");
    }
    for stale in report.stale_reads.iter().take(10) {
        println!("  stale read: {stale}");
    }
    for missing in report.missing_audit_records.iter().take(10) {
        println!("  audit missing: {missing}");
    }
}
