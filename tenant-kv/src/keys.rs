//! Tenant ids, item keys, and the Redis keys they map to.
//!
//! Every Redis key of a tenant starts with `tenant:{<tenant_id>}:` (storage
//! layout 2). The braces are a Redis Cluster hash tag: only the tenant id
//! is hashed, so all of a tenant's keys share one slot, and a script or
//! transaction over them is never cross-slot. A tenant id holds neither
//! braces nor `:`, so the first `}` after `tenant:{` ends it: a Redis key
//! names exactly one tenant, and the tag is always the tenant. An item's
//! Redis key is `tenant:{<tenant_id>}:data:<key>`, its key verbatim after
//! the fixed `data:` part, so the mapping from (tenant, key) is injective
//! whatever the key contains (braces included: only the first `{...}` of a
//! key is its tag). The tenant's other keys (`index`, `expiry`, ...) do not
//! start with `data:`, so no item key can reach them.
//!
//! Layout 1 spelled the same keys `tenant:<tenant_id>:...`, without the tag;
//! [`TenantKeys::legacy_data`] names its item keys for the migration.

use std::fmt;

use crate::error::Error;

/// The longest tenant id, in bytes.
pub const MAX_TENANT_ID_LEN: usize = 64;
/// The longest item key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;

/// A tenant's id: 1 to 64 ASCII letters, digits, `_` or `-`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// Validates `id`.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= MAX_TENANT_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(id))
        } else {
            Err(Error::InvalidTenantId {
                reason: format!(
                    "{id:?} must be 1 to {MAX_TENANT_ID_LEN} ASCII letters, digits, '_' or '-'"
                ),
            })
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TenantId {
    type Err = Error;

    fn from_str(id: &str) -> Result<Self, Error> {
        Self::new(id)
    }
}

/// Whether `c` could act on a terminal or a log viewer instead of being
/// shown: control characters (C0, DEL, C1, which include the escape that
/// starts terminal sequences and the line breaks that forge log lines),
/// the line and paragraph separators, and the bidirectional formatting
/// characters that reorder what is displayed.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// Checks an item key: 1 to [`MAX_KEY_LEN`] bytes of UTF-8 text without
/// the characters [`is_unsafe_char`] refuses.
pub(crate) fn check_key(key: &str) -> Result<(), Error> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidKey {
            reason: format!(
                "keys are 1 to {MAX_KEY_LEN} bytes, this one is {}",
                key.len()
            ),
        });
    }
    check_text("keys", key).map_err(|reason| Error::InvalidKey { reason })
}

/// Refuses text holding a character [`is_unsafe_char`] refuses, naming
/// where it is (`what` says what the text is).
pub(crate) fn check_text(what: &str, text: &str) -> Result<(), String> {
    match text.char_indices().find(|(_, c)| is_unsafe_char(*c)) {
        Some((at, c)) => Err(format!(
            "{what} cannot hold control or bidirectional formatting characters ({:?} at byte {at})",
            c
        )),
        None => Ok(()),
    }
}

/// The start of every Redis key of `tenant`: `tenant:{<id>}:`.
pub(crate) fn tenant_prefix(tenant: &str) -> String {
    ["tenant:{", tenant, "}:"].concat()
}

/// The start of every Redis key of `tenant` under storage layout 1:
/// `tenant:<id>:`.
pub(crate) fn legacy_prefix(tenant: &str) -> String {
    format!("tenant:{tenant}:")
}

/// The names after a tenant's prefix of the keys the write script takes.
pub(crate) const USAGE: &str = "usage";
pub(crate) const AUDIT: &str = "audit";
pub(crate) const INDEX: &str = "index";
pub(crate) const EXPIRY: &str = "expiry";
pub(crate) const EXPIRING_SIZES: &str = "expiring-sizes";
pub(crate) const RATE: &str = "rate";
/// The audit stream's staging list (log-buffer's `staging_list` of it:
/// the stream's name and `:staged`), where the write script stages its
/// records for the offloader to pack.
pub(crate) const AUDIT_STAGED: &str = "audit:staged";

/// A Redis key written into a command from its parts, without a string of
/// its own: the tenant's prefix, then the rest.
pub(crate) struct KeyArg<'a>([&'a str; 4]);

impl redis::ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        for part in self.0 {
            // Writing into the command's own buffer cannot fail.
            let _ = arg.write_all(part.as_bytes());
        }
    }
}

/// The Redis keys of one tenant.
#[derive(Clone, Debug)]
pub(crate) struct TenantKeys {
    /// `tenant:{<id>}:`
    prefix: String,
}

impl TenantKeys {
    pub(crate) fn new(tenant: &TenantId) -> Self {
        Self {
            prefix: tenant_prefix(tenant.as_str()),
        }
    }

    /// The tenant's id, from the prefix (layout 1's keys are made from it
    /// only while a migration runs, so they cost no string of their own).
    fn id(&self) -> &str {
        &self.prefix["tenant:{".len()..self.prefix.len() - "}:".len()]
    }

    fn named(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The key `name` (one of this module's constants), as a command's argument.
    pub(crate) fn arg<'a>(&'a self, name: &'a str) -> KeyArg<'a> {
        KeyArg([&self.prefix, name, "", ""])
    }

    /// An item's Redis key, as a command's argument.
    pub(crate) fn data_arg<'a>(&'a self, key: &'a str) -> KeyArg<'a> {
        KeyArg([&self.prefix, "data:", key, ""])
    }

    /// An item's layout 1 Redis key, as a command's argument.
    pub(crate) fn legacy_data_arg<'a>(&'a self, key: &'a str) -> KeyArg<'a> {
        KeyArg(["tenant:", self.id(), ":data:", key])
    }

    /// An item's Redis key.
    pub(crate) fn data(&self, key: &str) -> String {
        format!("{}data:{key}", self.prefix)
    }

    /// An item's Redis key under storage layout 1 (a hash), which the store
    /// still reads and replaces while a migration runs.
    pub(crate) fn legacy_data(&self, key: &str) -> String {
        format!("tenant:{}:data:{key}", self.id())
    }

    /// The tenant's progress through a migration (a hash).
    pub(crate) fn migration(&self) -> String {
        format!("{}migration", self.prefix)
    }

    /// The sorted set of every item key (score 0, read by lexical range).
    pub(crate) fn index(&self) -> String {
        self.named(INDEX)
    }

    /// The sorted set of item keys with a TTL, scored by expiry (ms).
    pub(crate) fn expiry(&self) -> String {
        self.named(EXPIRY)
    }

    /// Sizes of the items with a TTL, for the usage counters once they expire.
    pub(crate) fn expiring_sizes(&self) -> String {
        self.named(EXPIRING_SIZES)
    }

    /// The tenant's counters: `keys`, `bytes`, and `rev` (the last version given).
    pub(crate) fn usage(&self) -> String {
        self.named(USAGE)
    }

    /// The tenant's quota overrides (a hash: quota name to value).
    pub(crate) fn quotas(&self) -> String {
        format!("{}quotas", self.prefix)
    }

    /// The tenant's request-rate state (GCRA).
    pub(crate) fn request_rate(&self) -> String {
        format!("{}request-rate", self.prefix)
    }

    /// The request-rate state of the tenant's API key `id`.
    pub(crate) fn api_key_rate(&self, id: &str) -> String {
        format!("{}api-key-rate:{id}", self.prefix)
    }

    /// The rate state of the tenant's `login_failed` audit records.
    pub(crate) fn login_failed_rate(&self) -> String {
        format!("{}login-failed-rate", self.prefix)
    }

    /// How many `login_failed` records were left out since the last one.
    pub(crate) fn login_failed_suppressed(&self) -> String {
        format!("{}login-failed-suppressed", self.prefix)
    }

    /// The tenant's data key, wrapped by the master key.
    pub(crate) fn data_key(&self) -> String {
        format!("{}data-key", self.prefix)
    }

    /// The set of the tenant's usernames.
    pub(crate) fn users(&self) -> String {
        format!("{}users", self.prefix)
    }

    /// The set of the tenant's API key ids.
    pub(crate) fn api_keys(&self) -> String {
        format!("{}api-keys", self.prefix)
    }

    /// The stream of the tenant's audit records.
    pub(crate) fn audit(&self) -> String {
        self.named(AUDIT)
    }
}

/// A short, fixed-size, non-reversible name for `text` (the first 16 hex
/// digits of its SHA-256), to record or key by what must not appear raw.
pub(crate) fn fingerprint(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Escapes Redis glob metacharacters (`*`, `?`, `[`, `]`, `\`) so that
/// `text` matches only itself in `SCAN MATCH`, `KEYS` or ACL key patterns.
pub fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// ACL rules confining a Redis user to `tenant`'s keys, as defence in depth
/// under the library's own isolation: `resetkeys ~tenant:{<id>}:*` and no
/// command that reaches keys by pattern or the whole keyspace. Add the
/// user's password and `on` to use it, e.g.
/// `ACL SETUSER <name> on ><password> <rules...>`.
///
/// A [`TenantKv`](crate::TenantKv) over a client that logs in as this user
/// serves that tenant's items (`ROLE`, for finding the master, `TIME`, for
/// the write script's clock, and reading the storage layout marker
/// `tenant-kv:layout` are allowed; the marker must have been set by an
/// unconfined client, unless the database is empty)
/// and gets `NOPERM` errors for any other tenant's. Replica reads also need
/// `+info`, and the expiry watcher, users and API keys (kept outside the
/// tenants' keys) need an unconfined user.
pub fn tenant_acl_rules(tenant: &TenantId) -> Vec<String> {
    let mut rules = vec![
        "resetkeys".to_owned(),
        format!("~{}*", escape_glob(&tenant_prefix(tenant.as_str()))),
        // The storage layout marker, read (never written) before serving.
        format!("%R~{}", escape_glob(crate::layout::LAYOUT_KEY)),
        "resetchannels".to_owned(),
        "-@all".to_owned(),
        "+@read".to_owned(),
        "+@write".to_owned(),
        "+@scripting".to_owned(),
        "+@connection".to_owned(),
        "+@transaction".to_owned(),
        "+role".to_owned(),
        "+time".to_owned(),
    ];
    for denied in [
        "scan",
        "keys",
        "randomkey",
        "flushall",
        "flushdb",
        "swapdb",
        "move",
        "migrate",
        "script|flush",
        "function",
    ] {
        rules.push(format!("-{denied}"));
    }
    rules
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Recovers (tenant, key) from an item's Redis key, as anyone reading
    /// the keyspace would: the tenant id ends at the first `}`.
    fn decode(redis_key: &str) -> Option<(String, String)> {
        let rest = redis_key.strip_prefix("tenant:{")?;
        let (tenant, rest) = rest.split_once('}')?;
        let key = rest.strip_prefix(":data:")?;
        Some((tenant.to_owned(), key.to_owned()))
    }

    /// What Redis Cluster hashes of a key: the text between its first `{`
    /// and the next `}`, if that is not empty; else the whole key.
    fn hash_tag(redis_key: &str) -> &str {
        redis_key
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(tag, _)| tag)
            .filter(|tag| !tag.is_empty())
            .unwrap_or(redis_key)
    }

    /// Redis's glob matching for what `escape_glob` produces: literal
    /// characters, `\`-escaped ones, and `*`.
    fn glob_matches(pattern: &str, text: &str) -> bool {
        fn go(p: &[char], t: &[char]) -> bool {
            match p {
                [] => t.is_empty(),
                ['*', rest @ ..] => (0..=t.len()).any(|i| go(rest, &t[i..])),
                ['\\', c, rest @ ..] | [c, rest @ ..] => t.first() == Some(c) && go(rest, &t[1..]),
            }
        }
        let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
        go(&p, &t)
    }

    fn tenant() -> impl Strategy<Value = TenantId> {
        "[A-Za-z0-9_-]{1,64}".prop_map(|id| TenantId::new(id).unwrap())
    }

    /// Keys full of the characters that could confuse a key layout or a
    /// glob: separators, wildcards, escapes, braces, newlines, non-ASCII.
    fn nasty_key() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just(':'),
                Just('*'),
                Just('?'),
                Just('['),
                Just(']'),
                Just('\\'),
                Just('{'),
                Just('}'),
                Just('\n'),
                Just('\0'),
                Just('é'),
                Just('𝄞'),
                Just('a'),
                Just('d'),
                Just('t'),
            ],
            1..24,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    fn any_key() -> impl Strategy<Value = String> {
        prop_oneof![
            nasty_key(),
            "\\PC{1,40}",
            "tenant:[a-z]{1,5}:data:.{0,10}",
            "\\}?:data:\\{[a-z]{1,5}\\}:.{0,10}"
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn an_item_key_names_exactly_its_tenant_and_key(tenant in tenant(), key in any_key()) {
            let redis_key = TenantKeys::new(&tenant).data(&key);
            prop_assert_eq!(decode(&redis_key), Some((tenant.to_string(), key)));
        }

        #[test]
        fn every_key_of_a_tenant_is_tagged_with_it(tenant in tenant(), key in any_key()) {
            let keys = TenantKeys::new(&tenant);
            for redis_key in [keys.data(&key), keys.index(), keys.audit(), keys.api_key_rate(&key)] {
                prop_assert_eq!(hash_tag(&redis_key), tenant.as_str());
            }
        }

        #[test]
        fn different_items_never_share_a_redis_key(
            (t1, k1) in (tenant(), any_key()),
            (t2, k2) in (tenant(), any_key()),
        ) {
            prop_assume!((&t1, &k1) != (&t2, &k2));
            prop_assert_ne!(TenantKeys::new(&t1).data(&k1), TenantKeys::new(&t2).data(&k2));
        }

        #[test]
        fn an_escaped_prefix_matches_only_keys_that_start_with_it(
            prefix in any_key(),
            other in any_key(),
        ) {
            let pattern = format!("{}*", escape_glob(&prefix));
            let extended = format!("{prefix}{other}");
            prop_assert!(glob_matches(&pattern, &extended));
            prop_assert_eq!(glob_matches(&pattern, &other), other.starts_with(&prefix));
        }
    }

    #[test]
    fn tenant_ids_are_checked() {
        for good in ["a", "tenant1", "ACME_corp-2", &"x".repeat(64)] {
            assert!(TenantId::new(good).is_ok(), "{good}");
        }
        for bad in ["", "a:b", "a*", "a b", "ténant", &"x".repeat(65), "a\n"] {
            assert!(TenantId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_that_look_like_other_tenants_stay_in_their_own() {
        let mine = TenantKeys::new(&TenantId::new("alice").unwrap());
        for attack in [
            "x:tenant:bob:data:secret",
            "}:data:x",
            "{bob}",
            "../bob",
            "*",
            ":index",
            "\ntenant:bob:data:k",
        ] {
            let redis_key = mine.data(attack);
            assert!(redis_key.starts_with("tenant:{alice}:data:"), "{redis_key}");
            assert_eq!(decode(&redis_key).unwrap().0, "alice");
        }
        // The tenant's own bookkeeping keys are not item keys.
        for own in [mine.index(), mine.expiry(), mine.usage(), mine.audit()] {
            assert_eq!(decode(&own), None, "{own}");
        }
        assert!(check_key("").is_err());
        for unsafe_key in [
            "a\nb",
            "\u{1b}[2J",
            "a\u{7f}",
            "\u{85}",
            "x\u{202E}gnp.exe",
            "a\u{2028}b",
        ] {
            assert!(
                matches!(check_key(unsafe_key), Err(Error::InvalidKey { .. })),
                "{unsafe_key:?}"
            );
        }
        for fine in ["a b", "a/b:c*d", "é𝄞", "{tag}", "tab\\t"] {
            assert!(check_key(fine).is_ok(), "{fine:?}");
        }
        assert!(check_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(check_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
    }

    #[test]
    fn acl_rules_confine_a_user_to_its_tenant() {
        let rules = tenant_acl_rules(&TenantId::new("acme").unwrap());
        assert!(rules.contains(&"~tenant:{acme}:*".to_owned()));
        assert!(rules.contains(&"-scan".to_owned()));
        assert!(rules.contains(&"-flushall".to_owned()));
    }
}
