//! Where offloaded records go: the [`LogSink`] seam, and a file sink.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// One tenant's batch, as pushed to a sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    /// The tenant (Loki's `X-Scope-OrgID`).
    pub tenant: String,
    /// One stream per label set.
    pub streams: Vec<Stream>,
}

impl Push {
    /// How many entries the push holds.
    pub fn len(&self) -> usize {
        self.streams.iter().map(|s| s.entries.len()).sum()
    }

    /// Whether the push holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Entries sharing one label set, sorted by timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    /// Label names and values.
    pub labels: BTreeMap<String, String>,
    /// The entries, oldest first.
    pub entries: Vec<Entry>,
}

/// One log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// When the event happened, in nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// The line: a JSON object of the record's fields (but `ts`). The same
    /// entry always gets the same bytes, so a resent push deduplicates.
    pub line: String,
}

/// Why a push failed, which decides what happens to its entries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// Worth retrying later (throttled, server error, network): the
    /// entries stay in flight and the tenant backs off.
    #[error("push failed, will retry: {reason}")]
    Retry {
        /// What happened (status and body, or the I/O error).
        reason: String,
    },
    /// Refused for good (Loki's 400 and other 4xx). Loki stores the valid
    /// entries of a batch it answers 400, so the offloader halves such a
    /// batch down to the entries refused alone (the valid ones sent again
    /// are duplicates Loki drops); those, and the entries of a batch
    /// refused with another status, go to the dead-letter stream, never
    /// resent.
    #[error("push refused with status {status}: {reason}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The body, or what the sink found wrong.
        reason: String,
    },
    /// The push is too large for the sink (413): it is split in two.
    #[error("push too large for the sink")]
    TooLarge,
}

/// A destination for offloaded batches: Loki ([`LokiSink`](crate::LokiSink))
/// in production, a file ([`FileSink`]) for development.
#[async_trait::async_trait]
pub trait LogSink: Send + Sync + 'static {
    /// Delivers `push`. `Ok` acknowledges its entries in Redis.
    async fn push(&self, push: &Push) -> Result<(), PushError>;
}

#[async_trait::async_trait]
impl<S: LogSink + ?Sized> LogSink for std::sync::Arc<S> {
    async fn push(&self, push: &Push) -> Result<(), PushError> {
        (**self).push(push).await
    }
}

#[async_trait::async_trait]
impl<S: LogSink + ?Sized> LogSink for Box<S> {
    async fn push(&self, push: &Push) -> Result<(), PushError> {
        (**self).push(push).await
    }
}

/// Appends to `text` the lines [`FileSink`] writes for `push`. What a
/// stream's lines share (tenant and labels) is serialized once per
/// stream, not per line.
fn file_lines(push: &Push, text: &mut Vec<u8>) {
    let mut head = Vec::new();
    for stream in &push.streams {
        // Writing strings and maps of strings to a `Vec` cannot fail.
        head.clear();
        head.extend_from_slice(b"{\"tenant\":");
        let _ = serde_json::to_writer(&mut head, &push.tenant);
        head.extend_from_slice(b",\"labels\":");
        let _ = serde_json::to_writer(&mut head, &stream.labels);
        head.extend_from_slice(b",\"ts\":\"");
        for entry in &stream.entries {
            text.extend_from_slice(&head);
            text.extend_from_slice(itoa::Buffer::new().format(entry.ts_ns).as_bytes());
            text.extend_from_slice(b"\",\"line\":");
            let _ = serde_json::to_writer(&mut *text, &entry.line);
            text.extend_from_slice(b"}\n");
        }
    }
}

/// The largest text buffer a [`FileSink`] keeps between pushes: a push is
/// a few megabytes at most, unless its lines are near Loki's line limit.
const KEPT_TEXT_BYTES: usize = 8 << 20;

/// Appends every entry to a file as one line of JSON:
/// `{"tenant":..,"labels":{..},"ts":"<ns>","line":".."}`.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    /// The file, once opened, and the text of the last push: its memory
    /// kept for the next, rather than taken fresh (and zeroed by the
    /// kernel) for every push.
    file: Mutex<(Option<tokio::fs::File>, Vec<u8>)>,
}

impl FileSink {
    /// A sink appending to `path` (created if missing).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            file: Mutex::new((None, Vec::new())),
        }
    }
}

#[async_trait::async_trait]
impl LogSink for FileSink {
    async fn push(&self, push: &Push) -> Result<(), PushError> {
        let retry = |error: std::io::Error| PushError::Retry {
            reason: format!("{}: {error}", self.path.display()),
        };
        let mut state = self.file.lock().await;
        let (file, text) = &mut *state;
        text.clear();
        if text.capacity() > KEPT_TEXT_BYTES {
            text.shrink_to(KEPT_TEXT_BYTES);
        }
        file_lines(push, text);
        if file.is_none() {
            let opened = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await
                .map_err(retry)?;
            *file = Some(opened);
        }
        let open = file.as_mut().expect("opened above");
        let written = open.write_all(text).await;
        let written = match written {
            Ok(()) => open.flush().await,
            Err(error) => Err(error),
        };
        if let Err(error) = written {
            // Reopen next time: the file may have been rotated away.
            *file = None;
            return Err(retry(error));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_lines_are_one_json_object_per_entry() {
        let labels = BTreeMap::from([("job".to_owned(), "a\"b".to_owned())]);
        let entry = |ts_ns, line: &str| Entry {
            ts_ns,
            line: line.to_owned(),
        };
        let push = Push {
            tenant: "acme".to_owned(),
            streams: vec![
                Stream {
                    labels: labels.clone(),
                    entries: vec![entry(1, "{\"m\":\"x\\ny\"}"), entry(22, "plain")],
                },
                Stream {
                    labels: BTreeMap::new(),
                    entries: vec![entry(3, "")],
                },
            ],
        };
        let mut text = Vec::new();
        file_lines(&push, &mut text);
        let text = String::from_utf8(text).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let expected = [
            serde_json::json!({"tenant": "acme", "labels": {"job": "a\"b"}, "ts": "1", "line": "{\"m\":\"x\\ny\"}"}),
            serde_json::json!({"tenant": "acme", "labels": {"job": "a\"b"}, "ts": "22", "line": "plain"}),
            serde_json::json!({"tenant": "acme", "labels": {}, "ts": "3", "line": ""}),
        ];
        assert_eq!(lines, expected);
        assert!(text.starts_with(
            "{\"tenant\":\"acme\",\"labels\":{\"job\":\"a\\\"b\"},\"ts\":\"1\",\"line\":"
        ));
    }
}
