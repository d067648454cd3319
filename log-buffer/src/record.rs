//! Records, tenants, and the Redis streams that buffer them.
//!
//! A buffered record is flat string fields: `ts` (the nanoseconds since
//! the Unix epoch when the event happened), then any others (`level`,
//! `target`, `message` and the event's own fields for logs; `actor`,
//! `action`, `key`, ... for tenant-kv's audit records, one packed stream
//! entry each). The log buffer packs several records to an entry
//! (`packed.rs`); an entry may also hold one record as its fields. Logs
//! of tenant `<id>` go to the stream `tenant:{<id>}:logs`: like every key of
//! a tenant in tenant-kv's storage layout 2, under the Redis Cluster hash
//! tag `{<id>}`, so a tenant's streams share the slot of its other keys.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Error;

/// The longest tenant id, in bytes.
pub const MAX_TENANT_LEN: usize = 64;

/// Whether `tenant` is a valid tenant id: 1 to 64 ASCII letters, digits,
/// `_` or `-` (the same rule as tenant-kv's, and within what Loki accepts
/// in `X-Scope-OrgID`).
pub fn is_valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_LEN
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub(crate) fn check_tenant(setting: &'static str, tenant: &str) -> Result<(), Error> {
    if is_valid_tenant(tenant) {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            setting,
            reason: format!(
                "{tenant:?} is not a tenant id (1 to {MAX_TENANT_LEN} ASCII letters, digits, '_' or '-')"
            ),
        })
    }
}

/// The stream buffering `tenant`'s logs: `tenant:{<id>}:logs`.
pub fn log_stream(tenant: &str) -> String {
    format!("tenant:{{{tenant}}}:logs")
}

/// A `SCAN MATCH` pattern for every tenant's stream `tenant:{<id>}:<suffix>`
/// (and keys that only look like one, which [`tenant_of_stream`] tells
/// apart). The braces are no glob characters; the suffix is escaped.
pub(crate) fn streams_pattern(suffix: &str) -> String {
    let mut pattern = String::from("tenant:{*}:");
    for c in suffix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern
}

/// The dead-letter stream of `stream`: entries that cannot be delivered,
/// with the reason, kept for inspection and never resent.
pub fn dead_letter_stream(stream: &str) -> String {
    format!("{stream}:dead-letter")
}

/// The staging list of `stream`: lines of records a writer appends one
/// at a time (a Lua script writing one record per call) and so cannot
/// pack itself. Each element is one record's line in the packed layout
/// (a JSON object of strings, `ts` first); the offloader moves a
/// stream's staged lines into packed entries of up to 64 records before
/// each read of the stream, in the read's transaction. The writer keeps
/// the list short by moving its lines into one entry itself once it
/// holds 64, and makes the stream if there is none yet (the offloader
/// finds streams, not lists). In the stream's slot, as its name starts
/// with the stream's.
///
/// ```
/// assert_eq!(
///     log_buffer::staging_list("tenant:{acme}:audit"),
///     "tenant:{acme}:audit:staged"
/// );
/// ```
pub fn staging_list(stream: &str) -> String {
    format!("{stream}:staged")
}

/// The tenant of a stream named `tenant:{<id>}:<suffix>`.
pub(crate) fn tenant_of_stream(stream: &str, suffix: &str) -> Option<String> {
    let id = stream
        .strip_prefix("tenant:{")?
        .strip_suffix(suffix)?
        .strip_suffix("}:")?;
    is_valid_tenant(id).then(|| id.to_owned())
}

/// Nanoseconds since the Unix epoch, now.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One log record on its way to Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    /// When the event happened, in nanoseconds since the Unix epoch.
    pub(crate) ts: u64,
    pub(crate) level: &'static str,
    pub(crate) target: &'static str,
    /// The spans' fields, then the event's.
    pub(crate) fields: Fields,
}

impl Record {
    /// The record's tenant: its last `tenant_id` field (the event's own
    /// wins over a span's) if that is a valid tenant, else `default`.
    pub(crate) fn tenant<'a>(&'a self, default: &'a str) -> &'a str {
        self.fields
            .iter()
            .rev()
            .find(|(name, _)| *name == "tenant_id")
            .map(|(_, value)| value)
            .filter(|tenant| is_valid_tenant(tenant))
            .unwrap_or(default)
    }
}

/// How large a record's values may get: each field, and all together
/// (every value past the whole's limit is cut to what is left).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Caps {
    pub(crate) field: usize,
    pub(crate) record: usize,
}

/// Appends to a string up to `room` bytes (whole characters), and counts
/// the bytes past it.
pub(crate) struct Bounded<'a> {
    text: &'a mut String,
    room: usize,
    dropped: usize,
}

impl std::fmt::Write for Bounded<'_> {
    fn write_str(&mut self, piece: &str) -> std::fmt::Result {
        let mut fits = piece.len().min(self.room);
        while !piece.is_char_boundary(fits) {
            fits -= 1;
        }
        self.text.push_str(&piece[..fits]);
        self.room -= fits;
        self.dropped += piece.len() - fits;
        Ok(())
    }
}

/// Field names and values, the values packed in one string: two
/// allocations for a whole event, freed on the append task's thread.
/// Values over the [`Caps`] are cut, with a marker saying how much went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fields {
    text: String,
    /// Each field's name and its value's byte range in `text`.
    entries: Vec<(&'static str, usize, usize)>,
    caps: Caps,
}

impl Fields {
    pub(crate) fn with_capacity(fields: usize, bytes: usize, caps: Caps) -> Self {
        Self {
            text: String::with_capacity(bytes),
            entries: Vec::with_capacity(fields),
            caps,
        }
    }

    pub(crate) fn push_str(&mut self, name: &'static str, value: &str) {
        self.push(name, |bounded| bounded.write_str(value));
    }

    pub(crate) fn push_debug(&mut self, name: &'static str, value: &dyn std::fmt::Debug) {
        self.push(name, |bounded| write!(bounded, "{value:?}"));
    }

    /// Adds a field whose value `write` writes, cut to the caps with a
    /// marker saying how much went. What is past the caps is counted, never
    /// stored, so a huge value costs no memory. The record's cap spares
    /// `tenant_id`: cut, it would send the record to another tenant.
    fn push(
        &mut self,
        name: &'static str,
        write: impl FnOnce(&mut Bounded<'_>) -> std::fmt::Result,
    ) {
        let start = self.text.len();
        let mut allowed = self.caps.field;
        if name != "tenant_id" {
            allowed = allowed.min(self.caps.record.saturating_sub(start));
        }
        let mut bounded = Bounded {
            text: &mut self.text,
            room: allowed,
            dropped: 0,
        };
        let _ = write(&mut bounded);
        let dropped = bounded.dropped;
        if dropped > 0 {
            let written = self.text.len() - start;
            // Room for the marker with the most it could say.
            let marker_room = format!("…[cut {} bytes]", dropped + written).len();
            let mut keep = start + allowed.saturating_sub(marker_room);
            while !self.text.is_char_boundary(keep) {
                keep -= 1;
            }
            let cut = dropped + (start + written - keep);
            self.text.truncate(keep);
            let _ = write!(self.text, "…[cut {cut} bytes]");
        }
        self.entries.push((name, start, self.text.len()));
    }

    pub(crate) fn extend_from(&mut self, other: &Fields) {
        for (name, value) in other.iter() {
            self.push_str(name, value);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn get(&self, index: usize) -> (&'static str, &str) {
        let (name, start, end) = self.entries[index];
        (name, &self.text[start..end])
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = (&'static str, &str)> + '_ {
        (0..self.len()).map(|index| self.get(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_name_their_tenant() {
        assert_eq!(
            tenant_of_stream(&log_stream("acme"), "logs").as_deref(),
            Some("acme")
        );
        assert_eq!(log_stream("acme"), "tenant:{acme}:logs");
        assert_eq!(
            tenant_of_stream("tenant:{acme}:audit", "audit").as_deref(),
            Some("acme")
        );
        assert_eq!(tenant_of_stream("tenant:{a}:data:x}:logs", "logs"), None);
        assert_eq!(tenant_of_stream("tenant:{a}:data:x:logs", "logs"), None);
        assert_eq!(tenant_of_stream("tenant:{}:logs", "logs"), None);
        assert_eq!(
            tenant_of_stream("tenant:{acme}:logs:dead-letter", "logs"),
            None
        );
        assert_eq!(tenant_of_stream("tenant:{acme}logs", "logs"), None);
        // Layout 1's names are no stream of this version's.
        assert_eq!(tenant_of_stream("tenant:acme:logs", "logs"), None);
        assert_eq!(streams_pattern("audit"), "tenant:{*}:audit");
        assert_eq!(streams_pattern("a*[b]"), "tenant:{*}:a\\*\\[b\\]");
    }

    #[test]
    fn values_are_cut_to_the_caps_with_a_marker() {
        let caps = Caps {
            field: 40,
            record: 100,
        };
        let mut fields = Fields::with_capacity(4, 64, caps);
        fields.push_str("short", "fits");
        fields.push_str("long", &"é".repeat(100));
        fields.push_debug("debug", &"x".repeat(1000));
        fields.push_str("late", &"y".repeat(30));
        let values: Vec<(&str, &str)> = fields.iter().collect();
        assert_eq!(values[0], ("short", "fits"));
        // What is kept and what the marker says was cut make the whole.
        let whole = |value: &str| {
            let (kept, marker) = value.split_once("…[cut ").expect("a marker");
            let cut: usize = marker.trim_end_matches(" bytes]").parse().unwrap();
            assert!(value.len() <= 40, "{value}");
            kept.len() + cut
        };
        assert_eq!(whole(values[1].1), 200);
        assert!(values[1].1.starts_with('é'));
        assert_eq!(whole(values[2].1), 1002);
        // The record's cap leaves the last field little or nothing.
        let total: usize = values.iter().map(|(_, v)| v.len()).sum();
        assert!(
            total <= 100 + "…[cut 30 bytes]".len(),
            "{total}: {values:?}"
        );
        let mut copy = Fields::with_capacity(4, 64, caps);
        copy.extend_from(&fields);
        assert_eq!(copy.iter().count(), 4);
        // The record's cap spares the tenant: cut, it would name another.
        let mut full = Fields::with_capacity(2, 64, caps);
        full.push_str("message", &"m".repeat(200));
        full.push_str("tenant_id", "acme");
        assert_eq!(full.get(1), ("tenant_id", "acme"));
    }

    #[test]
    fn tenant_ids_are_checked() {
        assert!(is_valid_tenant("tenant-1_A"));
        assert!(!is_valid_tenant(""));
        assert!(!is_valid_tenant("a:b"));
        assert!(!is_valid_tenant("a|b"));
        assert!(!is_valid_tenant(&"a".repeat(65)));
    }
}
