//! Audit records: how they are stored in a tenant's audit stream
//! (`tenant:{<id>}:audit`), and how to read one back.
//!
//! A record is a stream entry of one field, `records`, holding a JSON
//! object of strings on one line: `ts` (nanoseconds since the Unix epoch)
//! first, then `action`, `actor`, `key`, `tenant` and, as they apply,
//! `size`, `suppressed` and `version`, sorted by name. This is the layout
//! of log-buffer's packed entries, whose offloader ships the line as
//! written; the line is the one a record of separate fields would ship as.
//!
//! Why one field: reading a record (Redis's `XRANGE` or `XREADGROUP`, and
//! a reader's reply value per name and per value) is paid per field, and
//! a write's record had seven; writing the line costs Redis about what the
//! fields saved. The scripts write records the same way (`audit_add` in
//! `lua/common.lua`).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::keys::{TenantId, TenantKeys};
use crate::store::{Actor, Settings};

/// The field of an audit stream entry that holds its record.
const RECORDS_FIELD: &str = "records";

/// The fields of the audit record held by a stream entry of a tenant's
/// audit stream, given the entry's fields: the record packed in its
/// `records` field, or, for an entry written before records were packed,
/// the entry's own fields. `None` if the `records` field is no JSON object
/// of strings.
///
/// ```
/// use std::collections::HashMap;
///
/// let entry = HashMap::from([(
///     "records".to_owned(),
///     r#"{"ts":"1","action":"create_key","actor":"user:alice","key":"k"}"#.to_owned(),
/// )]);
/// let record = tenant_kv::audit_fields(entry).unwrap();
/// assert_eq!(record["action"], "create_key");
/// assert_eq!(record["key"], "k");
/// ```
pub fn audit_fields(mut entry: HashMap<String, String>) -> Option<HashMap<String, String>> {
    match entry.remove(RECORDS_FIELD) {
        Some(line) => serde_json::from_str(&line).ok(),
        None => Some(entry),
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
        let record = audit_fields(entry).unwrap();
        assert_eq!(record.len(), 3);
        assert_eq!(record["key"], "a\"b\\c\u{1}é");
    }

    #[test]
    fn an_entry_of_separate_fields_reads_as_they_are() {
        let entry = HashMap::from([("action".to_owned(), "delete_key".to_owned())]);
        assert_eq!(audit_fields(entry.clone()), Some(entry));
        let broken = HashMap::from([("records".to_owned(), "{\"ts\":1}".to_owned())]);
        assert_eq!(audit_fields(broken), None);
    }
}
