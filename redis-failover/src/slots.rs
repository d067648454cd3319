//! Redis Cluster's key space: which slot a key hashes to, which key of a
//! command decides its slot, and the map from slots to masters.

use std::collections::HashSet;

use redis::{Cmd, Pipeline, Value};

use crate::addr::NodeAddr;
use crate::command;
use crate::error::Error;

/// How many slots the key space of a cluster has.
pub(crate) const SLOT_COUNT: usize = 16384;

/// Commands without keys: sent to any master.
const KEYLESS: &[&str] = &[
    "ACL",
    "ASKING",
    "CLIENT",
    "CLUSTER",
    "COMMAND",
    "CONFIG",
    "DBSIZE",
    "ECHO",
    "FLUSHALL",
    "FLUSHDB",
    "FUNCTION",
    "HELLO",
    "INFO",
    "KEYS",
    "LASTSAVE",
    "LATENCY",
    "PING",
    "PUBLISH",
    "RANDOMKEY",
    "ROLE",
    "SCAN",
    "SCRIPT",
    "TIME",
    "WAIT",
    "WAITAOF",
];

/// Commands whose key follows a subcommand (`OBJECT ENCODING key`).
const KEY_AFTER_SUBCOMMAND: &[&str] = &["MEMORY", "OBJECT", "XGROUP", "XINFO"];

/// Commands whose keys follow a key count (`EVAL script numkeys key ...`).
const KEYS_AFTER_COUNT: &[&str] = &[
    "EVAL",
    "EVALSHA",
    "EVALSHA_RO",
    "EVAL_RO",
    "FCALL",
    "FCALL_RO",
];

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the hash
/// Redis Cluster takes of a key modulo 16384.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot `key` hashes to: of its `{hash tag}` alone when it has a
/// non-empty one, so that tagged keys share a slot.
pub(crate) fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    // Modulo 16384 (a power of two).
    crc16(tagged.unwrap_or(key)) & 0x3FFF
}

/// The key that decides where `cmd` goes, `None` for a keyless command.
/// Runs on every cluster request: it neither allocates nor copies.
fn first_key(cmd: &Cmd) -> Option<&[u8]> {
    // A cursor argument counts as none.
    let mut args = command::args(cmd, b"");
    let name = args.next()?;
    let is = |list: &[&str]| command::is_one_of(name, list);
    if is(KEYLESS) {
        None
    } else if is(KEYS_AFTER_COUNT) {
        let _script = args.next()?;
        let count = std::str::from_utf8(args.next()?)
            .ok()?
            .parse::<u64>()
            .ok()?;
        if count == 0 { None } else { args.next() }
    } else if is(KEY_AFTER_SUBCOMMAND) {
        args.nth(1)
    } else if is(&["XREAD", "XREADGROUP"]) {
        args.skip_while(|a| !a.eq_ignore_ascii_case(b"STREAMS"))
            .nth(1)
    } else {
        args.next()
    }
}

/// The slot `cmd` must go to, `None` when any master will do.
pub(crate) fn slot_of_command(cmd: &Cmd) -> Option<u16> {
    first_key(cmd).map(slot_of)
}

/// The one slot all keyed commands of `pipeline` go to (`None`: no keys),
/// or a [`CrossSlot`](Error::CrossSlot) error naming the slots.
pub(crate) fn slot_of_pipeline(
    pipeline: &Pipeline,
    describe: impl Fn() -> String,
) -> Result<Option<u16>, Error> {
    let mut slots: Vec<u16> = pipeline.cmd_iter().filter_map(slot_of_command).collect();
    slots.sort_unstable();
    slots.dedup();
    match slots.as_slice() {
        [] => Ok(None),
        [slot] => Ok(Some(*slot)),
        _ => Err(Error::CrossSlot {
            command: describe(),
            slots,
        }),
    }
}

/// Which master serves each slot, as far as the client knows, and the
/// replicas of each master.
#[derive(Clone, Debug)]
pub(crate) struct SlotMap {
    /// Per slot, an index into `masters`.
    owners: Vec<Option<u16>>,
    masters: Vec<NodeAddr>,
    /// Per master (same index), its replicas as `CLUSTER SLOTS` listed them.
    replicas: Vec<Vec<NodeAddr>>,
}

impl SlotMap {
    /// A map that knows no slot.
    pub(crate) fn empty() -> Self {
        Self {
            owners: vec![None; SLOT_COUNT],
            masters: Vec::new(),
            replicas: Vec::new(),
        }
    }

    /// Every node of the map: masters and replicas.
    pub(crate) fn members(&self) -> HashSet<NodeAddr> {
        let replicas = self.replicas.iter().flatten();
        self.masters.iter().chain(replicas).cloned().collect()
    }

    /// Every master with its replicas.
    pub(crate) fn shards(&self) -> Vec<(NodeAddr, Vec<NodeAddr>)> {
        self.masters
            .iter()
            .cloned()
            .zip(self.replicas.iter().cloned())
            .collect()
    }

    /// The master of `slot`, if known.
    pub(crate) fn owner(&self, slot: u16) -> Option<&NodeAddr> {
        let index = (*self.owners.get(usize::from(slot))?)?;
        self.masters.get(usize::from(index))
    }

    /// Every master known, in the order first seen.
    pub(crate) fn masters(&self) -> &[NodeAddr] {
        &self.masters
    }

    /// How many slots have a known master.
    pub(crate) fn covered(&self) -> usize {
        self.owners.iter().filter(|owner| owner.is_some()).count()
    }

    /// Records that `node` serves `slot` (as a `MOVED` said).
    pub(crate) fn set(&mut self, slot: u16, node: NodeAddr) {
        let index = self.index_of(node);
        if let (Some(owner), Ok(index)) =
            (self.owners.get_mut(usize::from(slot)), u16::try_from(index))
        {
            *owner = Some(index);
        }
    }

    /// The index of the master `node`, added (without replicas) if new.
    fn index_of(&mut self, node: NodeAddr) -> usize {
        match self.masters.iter().position(|m| *m == node) {
            Some(index) => index,
            None => {
                self.masters.push(node);
                self.replicas.push(Vec::new());
                self.masters.len() - 1
            }
        }
    }

    /// For each master of `old` that serves no slot in this map, the master
    /// that serves here the first slot it served there: the shards whose
    /// master changed.
    pub(crate) fn successors(&self, old: &SlotMap) -> Vec<(NodeAddr, NodeAddr)> {
        let gone = old
            .masters
            .iter()
            .enumerate()
            .filter(|(_, master)| !self.masters.contains(master));
        gone.filter_map(|(index, master)| {
            let index = u16::try_from(index).ok()?;
            let slot = old.owners.iter().position(|owner| *owner == Some(index))?;
            let successor = self.owner(u16::try_from(slot).ok()?)?;
            Some((master.clone(), successor.clone()))
        })
        .collect()
    }

    /// The map a `CLUSTER SLOTS` reply from `asked` describes: ranges of
    /// `[first, last, [host, port, id, ...], replicas...]`. An empty host
    /// means the node asked (the node does not know its own address). The
    /// server leaves out replicas it considers failed.
    pub(crate) fn from_cluster_slots(reply: &Value, asked: &NodeAddr) -> Option<Self> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut map = Self::empty();
        for range in ranges {
            let Value::Array(fields) = range else {
                return None;
            };
            let (first, last) = (integer(fields.first()?)?, integer(fields.get(1)?)?);
            let master = node_of(fields.get(2)?, asked)?;
            if first > last || last >= SLOT_COUNT as i64 || first < 0 {
                return None;
            }
            for slot in first..=last {
                map.set(u16::try_from(slot).ok()?, master.clone());
            }
            let index = map.index_of(master);
            for entry in fields.get(3..).unwrap_or_default() {
                let replica = node_of(entry, asked)?;
                if !map.replicas[index].contains(&replica) {
                    map.replicas[index].push(replica);
                }
            }
        }
        Some(map)
    }
}

/// The address in a `CLUSTER SLOTS` node entry.
fn node_of(entry: &Value, asked: &NodeAddr) -> Option<NodeAddr> {
    let Value::Array(fields) = entry else {
        return None;
    };
    let host = match fields.first()? {
        Value::BulkString(host) => String::from_utf8(host.clone()).ok()?,
        Value::SimpleString(host) => host.clone(),
        _ => return None,
    };
    let host = if host.is_empty() || host == "?" {
        asked.host().to_owned()
    } else {
        host
    };
    let port = u16::try_from(integer(fields.get(1)?)?).ok()?;
    NodeAddr::new(host, port).ok()
}

fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_servers_hash() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    #[test]
    fn the_routing_key_is_found_by_command() {
        let key = |cmd: &Cmd| first_key(cmd).map(|k| String::from_utf8_lossy(k).into_owned());
        assert_eq!(key(redis::cmd("SET").arg("k").arg("v")), Some("k".into()));
        assert_eq!(
            key(redis::cmd("EVALSHA").arg("abc").arg(2).arg("a").arg("b")),
            Some("a".into())
        );
        assert_eq!(key(redis::cmd("EVAL").arg("return 1").arg(0)), None);
        assert_eq!(key(&redis::cmd("PING")), None);
        assert_eq!(
            key(redis::cmd("object").arg("ENCODING").arg("k")),
            Some("k".into())
        );
        assert_eq!(
            key(redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1)
                .arg("STREAMS")
                .arg("s")
                .arg("$")),
            Some("s".into())
        );
    }

    #[test]
    fn a_pipeline_keeps_to_one_slot_or_is_refused() {
        let mut same = redis::pipe();
        same.set("{t}a", 1).get("{t}b").cmd("PING");
        assert_eq!(
            slot_of_pipeline(&same, String::new).unwrap(),
            Some(slot_of(b"t"))
        );
        let mut crossed = redis::pipe();
        crossed.set("a", 1).set("b", 2);
        let error = slot_of_pipeline(&crossed, || "SET SET".into()).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::CrossSlot);
    }

    #[test]
    fn a_cluster_slots_reply_maps_every_range() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node("10.0.0.1", 7000),
            ]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16383),
                node("", 7001),
                node("r", 1),
            ]),
        ]);
        let asked = NodeAddr::new("seed", 7001).unwrap();
        let map = SlotMap::from_cluster_slots(&reply, &asked).unwrap();
        assert_eq!(map.covered(), SLOT_COUNT);
        assert_eq!(map.owner(0).unwrap().to_string(), "10.0.0.1:7000");
        assert_eq!(map.owner(16383).unwrap().to_string(), "seed:7001");
        assert_eq!(map.masters().len(), 2);
        let shards = map.shards();
        assert!(shards[0].1.is_empty());
        assert_eq!(shards[1].1, [NodeAddr::new("r", 1).unwrap()]);
    }

    #[test]
    fn a_shard_whose_slots_went_to_another_master_is_told() {
        let node = |port| NodeAddr::new("127.0.0.1", port).unwrap();
        let mut old = SlotMap::empty();
        old.set(0, node(1));
        old.set(1, node(2));
        old.set(2, node(2));
        let mut new = SlotMap::empty();
        new.set(0, node(1));
        new.set(1, node(3));
        new.set(2, node(3));
        assert_eq!(new.successors(&old), vec![(node(2), node(3))]);
        assert!(old.successors(&SlotMap::empty()).is_empty());
        assert!(new.successors(&new).is_empty());
    }
}
