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
//! fields read into a map do). tenant-kv's audit records are such lines
//! too, one per entry: `ts`, then their fields sorted by name. JSON
//! strings escape line breaks, so the lines split on `\n`. The offloader
//! checks each line and passes it on to the sink as written, less its
//! `ts` ([`Parsed::line_without_ts`]): parsing a record into a map and
//! writing it again cost about ten allocations per record.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::record::Record;

/// A record's fields as read back, in the order written: borrowed from
/// the stream entry's reply (or the packed line) wherever nothing had to
/// be unescaped, so reading a record allocates little more than its list.
/// A repeated name counts with its last value.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    fields: Vec<(Text<'a>, Text<'a>)>,
    /// The packed line the fields were read from, if any.
    line: Option<&'a str>,
}

impl<'a> Parsed<'a> {
    /// A plain stream entry's fields.
    pub(crate) fn from_fields(fields: impl IntoIterator<Item = (Text<'a>, Text<'a>)>) -> Self {
        Self {
            fields: fields.into_iter().collect(),
            line: None,
        }
    }

    /// The value of `name` (its last, if repeated).
    pub(crate) fn get(&self, name: &str) -> Option<&Text<'a>> {
        self.fields
            .iter()
            .rev()
            .find(|(field, _)| field.as_str() == name)
            .map(|(_, value)| value)
    }

    /// Every field but `ts`, as a JSON object: a packed line as written
    /// (what follows its leading `ts`), which costs no serializing; else,
    /// or if a name repeats, the fields sorted by name, each once. Either
    /// way, the same record always gives the same bytes.
    pub(crate) fn line_without_ts(&self) -> String {
        if let Some(rest) = self.line.and_then(|line| self.after_leading_ts(line)) {
            let mut out = String::with_capacity(rest.len() + 1);
            out.push('{');
            out.push_str(rest);
            return out;
        }
        let fields = self.sorted_once();
        let size: usize = fields.iter().map(|(n, v)| n.0.len() + v.0.len() + 6).sum();
        let mut out = Vec::with_capacity(size + 2);
        let body = fields.iter().filter(|(name, _)| name.as_str() != "ts");
        // Strings always serialize.
        let _ = serde_json::Serializer::new(&mut out).collect_map(body.map(|(n, v)| (n, v)));
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// The fields sorted by name, each once, as the dead-letter stream
    /// keeps them.
    pub(crate) fn into_sorted(self) -> Vec<(String, String)> {
        self.sorted_once()
            .into_iter()
            .map(|(name, value)| (name.0.to_string(), value.0.to_string()))
            .collect()
    }

    /// References to the fields sorted by name, each once (its last value).
    fn sorted_once(&self) -> Vec<&(Text<'a>, Text<'a>)> {
        let mut sorted: Vec<&(Text<'a>, Text<'a>)> = self.fields.iter().collect();
        sorted.sort_by(|(a, _), (b, _)| a.cmp(b));
        let mut once: Vec<&(Text<'a>, Text<'a>)> = Vec::with_capacity(sorted.len());
        for field in sorted {
            match once.last_mut() {
                Some(last) if last.0 == field.0 => *last = field,
                _ => once.push(field),
            }
        }
        once
    }

    /// What follows `line`'s leading `"ts":"<digits>",` (from the `}` if
    /// `ts` is the only field), when `line` is shaped as [`encode`] writes
    /// (nothing after its `}`) and no name repeats.
    fn after_leading_ts<'l>(&self, line: &'l str) -> Option<&'l str> {
        let (first, ts) = self.fields.first()?;
        let digits = line.strip_prefix("{\"ts\":\"")?.strip_prefix(ts.as_str())?;
        let rest = digits.strip_prefix("\"")?;
        let rest = rest
            .strip_prefix(',')
            .or_else(|| rest.starts_with('}').then_some(rest))?;
        let plain = first.as_str() == "ts"
            && ts.as_str().bytes().all(|b| b.is_ascii_digit())
            && rest.ends_with('}');
        (plain && !self.repeats()).then_some(rest)
    }

    /// Whether a name appears twice.
    fn repeats(&self) -> bool {
        let fields = &self.fields;
        if fields.len() <= 16 {
            // A record's usual few fields: no allocation.
            return fields
                .iter()
                .enumerate()
                .any(|(i, (name, _))| fields[i + 1..].iter().any(|(other, _)| other == name));
        }
        let mut names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        names.windows(2).any(|pair| pair[0] == pair[1])
    }
}

/// A field name or value of a [`Parsed`] record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl Text<'_> {
    pub(crate) fn as_str(&self) -> &str {
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
    pair(out, "ts", itoa::Buffer::new().format(record.ts));
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

/// The records of a packed entry's `records` field, each with its
/// fields, or for a line that is no such object, the line and the reason.
pub(crate) fn decode(lines: &str) -> impl Iterator<Item = Result<Parsed<'_>, (String, String)>> {
    lines
        .split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let fields = match plain_object(line) {
                Some(fields) => fields,
                None => {
                    serde_json::from_str::<Pairs<'_>>(line)
                        .map_err(|e| (line.to_owned(), format!("not a packed record: {e}")))?
                        .0
                }
            };
            Ok(Parsed {
                fields,
                line: Some(line),
            })
        })
}

/// The pairs of a line as [`encode`] writes it when none of its strings
/// needed escaping (`{"name":"value",...}`: no whitespace between
/// tokens, no `\` and no control character in a string), borrowed from
/// it; `None` for any other line, which `serde_json` reads instead (or
/// refuses, if it is no object of strings).
///
/// Why: access logs and audit records seldom hold a character to escape,
/// and reading such a line this way takes less than half the
/// instructions `serde_json` takes (1.8k against 4.2k per record of a
/// `GET`'s two, counted by callgrind under `harness http`), which were
/// the offloader's largest cost per record.
fn plain_object(line: &str) -> Option<Vec<(Text<'_>, Text<'_>)>> {
    // One pass over the whole line, a fold without an early exit that the
    // compiler can vectorize; then each string ends at its next `"`.
    let escaped = line
        .bytes()
        .fold(false, |seen, b| seen | (b == b'\\') | (b < 0x20));
    if escaped {
        return None;
    }
    let mut rest = line.strip_prefix('{')?;
    let mut pairs = Vec::with_capacity(16);
    if rest == "}" {
        return Some(pairs);
    }
    loop {
        let (name, after) = plain_string(rest)?;
        let (value, after) = plain_string(after.strip_prefix(':')?)?;
        pairs.push((Text(Cow::Borrowed(name)), Text(Cow::Borrowed(value))));
        match after.strip_prefix(',') {
            Some(next) => rest = next,
            None => return (after == "}").then_some(pairs),
        }
    }
}

/// The leading JSON string of `text`, which holds no `\` and no control
/// character, and what follows it.
fn plain_string(text: &str) -> Option<(&str, &str)> {
    let body = text.strip_prefix('"')?;
    let end = body.bytes().position(|b| b == b'"')?;
    Some((&body[..end], &body[end + 1..]))
}

/// A JSON object of strings, its pairs in order.
struct Pairs<'a>(Vec<(Text<'a>, Text<'a>)>);

impl<'de> Deserialize<'de> for Pairs<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(pair) = map.next_entry()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(Object)
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;

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
        let field = |record: usize, name: &str| records[record].get(name).unwrap().as_str();
        assert_eq!(field(0, "message"), awkward);
        assert_eq!(field(0, "ts"), "1700000000123456789");
        assert_eq!(field(0, "level"), "info");
        assert_eq!(field(0, "target"), "access");
        assert_eq!(field(0, "tenant_id"), "acme");
        assert_eq!(field(1, "status"), "200");
        // Nothing to unescape: borrowed from the line.
        assert!(matches!(
            records[1].get("status").unwrap().0,
            Cow::Borrowed(_)
        ));
        assert_eq!(records[1].fields.len(), 4);
    }

    #[test]
    fn a_repeated_field_keeps_its_last_value() {
        let mut lines = Vec::new();
        encode(
            &record(&[("tenant_id", "span"), ("tenant_id", "event")]),
            &mut lines,
        );
        let decoded: Vec<_> = decode(std::str::from_utf8(&lines).unwrap()).collect();
        let first = decoded[0].as_ref().unwrap();
        assert_eq!(first.get("tenant_id").unwrap().as_str(), "event");
        // Passed on once, with its last value, among the others sorted.
        assert_eq!(
            first.line_without_ts(),
            r#"{"level":"info","target":"access","tenant_id":"event"}"#
        );

        // Many fields, one name twice: found as well.
        // (Field names are `'static`, as `tracing`'s are.)
        let mut fields: Vec<(&'static str, &str)> = (0..20)
            .map(|i| (&*format!("f{i:02}").leak(), "x"))
            .collect();
        fields.push(("f07", "last"));
        let mut lines = Vec::new();
        encode(&record(&fields), &mut lines);
        let record = decode(std::str::from_utf8(&lines).unwrap())
            .next()
            .unwrap()
            .unwrap();
        let line: serde_json::Value = serde_json::from_str(&record.line_without_ts()).unwrap();
        assert_eq!(line["f07"], "last");
        assert_eq!(
            line.as_object().unwrap().len(),
            22,
            "level, target and 20 names"
        );
    }

    #[test]
    fn a_line_as_written_is_passed_on_but_its_ts() {
        let mut lines = Vec::new();
        encode(
            &record(&[("message", "a \"b\"\n"), ("status", "200")]),
            &mut lines,
        );
        encode(&record(&[]), &mut lines);
        let text = std::str::from_utf8(&lines).unwrap();
        let records: Vec<_> = decode(text).collect::<Result<_, _>>().unwrap();
        let first = records[0].line_without_ts();
        assert_eq!(
            first,
            r#"{"level":"info","target":"access","message":"a \"b\"\n","status":"200"}"#
        );
        assert!(text.starts_with(r#"{"ts":"1700000000123456789","#));
        assert!(text.lines().next().unwrap().ends_with(&first[1..]));
        assert_eq!(
            records[1].line_without_ts(),
            r#"{"level":"info","target":"access"}"#
        );
        // Other shapes are serialized, sorted: the same bytes every time.
        for (line, expected) in [
            (r#"{"ts":"5"}"#, "{}"),
            (r#"{"b":"1","ts":"5","a":"2"}"#, r#"{"a":"2","b":"1"}"#),
            (r#"{"ts":"05x","a":"1"}"#, r#"{"a":"1"}"#),
            (r#"{ "ts":"5","a":"1"}"#, r#"{"a":"1"}"#),
            ("{\"ts\":\"5\",\"a\":\"1\"}\r", r#"{"a":"1"}"#),
            (r#"{"ts":"5","a":"1"} "#, r#"{"a":"1"}"#),
        ] {
            let record = decode(line).next().unwrap().unwrap();
            assert_eq!(record.line_without_ts(), expected, "{line}");
        }
    }

    #[test]
    fn a_plain_entry_is_sorted_by_name() {
        let text = |s: &'static str| Text(Cow::Borrowed(s));
        let record = Parsed::from_fields([
            (text("ts"), text("9")),
            (text("z"), text("1")),
            (text("a"), text("2")),
        ]);
        assert_eq!(record.line_without_ts(), r#"{"a":"2","z":"1"}"#);
        assert_eq!(
            record.into_sorted(),
            [("a", "2"), ("ts", "9"), ("z", "1")].map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
    }

    /// What `serde_json` reads from `line`, as `decode` did before
    /// [`plain_object`].
    fn by_serde(line: &str) -> Option<Vec<(Text<'_>, Text<'_>)>> {
        serde_json::from_str::<Pairs<'_>>(line).ok().map(|p| p.0)
    }

    #[test]
    fn plain_lines_are_read_without_serde_json_and_others_with_it() {
        let text = |s: &'static str| Text(Cow::Borrowed(s));
        assert_eq!(
            plain_object(r#"{"ts":"1","a":"","b":"x y"}"#),
            Some(vec![
                (text("ts"), text("1")),
                (text("a"), text("")),
                (text("b"), text("x y"))
            ])
        );
        assert_eq!(plain_object("{}"), Some(vec![]));
        for other in [
            r#"{"a":"b\"c"}"#,
            "{\"a\":\"b\tc\"}",
            r#"{ "a":"b"}"#,
            r#"{"a": "b"}"#,
            r#"{"a":"b"} "#,
            r#"{"a":"b",}"#,
            r#"{"a":1}"#,
            r#"{"a":"b""#,
            r#"{"a"}"#,
            "",
        ] {
            assert_eq!(plain_object(other), None, "{other}");
        }
        // The same records either way, escaped or not.
        let decoded: Vec<_> = decode("{\"a\":\"b\\\"c\"}\n{\"a\":\"b\"}\n").collect();
        assert_eq!(
            decoded[0].as_ref().unwrap().get("a").unwrap().as_str(),
            "b\"c"
        );
        assert_eq!(decoded[1].as_ref().unwrap().get("a").unwrap().as_str(), "b");
    }

    proptest! {
        /// Whatever `plain_object` reads, `serde_json` reads alike; and a
        /// line of plain strings as `encode` writes it is read plainly.
        #[test]
        fn plain_lines_read_as_serde_json_reads_them(
            fields in vec((
                "[a-z\"\\\\\n\t\u{7f}\u{2028} é]{0,5}",
                "[a-z\"\\\\\n\t\u{7f}\u{2028} é:,{}]{0,8}",
            ), 0..5),
            junk in "[ {}\":,\\\\a\n\té]?",
            at in any::<Index>(),
        ) {
            let mut line = b"{".to_vec();
            for (i, (name, value)) in fields.iter().enumerate() {
                if i > 0 {
                    line.push(b',');
                }
                pair(&mut line, name, value);
            }
            line.push(b'}');
            let line = String::from_utf8(line).unwrap();
            let plain = fields
                .iter()
                .all(|(n, v)| !format!("{n}{v}").contains(['"', '\\', '\n', '\t']));
            prop_assert_eq!(plain_object(&line).is_some(), plain);
            // With one more character somewhere, perhaps no JSON at all.
            let boundaries: Vec<usize> = line
                .char_indices()
                .map(|(i, _)| i)
                .chain([line.len()])
                .collect();
            let mut changed = line.clone();
            changed.insert_str(boundaries[at.index(boundaries.len())], &junk);
            for line in [&line, &changed] {
                if let Some(fields) = plain_object(line) {
                    prop_assert_eq!(Some(fields), by_serde(line));
                }
            }
        }
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
