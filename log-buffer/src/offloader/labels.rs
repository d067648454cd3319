//! The Loki labels of one delivery's records, built once per distinct set.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Label names and values.
pub(super) type Labels = BTreeMap<String, String>;

/// The most label sets one delivery keeps to share: records of further
/// sets (label fields of many values, which Loki advises against) get
/// labels of their own rather than a longer search.
const MAX_SETS: usize = 64;

/// The label sets of one delivery: one stream, so one job and tenant.
/// Records with the same values of the label fields share one set, so a
/// record costs a lookup rather than a map of new strings.
pub(super) struct LabelSets<'a> {
    job: &'a str,
    tenant: &'a str,
    names: &'a [String],
    known: Vec<(Vec<Option<String>>, Arc<Labels>)>,
}

impl<'a> LabelSets<'a> {
    /// Sets of `job`, `tenant_id` and the label fields `names`.
    pub(super) fn new(job: &'a str, tenant: &'a str, names: &'a [String]) -> Self {
        Self {
            job,
            tenant,
            names,
            known: Vec::new(),
        }
    }

    /// The labels of a record whose label fields hold `values`, in the
    /// order of the names (`None`: the record has no such field).
    pub(super) fn get(&mut self, values: &[Option<&str>]) -> Arc<Labels> {
        let same = |known: &[Option<String>]| {
            known
                .iter()
                .map(Option::as_deref)
                .eq(values.iter().copied())
        };
        if let Some((_, labels)) = self.known.iter().find(|(known, _)| same(known)) {
            return Arc::clone(labels);
        }
        let mut labels = Labels::from([
            ("job".to_owned(), self.job.to_owned()),
            ("tenant_id".to_owned(), self.tenant.to_owned()),
        ]);
        for (name, value) in self.names.iter().zip(values) {
            if let Some(value) = value {
                labels.insert(name.clone(), (*value).to_owned());
            }
        }
        let labels = Arc::new(labels);
        if self.known.len() < MAX_SETS {
            let key = values.iter().map(|v| v.map(str::to_owned)).collect();
            self.known.push((key, Arc::clone(&labels)));
        }
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_the_same_label_values_share_one_set() {
        let names = ["level".to_owned(), "action".to_owned()];
        let mut sets = LabelSets::new("audit_logs", "acme", &names);
        let read = sets.get(&[None, Some("read_key")]);
        assert!(Arc::ptr_eq(&read, &sets.get(&[None, Some("read_key")])));
        let info = sets.get(&[Some("info"), None]);
        assert!(!Arc::ptr_eq(&read, &info));
        assert_eq!(
            *read,
            Labels::from([
                ("job".to_owned(), "audit_logs".to_owned()),
                ("tenant_id".to_owned(), "acme".to_owned()),
                ("action".to_owned(), "read_key".to_owned()),
            ])
        );
        for n in 0..2 * MAX_SETS {
            let action = n.to_string();
            assert_eq!(sets.get(&[None, Some(&action)])["action"], action);
        }
        assert_eq!(sets.known.len(), MAX_SETS);
    }
}
