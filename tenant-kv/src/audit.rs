//! Audit records: how they are stored in a tenant's audit stream
//! (`tenant:{<id>}:audit`), and how to read them back.
//!
//! A record is a line in a stream entry's one field, `records`: a JSON
//! object of strings, `ts` (nanoseconds since the Unix epoch) first, then
//! `action`, `actor`, `key`, `tenant` and, as they apply, `size`,
//! `suppressed` and `version`, sorted by name. This is the layout of
//! log-buffer's packed entries, whose offloader ships each line as
//! written; the line is the one a record of separate fields would ship
//! as. An entry holds one record, or, with
//! [`TenantKvBuilder::stage_audit_records`](crate::TenantKvBuilder::stage_audit_records),
//! the records of up to 64 item writes, a line each, staged first on the
//! stream's staging list (`tenant:{<id>}:audit:staged`, a line per
//! element) until log-buffer's offloader or the 64th record moves them.
//!
//! Why one field: reading a record (Redis's `XRANGE` or `XREADGROUP`, and
//! a reader's reply value per name and per value) is paid per field, and
//! a write's record had seven; writing the line costs Redis about what the
//! fields saved. The scripts write records the same way (`audit_add` and
//! `audit_stage` in `lua/common.lua`).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::keys::{TenantId, TenantKeys};
use crate::store::{Actor, Settings};

/// The field of an audit stream entry that holds its records.
const RECORDS_FIELD: &str = "records";

/// The audit records held by a stream entry of a tenant's audit stream,
/// given the entry's fields: one per line of its `records` field, or, for
/// an entry written before records were packed, the entry's own fields.
/// A line staged on the staging list reads as an entry whose `records`
/// field is that line. `None` if a line is no JSON object of strings.
///
/// ```
/// use std::collections::HashMap;
///
/// let entry = HashMap::from([(
///     "records".to_owned(),
///     concat!(
///         r#"{"ts":"1","action":"create_key","actor":"user:alice","key":"k"}"#,
///         "\n",
///         r#"{"ts":"2","action":"delete_key","actor":"user:alice","key":"k"}"#,
///     )
///     .to_owned(),
/// )]);
/// let records = tenant_kv::audit_records(entry).unwrap();
/// assert_eq!(records.len(), 2);
/// assert_eq!(records[0]["action"], "create_key");
/// assert_eq!(records[1]["key"], "k");
/// ```
pub fn audit_records(mut entry: HashMap<String, String>) -> Option<Vec<HashMap<String, String>>> {
    match entry.remove(RECORDS_FIELD) {
        Some(lines) => lines
            .split('\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_str(line).ok())
            .collect(),
        None => Some(vec![entry]),
    }
}

/// An audit record of something done outside the item scripts (logins,
/// users, API keys), to send alone or inside a transaction with the change.
pub(crate) fn audit_record(
    settings: &Settings,
    tenant: &TenantId,
    actor: &Actor,
    action: &str,
    subject: &str,
) -> redis::Cmd {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let fields = [
        ("action", action),
        ("actor", actor.as_str()),
        ("key", subject),
        ("tenant", tenant.as_str()),
    ];
    let mut command = redis::cmd("XADD");
    command
        .arg(TenantKeys::new(tenant).audit())
        .arg("MAXLEN")
        .arg("~")
        .arg(settings.audit_max_len)
        .arg("*")
        .arg(RECORDS_FIELD)
        .arg(line(ns, &fields));
    command
}

/// A record's line: `ts`, then `fields`, whose names are in order.
fn line(ns: u128, fields: &[(&str, &str)]) -> String {
    let mut line = format!("{{\"ts\":\"{ns}\"");
    for (name, value) in fields {
        line.push_str(",\"");
        line.push_str(name);
        line.push_str("\":");
        line.push_str(&serde_json::Value::from(*value).to_string());
    }
    line.push('}');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_a_json_object_of_strings_ts_first() {
        let fields = [("action", "create_key"), ("key", "a\"b\\c\u{1}é")];
        let line = line(17, &fields);
        assert_eq!(
            line,
            r#"{"ts":"17","action":"create_key","key":"a\"b\\c\u0001é"}"#
        );
        let entry = HashMap::from([("records".to_owned(), line)]);
        let record = audit_records(entry).unwrap().remove(0);
        assert_eq!(record.len(), 3);
        assert_eq!(record["key"], "a\"b\\c\u{1}é");
    }

    #[test]
    fn an_entry_of_separate_fields_reads_as_they_are() {
        let entry = HashMap::from([("action".to_owned(), "delete_key".to_owned())]);
        assert_eq!(audit_records(entry.clone()), Some(vec![entry]));
        let broken = HashMap::from([("records".to_owned(), "{\"ts\":1}".to_owned())]);
        assert_eq!(audit_records(broken), None);
    }
}
