//! Packed stream entries: several records of one tenant in one stream
//! entry, as lines of JSON in its `records` field.
//!
//! Why: Redis's cost is per entry, not per byte. Appending, replicating to
//! every replica, reading (`XREADGROUP`), acknowledging and deleting
//! (`XACK`, `XDEL` as the offloader then did) one entry per record cost
//! the master about 7 µs per record, most of a logged request's cost, and
//! parsing one reply value per field cost the offloader as much again.
//! One entry carrying up to [`MAX_RECORDS`] records divides all of it by
//! the records packed.
//!
//! A line is a JSON object of string values: `ts` (nanoseconds since the
//! Unix epoch), `level`, `target`, then the spans' and the event's fields
//! in order (a repeated name keeps its last value, as a stream entry's
//! fields read into a map do). JSON strings escape line breaks, so the
//! lines split on `\n`.

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::record::Record;

/// A record's fields as read back: borrowed from the stream entry's reply
/// (or the packed line) wherever nothing had to be unescaped, so reading a
/// record allocates little more than its map.
pub(crate) type Parsed<'a> = BTreeMap<Text<'a>, Text<'a>>;

/// A field name or value of a [`Parsed`] record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl Text<'_> {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Text<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Serialize for Text<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Strings;
        impl<'de> Visitor<'de> for Strings {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }
            fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(Strings)
    }
}

/// The field holding a packed entry's records.
pub(crate) const RECORDS_FIELD: &str = "records";
/// The most records in one entry: an offloader's read of a few hundred
/// entries stays a few megabytes, and a push to Loki a few thousand lines.
pub(crate) const MAX_RECORDS: usize = 64;
/// An entry takes no more records once its lines reach this many bytes
/// (one record of up to the record cap may end past it).
pub(crate) const MAX_BYTES: usize = 64 * 1024;

/// Appends `record`'s line, with its final `\n`, to `out`.
pub(crate) fn encode(record: &Record, out: &mut Vec<u8>) {
    out.push(b'{');
    pair(out, "ts", &record.ts.to_string());
    out.push(b',');
    pair(out, "level", record.level);
    out.push(b',');
    pair(out, "target", record.target);
    for (name, value) in record.fields.iter() {
        out.push(b',');
        pair(out, name, value);
    }
    out.extend_from_slice(b"}\n");
}

fn pair(out: &mut Vec<u8>, name: &str, value: &str) {
    // Writing a `&str` to a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, name);
    out.push(b':');
    let _ = serde_json::to_writer(&mut *out, value);
}

/// The records of a packed entry's `records` field, each a map of its
/// fields, or for a line that is no such object, the line and the reason.
pub(crate) fn decode(lines: &str) -> impl Iterator<Item = Result<Parsed<'_>, (String, String)>> {
    lines
        .split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .map_err(|error| (line.to_owned(), format!("not a packed record: {error}")))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Caps, Fields};

    fn record(fields: &[(&'static str, &str)]) -> Record {
        let caps = Caps {
            field: 2048,
            record: 32 * 1024,
        };
        let mut packed = Fields::with_capacity(fields.len(), 64, caps);
        for (name, value) in fields {
            packed.push_str(name, value);
        }
        Record {
            ts: 1_700_000_000_123_456_789,
            level: "info",
            target: "access",
            fields: packed,
        }
    }

    #[test]
    fn records_come_back_as_written() {
        let awkward = "line\nbreak \"quoted\" \\ tab\t é \u{1}";
        let mut lines = Vec::new();
        encode(
            &record(&[("message", awkward), ("tenant_id", "acme")]),
            &mut lines,
        );
        encode(&record(&[("status", "200")]), &mut lines);
        let lines = String::from_utf8(lines).unwrap();
        assert_eq!(lines.matches('\n').count(), 2, "{lines}");
        let records: Vec<_> = decode(&lines).collect::<Result<_, _>>().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["message"].as_str(), awkward);
        assert_eq!(records[0]["ts"].as_str(), "1700000000123456789");
        assert_eq!(records[0]["level"].as_str(), "info");
        assert_eq!(records[0]["target"].as_str(), "access");
        assert_eq!(records[0]["tenant_id"].as_str(), "acme");
        assert_eq!(records[1]["status"].as_str(), "200");
        // Nothing to unescape: borrowed from the line.
        assert!(matches!(records[1]["status"].0, Cow::Borrowed(_)));
        assert_eq!(records[1].len(), 4);
    }

    #[test]
    fn a_repeated_field_keeps_its_last_value() {
        let mut lines = Vec::new();
        encode(
            &record(&[("tenant_id", "span"), ("tenant_id", "event")]),
            &mut lines,
        );
        let decoded: Vec<_> = decode(std::str::from_utf8(&lines).unwrap()).collect();
        assert_eq!(decoded[0].as_ref().unwrap()["tenant_id"].as_str(), "event");
    }

    #[test]
    fn a_line_that_is_no_record_is_named() {
        let decoded: Vec<_> = decode("{\"ts\":\"1\"}\nnot json\n{\"n\":1}\n").collect();
        assert!(decoded[0].is_ok());
        let (line, reason) = decoded[1].as_ref().unwrap_err();
        assert_eq!(line, "not json");
        assert!(reason.contains("not a packed record"), "{reason}");
        // Values are strings, as a stream entry's are.
        assert!(decoded[2].is_err());
    }
}
