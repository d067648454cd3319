//! The Loki sink: `POST /loki/api/v1/push` in protobuf + snappy or JSON.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::{Error, Result};
use crate::sink::{Entry, LogSink, Push, PushError, Stream};

/// How a push is encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Encoding {
    /// `logproto.PushRequest` in protobuf, compressed with raw snappy:
    /// Loki's native format, and the smallest. This is the default.
    #[default]
    Protobuf,
    /// The JSON push format.
    Json,
    /// The JSON push format, gzip-compressed.
    JsonGzip,
}

/// Loki's push messages (`pkg/push/push.proto`), for sinks and receivers.
pub mod proto {
    /// `logproto.PushRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        /// One per label set.
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<StreamAdapter>,
    }

    /// `logproto.StreamAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StreamAdapter {
        /// The label set, as `{name="value", ...}`.
        #[prost(string, tag = "1")]
        pub labels: String,
        /// The entries.
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<EntryAdapter>,
        /// Unused by pushes.
        #[prost(uint64, tag = "3")]
        pub hash: u64,
    }

    /// `logproto.EntryAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EntryAdapter {
        /// When.
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<Timestamp>,
        /// The line.
        #[prost(string, tag = "2")]
        pub line: String,
        /// Structured metadata.
        #[prost(message, repeated, tag = "3")]
        pub structured_metadata: Vec<LabelPairAdapter>,
    }

    /// `google.protobuf.Timestamp`.
    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Timestamp {
        /// Seconds since the Unix epoch.
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        /// Nanoseconds within the second.
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }

    /// `logproto.LabelPairAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPairAdapter {
        /// Name.
        #[prost(string, tag = "1")]
        pub name: String,
        /// Value.
        #[prost(string, tag = "2")]
        pub value: String,
    }
}

/// Settings of a [`LokiSink`].
#[derive(Debug)]
#[must_use]
pub struct LokiSinkBuilder {
    url: String,
    encoding: Encoding,
    timeout: Duration,
}

impl LokiSinkBuilder {
    /// The body encoding. Defaults to [`Encoding::Protobuf`].
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// How long a push may take before it counts as failed (and is
    /// retried). Defaults to 10 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Validates the settings.
    pub fn build(self) -> Result<LokiSink> {
        let invalid = |reason: String| Error::InvalidConfig {
            setting: "url",
            reason,
        };
        let base: hyper::Uri = self
            .url
            .parse()
            .map_err(|e| invalid(format!("{:?}: {e}", self.url)))?;
        if base.scheme_str() != Some("http") || base.host().is_none() {
            return Err(invalid(format!(
                "{:?}: an http:// URL with a host is needed (for TLS, push through a terminating proxy)",
                self.url
            )));
        }
        let push_url = format!("{}/loki/api/v1/push", self.url.trim_end_matches('/'));
        if self.timeout.is_zero() {
            return Err(Error::InvalidConfig {
                setting: "timeout",
                reason: "must be more than zero".to_owned(),
            });
        }
        Ok(LokiSink {
            push_url: push_url.parse().map_err(|e| invalid(format!("{e}")))?,
            encoding: self.encoding,
            timeout: self.timeout,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }
}

/// Pushes batches to Loki's `/loki/api/v1/push`, one tenant per request
/// (`X-Scope-OrgID`), and maps the answer to what the offloader does:
/// 2xx acknowledges; 429, 5xx, timeouts and network errors retry; 413
/// splits; 400 and other 4xx dead-letter.
#[derive(Debug)]
pub struct LokiSink {
    push_url: hyper::Uri,
    encoding: Encoding,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl LokiSink {
    /// Settings for a sink pushing to the Loki at `url` (e.g.
    /// `http://loki:3100`).
    pub fn builder(url: impl Into<String>) -> LokiSinkBuilder {
        LokiSinkBuilder {
            url: url.into(),
            encoding: Encoding::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

#[async_trait::async_trait]
impl LogSink for LokiSink {
    async fn push(&self, push: &Push) -> std::result::Result<(), PushError> {
        let (body, content_type, content_encoding) = encode(self.encoding, &push.streams);
        let mut request = hyper::Request::post(self.push_url.clone())
            .header(hyper::header::CONTENT_TYPE, content_type)
            .header("X-Scope-OrgID", &push.tenant)
            .header(
                hyper::header::USER_AGENT,
                concat!("log-buffer/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(encoding) = content_encoding {
            request = request.header(hyper::header::CONTENT_ENCODING, encoding);
        }
        let request =
            request
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| PushError::Rejected {
                    status: 0,
                    reason: format!("the request cannot be built: {e}"),
                })?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        let (status, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                return Err(PushError::Retry {
                    reason: error.to_string(),
                });
            }
            Err(_) => {
                return Err(PushError::Retry {
                    reason: format!("no answer within {:?}", self.timeout),
                });
            }
        };
        let reason = || {
            let text = String::from_utf8_lossy(&body);
            format!("{status}: {}", text.trim())
        };
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::PAYLOAD_TOO_LARGE => Err(PushError::TooLarge),
            StatusCode::TOO_MANY_REQUESTS => Err(PushError::Retry { reason: reason() }),
            s if s.is_server_error() => Err(PushError::Retry { reason: reason() }),
            s => Err(PushError::Rejected {
                status: s.as_u16(),
                reason: reason(),
            }),
        }
    }
}

/// A push body in `encoding`, its content type and content encoding.
pub(crate) fn encode(
    encoding: Encoding,
    streams: &[Stream],
) -> (Vec<u8>, &'static str, Option<&'static str>) {
    match encoding {
        Encoding::Protobuf => {
            let request = proto::PushRequest {
                streams: streams
                    .iter()
                    .map(|stream| proto::StreamAdapter {
                        labels: label_set(&stream.labels),
                        entries: stream
                            .entries
                            .iter()
                            .map(|entry| proto::EntryAdapter {
                                timestamp: Some(proto::Timestamp {
                                    seconds: (entry.ts_ns / 1_000_000_000) as i64,
                                    nanos: (entry.ts_ns % 1_000_000_000) as i32,
                                }),
                                line: entry.line.clone(),
                                structured_metadata: Vec::new(),
                            })
                            .collect(),
                        hash: 0,
                    })
                    .collect(),
            };
            let raw = prost::Message::encode_to_vec(&request);
            let body = snap::raw::Encoder::new()
                .compress_vec(&raw)
                .expect("snappy compresses any input below 4 GiB");
            (body, "application/x-protobuf", None)
        }
        Encoding::Json | Encoding::JsonGzip => {
            let json = serde_json::json!({
                "streams": streams.iter().map(|stream| serde_json::json!({
                    "stream": stream.labels,
                    "values": stream.entries.iter()
                        .map(|e| [e.ts_ns.to_string(), e.line.clone()])
                        .collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            });
            let body = json.to_string().into_bytes();
            if encoding == Encoding::Json {
                return (body, "application/json", None);
            }
            let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gzip.write_all(&body).expect("writing to memory");
            let body = gzip.finish().expect("writing to memory");
            (body, "application/json", Some("gzip"))
        }
    }
}

/// Labels in Loki's selector syntax: `{a="x", b="y"}`.
fn label_set(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels
        .iter()
        .map(|(name, value)| {
            let mut quoted = String::with_capacity(value.len() + 2);
            for c in value.chars() {
                match c {
                    '"' => quoted.push_str("\\\""),
                    '\\' => quoted.push_str("\\\\"),
                    '\n' => quoted.push_str("\\n"),
                    c => quoted.push(c),
                }
            }
            format!("{name}=\"{quoted}\"")
        })
        .collect();
    format!("{{{}}}", pairs.join(", "))
}

/// Parses a label set written by [`label_set`].
fn parse_label_set(text: &str) -> Option<BTreeMap<String, String>> {
    let mut rest = text.trim().strip_prefix('{')?.strip_suffix('}')?.trim();
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.trim().to_owned(), value);
        rest = after[end + 1..].trim_start().trim_start_matches(',').trim();
    }
    Some(labels)
}

/// Decodes a push body as Loki would: JSON for `application/json`
/// (gzip-compressed if `content_encoding` says so), snappy-compressed
/// protobuf otherwise. For receivers, proxies and tests.
pub fn decode_push_body(
    content_type: &str,
    content_encoding: Option<&str>,
    body: &[u8],
) -> std::result::Result<Vec<Stream>, String> {
    if content_type.starts_with("application/json") {
        let mut text = Vec::new();
        match content_encoding {
            Some("gzip") => {
                flate2::read::GzDecoder::new(body)
                    .read_to_end(&mut text)
                    .map_err(|e| format!("gzip: {e}"))?;
            }
            None | Some("identity") => text.extend_from_slice(body),
            Some(other) => return Err(format!("unsupported content encoding {other:?}")),
        }
        #[derive(serde::Deserialize)]
        struct Body {
            streams: Vec<JsonStream>,
        }
        #[derive(serde::Deserialize)]
        struct JsonStream {
            stream: BTreeMap<String, String>,
            values: Vec<(String, String)>,
        }
        let parsed: Body = serde_json::from_slice(&text).map_err(|e| format!("JSON: {e}"))?;
        return parsed
            .streams
            .into_iter()
            .map(|s| {
                let entries = s
                    .values
                    .into_iter()
                    .map(|(ts, line)| {
                        let ts_ns = ts.parse().map_err(|e| format!("timestamp {ts:?}: {e}"))?;
                        Ok(Entry { ts_ns, line })
                    })
                    .collect::<std::result::Result<_, String>>()?;
                Ok(Stream {
                    labels: s.stream,
                    entries,
                })
            })
            .collect();
    }
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("snappy: {e}"))?;
    let request: proto::PushRequest =
        prost::Message::decode(raw.as_slice()).map_err(|e| format!("protobuf: {e}"))?;
    request
        .streams
        .into_iter()
        .map(|s| {
            let labels =
                parse_label_set(&s.labels).ok_or_else(|| format!("labels {:?}", s.labels))?;
            let entries = s
                .entries
                .into_iter()
                .map(|e| {
                    let ts = e.timestamp.unwrap_or_default();
                    Entry {
                        ts_ns: ts.seconds as u64 * 1_000_000_000 + ts.nanos as u64,
                        line: e.line,
                    }
                })
                .collect();
            Ok(Stream { labels, entries })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams() -> Vec<Stream> {
        let mut labels = BTreeMap::new();
        labels.insert("job".to_owned(), "api".to_owned());
        labels.insert("odd".to_owned(), "a \"quoted\" \\ value,\nx".to_owned());
        vec![Stream {
            labels,
            entries: vec![
                Entry {
                    ts_ns: 1_700_000_000_123_456_789,
                    line: r#"{"message":"hello"}"#.to_owned(),
                },
                Entry {
                    ts_ns: 1_700_000_001_000_000_000,
                    line: "ünïcode".to_owned(),
                },
            ],
        }]
    }

    #[test]
    fn every_encoding_decodes_to_what_was_sent() {
        for encoding in [Encoding::Protobuf, Encoding::Json, Encoding::JsonGzip] {
            let (body, content_type, content_encoding) = encode(encoding, &streams());
            let decoded = decode_push_body(content_type, content_encoding, &body).unwrap();
            assert_eq!(decoded, streams(), "{encoding:?}");
        }
    }

    #[test]
    fn the_same_push_encodes_to_the_same_bytes() {
        for encoding in [Encoding::Protobuf, Encoding::Json] {
            assert_eq!(
                encode(encoding, &streams()).0,
                encode(encoding, &streams()).0
            );
        }
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["https://loki:3100", "loki:3100", "http://", "not a url"] {
            assert!(LokiSink::builder(url).build().is_err(), "{url}");
        }
        assert!(LokiSink::builder("http://127.0.0.1:3100/").build().is_ok());
    }
}
