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

/// Appends every entry to a file as one line of JSON:
/// `{"tenant":..,"labels":{..},"ts":"<ns>","line":".."}`.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: Mutex<Option<tokio::fs::File>>,
}

impl FileSink {
    /// A sink appending to `path` (created if missing).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            file: Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl LogSink for FileSink {
    async fn push(&self, push: &Push) -> Result<(), PushError> {
        /// One line of the file, written straight from the push's parts.
        #[derive(serde::Serialize)]
        struct FileLine<'a> {
            tenant: &'a str,
            labels: &'a BTreeMap<String, String>,
            ts: String,
            line: &'a str,
        }
        let mut text = Vec::new();
        for stream in &push.streams {
            for entry in &stream.entries {
                let line = FileLine {
                    tenant: &push.tenant,
                    labels: &stream.labels,
                    ts: entry.ts_ns.to_string(),
                    line: &entry.line,
                };
                // Strings and maps of strings always serialize.
                let _ = serde_json::to_writer(&mut text, &line);
                text.push(b'\n');
            }
        }
        let retry = |error: std::io::Error| PushError::Retry {
            reason: format!("{}: {error}", self.path.display()),
        };
        let mut file = self.file.lock().await;
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
        let written = open.write_all(&text).await;
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
