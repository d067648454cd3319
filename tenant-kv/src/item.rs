//! What the store keeps and answers: items, writes, pages, usage.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value as Json};

// Named by the docs' links only.
#[cfg(doc)]
use crate::tenant::Tenant;

/// The longest TTL an item may have: 100 years, far inside what Redis's
/// millisecond expiry times can hold.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What to store under a key.
#[derive(Clone, Debug, PartialEq)]
pub struct NewItem {
    /// Any JSON value.
    pub value: Json,
    /// An optional JSON object kept beside the value.
    pub metadata: Option<Map<String, Json>>,
    /// How long the item lives; `None` for ever.
    pub ttl: Option<Duration>,
}

impl NewItem {
    /// `value`, without metadata or TTL.
    pub fn new(value: Json) -> Self {
        Self {
            value,
            metadata: None,
            ttl: None,
        }
    }

    /// With `metadata`.
    #[must_use]
    pub fn metadata(mut self, metadata: Map<String, Json>) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Living `ttl` (at most [`MAX_TTL`]).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// A stored item. Its value is parsed JSON (`Item`, as [`Tenant::get`]
/// and the writes answer), or the JSON text as stored
/// (`Item<Box<serde_json::value::RawValue>>`, as [`Tenant::get_raw`]
/// reads it) to pass on without building a tree.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Item<V = Json> {
    /// Its key.
    pub key: String,
    /// Its value.
    pub value: V,
    /// Its metadata, if any.
    pub metadata: Option<Map<String, Json>>,
    /// Its version: bumped by every write, never reused within the tenant
    /// (a recreated key gets a higher one). Use it as an `ETag`.
    pub version: u64,
    /// When it was created (by Redis's clock).
    pub created_at: SystemTime,
    /// When it was last written.
    pub updated_at: SystemTime,
    /// When it expires, if it has a TTL.
    pub expires_at: Option<SystemTime>,
}

/// What a write must find before it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Precondition {
    /// Nothing: create or replace.
    #[default]
    None,
    /// The item must exist (replace only).
    Exists,
    /// The item must exist at this version (compare-and-set).
    Version(u64),
}

/// One write of a [`Tenant::batch`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Write {
    /// Like [`Tenant::create`].
    Create {
        /// The key.
        key: String,
        /// What to store.
        item: NewItem,
    },
    /// Like [`Tenant::put`].
    Put {
        /// The key.
        key: String,
        /// What to store.
        item: NewItem,
        /// What it must find.
        precondition: Precondition,
    },
    /// Like [`Tenant::delete`].
    Delete {
        /// The key.
        key: String,
        /// The version it must find, if any.
        expected_version: Option<u64>,
    },
}

/// What a write did.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Written {
    /// The item as stored.
    Stored(Item),
    /// The item was deleted, taking this version.
    Deleted {
        /// The key.
        key: String,
        /// The version the deletion took.
        version: u64,
    },
}

impl Written {
    pub(crate) fn into_item(self) -> Item {
        match self {
            Self::Stored(item) => item,
            Self::Deleted { .. } => unreachable!("only deletes delete"),
        }
    }
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page {
    /// Keys in byte order.
    pub keys: Vec<String>,
    /// Pass it to get the next page; `None` when the listing is done.
    pub cursor: Option<String>,
}

/// A tenant's usage, as its counters say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Usage {
    /// Items held.
    pub keys: u64,
    /// Bytes of keys, values and metadata held.
    pub bytes: u64,
}
