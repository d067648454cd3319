//! An item as stored: under storage layout 2, one string (the envelope)
//! read with one `GET`; under layout 1, a hash, still read while a
//! migration runs.
//!
//! The envelope is a fixed header, then the metadata, then the value. The
//! header is 45 bytes, integers big-endian: the format (1 byte, `1`); the
//! version, the creation, update and expiry times (ms since the Unix epoch,
//! 0 for no expiry) and the size (8 bytes each); the metadata's length (4
//! bytes, 0 for none). The metadata is JSON text (an object), the value
//! JSON text or, encrypted, `enc:v1:` and its ciphertext. The scripts
//! build envelopes (`lua/envelope.lua`) and, to check a write, read only
//! the header of the item it replaces (`GETRANGE`), whatever the value's
//! size.

/// The header's length.
pub(crate) const HEADER_LEN: usize = 45;
/// The only format written so far.
const FORMAT: u8 = 1;

/// An item as stored, before its value is decrypted and parsed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Stored {
    /// JSON text, or an encrypted value.
    pub(crate) value: Vec<u8>,
    /// JSON text of an object, if the item has metadata.
    pub(crate) metadata: Option<Vec<u8>>,
    pub(crate) version: u64,
    pub(crate) created: u64,
    pub(crate) updated: u64,
    pub(crate) expires: Option<u64>,
    /// Bytes of key, value and metadata, as the usage counters count them.
    pub(crate) size: u64,
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

/// An envelope's header (the write script also answers with these).
#[derive(Debug)]
pub(crate) struct Header {
    pub(crate) version: u64,
    pub(crate) created: u64,
    pub(crate) updated: u64,
    /// 0 for none.
    pub(crate) expires: u64,
    pub(crate) size: u64,
    pub(crate) metadata_len: usize,
}

impl Header {
    /// Reads the first [`HEADER_LEN`] bytes of `bytes`, which must hold them.
    pub(crate) fn read(bytes: &[u8]) -> Self {
        let mut length = [0; 4];
        length.copy_from_slice(&bytes[41..HEADER_LEN]);
        Self {
            version: be_u64(bytes, 1),
            created: be_u64(bytes, 9),
            updated: be_u64(bytes, 17),
            expires: be_u64(bytes, 25),
            size: be_u64(bytes, 33),
            metadata_len: u32::from_be_bytes(length) as usize,
        }
    }
}

impl Stored {
    /// Reads an envelope; `Err` says what is wrong with it.
    pub(crate) fn from_envelope(mut bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!(
                "{} bytes, shorter than an envelope's header",
                bytes.len()
            ));
        }
        if bytes[0] != FORMAT {
            return Err(format!("envelope format {} is not known", bytes[0]));
        }
        let header = Header::read(&bytes);
        let value_at = HEADER_LEN.checked_add(header.metadata_len);
        let Some(value_at) = value_at.filter(|&at| at <= bytes.len()) else {
            return Err(format!(
                "the metadata's length ({}) runs past the envelope",
                header.metadata_len
            ));
        };
        let mut item = Self {
            value: Vec::new(),
            metadata: None,
            version: header.version,
            created: header.created,
            updated: header.updated,
            expires: Some(header.expires).filter(|&at| at > 0),
            size: header.size,
        };
        if header.metadata_len > 0 {
            item.metadata = Some(bytes[HEADER_LEN..value_at].to_vec());
        }
        // The value keeps the reply's allocation: the header and metadata
        // are moved out of its way, not the value copied.
        bytes.drain(..value_at);
        item.value = bytes;
        Ok(item)
    }

    /// The fields [`from_legacy`](Self::from_legacy) reads, in order.
    pub(crate) const LEGACY_FIELDS: [&str; 7] = [
        "value", "metadata", "version", "created", "updated", "expires", "size",
    ];

    /// Reads a layout 1 item's hash, as `HMGET` of [`Self::LEGACY_FIELDS`]
    /// returns it: `Ok(None)` if there is no item.
    pub(crate) fn from_legacy(fields: [Option<String>; 7]) -> Result<Option<Self>, String> {
        let [value, metadata, version, created, updated, expires, size] = fields;
        let Some(value) = value else {
            return Ok(None);
        };
        let number = |name: &str, field: Option<String>| -> Result<u64, String> {
            field
                .ok_or_else(|| format!("no `{name}`"))?
                .parse::<f64>()
                .map(|n| n as u64)
                .map_err(|e| format!("`{name}`: {e}"))
        };
        Ok(Some(Self {
            value: value.into_bytes(),
            metadata: metadata.map(String::into_bytes),
            version: number("version", version)?,
            created: number("created", created)?,
            updated: number("updated", updated)?,
            expires: expires.map(|e| number("expires", Some(e))).transpose()?,
            size: number("size", size).unwrap_or(0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An envelope as `lua/envelope.lua` packs it.
    pub(crate) fn envelope(numbers: [u64; 5], metadata: &[u8], value: &[u8]) -> Vec<u8> {
        let mut bytes = vec![FORMAT];
        for n in numbers {
            bytes.extend_from_slice(&n.to_be_bytes());
        }
        bytes.extend_from_slice(&(metadata.len() as u32).to_be_bytes());
        bytes.extend_from_slice(metadata);
        bytes.extend_from_slice(value);
        bytes
    }

    #[test]
    fn envelopes_are_read_back() {
        let bytes = envelope([7, 1_000, 2_000, 0, 12], b"{\"a\":1}", b"\"hi\"");
        let stored = Stored::from_envelope(bytes).unwrap();
        assert_eq!(stored.value, b"\"hi\"");
        assert_eq!(stored.metadata.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(
            (
                stored.version,
                stored.created,
                stored.updated,
                stored.expires,
                stored.size
            ),
            (7, 1_000, 2_000, None, 12)
        );
        let bare = Stored::from_envelope(envelope([1, 2, 3, 4, 5], b"", b"1")).unwrap();
        assert_eq!((bare.metadata, bare.expires), (None, Some(4)));
    }

    #[test]
    fn damaged_envelopes_are_refused() {
        assert!(Stored::from_envelope(b"short".to_vec()).is_err());
        let mut wrong_format = envelope([1, 2, 3, 4, 5], b"", b"1");
        wrong_format[0] = 9;
        assert!(Stored::from_envelope(wrong_format).is_err());
        let mut truncated = envelope([1, 2, 3, 4, 5], b"{}", b"");
        truncated.pop();
        assert!(Stored::from_envelope(truncated).is_err());
    }

    #[test]
    fn layout_1_hashes_are_read() {
        let some = |s: &str| Some(s.to_owned());
        let fields = [
            some("1"),
            None,
            some("3"),
            some("10"),
            some("20"),
            some("30"),
            some("8"),
        ];
        let stored = Stored::from_legacy(fields).unwrap().unwrap();
        assert_eq!(
            (stored.version, stored.expires, stored.size),
            (3, Some(30), 8)
        );
        assert_eq!(Stored::from_legacy(Default::default()).unwrap(), None);
    }
}
