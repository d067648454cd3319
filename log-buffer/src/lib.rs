#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod loki;
mod offloader;
mod packed;
mod producer;
mod record;
mod sink;

pub use error::{Error, Result};
pub use loki::{Encoding, LokiSink, LokiSinkBuilder};
pub use offloader::{Offloader, OffloaderBuilder, TenantMetrics};
pub use producer::{BufferLayer, LogBuffer, LogBufferBuilder, ProducerMetrics};
pub use record::{MAX_TENANT_LEN, dead_letter_stream, is_valid_tenant, log_stream, staging_list};
pub use sink::{Entry, FileSink, LogSink, Push, PushError, Stream};
