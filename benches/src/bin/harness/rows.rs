//! The interleaved comparisons' rows: each group of variants measured,
//! printed with ratios to its baseline, and `BENCH_ONLY`'s selection.

use benches::{Settings, Variant, compare_observing, report};
use serde_json::{Value, json};

/// The throughput of the variant whose name starts with `of` over that of
/// the one starting with `to`, from `groups`' rows; `None` if either did
/// not run (see `BENCH_ONLY`) or `to` did nothing.
pub(crate) fn ratio(rows: &[Value], of: &str, to: &str) -> Option<f64> {
    let ops = |name: &str| {
        rows.iter()
            .find(|row| row["variant"].as_str().is_some_and(|v| v.starts_with(name)))
            .and_then(|row| row["ops_per_sec"].as_f64())
    };
    let to = ops(to).filter(|ops| *ops > 0.0)?;
    Some(ops(of)? / to)
}

/// A ratio as the scenarios print it: two decimals, or `n/a`.
pub(crate) fn shown(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "n/a".to_owned(), |ratio| format!("{ratio:.2}"))
}

/// Runs each group of variants at `tasks` concurrency, the first of each
/// the baseline, and prints and returns rows with ratios to it, and the
/// CPU time per operation of this process and of it with the processes
/// `others`. With `BENCH_ONLY` set, only the variants it names run (see
/// [`selected`]).
pub(crate) async fn groups(
    groups: &[&[Variant]],
    tasks: usize,
    settings: Settings,
    others: &[u32],
) -> Vec<Value> {
    let only = std::env::var("BENCH_ONLY").ok();
    let mut rows = Vec::new();
    for variants in groups {
        let variants: Vec<Variant> = variants
            .iter()
            .filter(|variant| selected(only.as_deref(), &variant.name))
            .cloned()
            .collect();
        if variants.is_empty() {
            continue;
        }
        let measurements = compare_observing(&variants, tasks, settings, others).await;
        print!("{}", report(&variants, tasks, &measurements));
        let base = measurements[0].ops_per_sec();
        println!("  (ratios to {})", variants[0].name);
        for (variant, m) in variants.iter().zip(&measurements) {
            rows.push(json!({
                "tasks": tasks,
                "variant": variant.name,
                "ops_per_sec": m.ops_per_sec(),
                "ratio_to_baseline": m.ops_per_sec() / base,
                "baseline": variants[0].name,
                "p50_us": m.percentile(0.50).as_micros(),
                "p99_us": m.percentile(0.99).as_micros(),
                "errors": m.errors,
                "harness_cpu_us_per_op": m.own_cpu_us_per_op(),
                "all_cpu_us_per_op": m.all_cpu_us_per_op(),
                "settled_in_ms": m.settled_in().map(|d| d.as_secs_f64() * 1e3),
            }));
        }
    }
    rows
}

/// Whether `only` (name prefixes separated by commas, such as `(b),(c)`;
/// `None`: every variant) names `name`, to profile one variant alone.
fn selected(only: Option<&str>, name: &str) -> bool {
    only.is_none_or(|only| {
        only.split(',')
            .map(str::trim)
            .any(|prefix| !prefix.is_empty() && name.starts_with(prefix))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{ratio, selected, shown};

    #[test]
    fn bench_only_names_variants_by_prefix() {
        assert!(selected(None, "(a) raw"));
        assert!(selected(Some("(b), (c)"), "(c) put"));
        assert!(!selected(Some("(b),(c)"), "(a) raw"));
        // An empty prefix (a trailing comma) names nothing.
        assert!(!selected(Some("(b),"), "(a) raw"));
    }

    #[test]
    fn a_ratio_needs_both_variants_and_a_baseline_that_did_something() {
        let rows = [
            json!({"variant": "(a) raw", "ops_per_sec": 200.0}),
            json!({"variant": "(b) server", "ops_per_sec": 50.0}),
            json!({"variant": "(c) idle", "ops_per_sec": 0.0}),
        ];
        assert_eq!(ratio(&rows, "(b)", "(a)"), Some(0.25));
        assert_eq!(ratio(&rows, "(c)", "(a)"), Some(0.0));
        assert_eq!(ratio(&rows, "(b)", "(c)"), None);
        assert_eq!(ratio(&rows, "(d)", "(a)"), None);
        assert_eq!(ratio(&rows, "(b)", "(d)"), None);
        assert_eq!(shown(ratio(&rows, "(b)", "(a)")), "0.25");
        assert_eq!(shown(None), "n/a");
    }
}
