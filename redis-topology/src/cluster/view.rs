//! Hash slots, and what one node says of the cluster in `CLUSTER NODES`.

use std::collections::BTreeSet;
use std::net::SocketAddr;

/// How many hash slots a Redis Cluster has.
pub const SLOT_COUNT: u16 = 16384;

/// The hash slot of a key, as a cluster node computes it (`CLUSTER KEYSLOT`):
/// CRC16 of the key modulo 16384, where a key holding a non-empty hash tag
/// (`{...}`, the first `{` and the first `}` after it) is hashed on the tag
/// alone, so that `{user1000}.following` and `{user1000}.followers` share a
/// slot.
pub fn slot_of(key: impl AsRef<[u8]>) -> u16 {
    let key = key.as_ref();
    crc16(hash_tag(key).unwrap_or(key)) % SLOT_COUNT
}

/// What lies between the first `{` and the first `}` after it, if that is
/// not empty.
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0, no reflection, no
/// final XOR), the variant Redis Cluster specifies. Bit by bit: keys are
/// short, and a table would be 512 bytes of constants to get right.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0, |crc, &byte| {
        (0..8).fold(crc ^ (u16::from(byte) << 8), |crc, _| {
            if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            }
        })
    })
}

/// A range of slots `(first, last)`, both included, and its master's cluster node id.
pub(crate) type Owned<'a> = (u16, u16, &'a str);

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The node's 40-character cluster id.
    pub(crate) id: String,
    /// Where clients reach it; `None` while the address is unknown.
    pub(crate) addr: Option<SocketAddr>,
    /// Its cluster bus port.
    pub(crate) bus_port: Option<u16>,
    flags: Vec<String>,
    /// For a replica, the cluster id of its master.
    pub(crate) master_id: Option<String>,
    /// The slots it serves, as `(first, last)` ranges.
    pub(crate) slots: Vec<(u16, u16)>,
    /// Whether it lists a slot being imported or migrated (`[slot-<-id]`, `[slot->-id]`).
    pub(crate) open_slots: bool,
}

impl Entry {
    fn parse(line: &str) -> Result<Self, String> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [
            id,
            addr,
            flags,
            master,
            _ping,
            _pong,
            _epoch,
            _link,
            slots @ ..,
        ] = &fields[..]
        else {
            return Err(format!("CLUSTER NODES line {line:?} has too few fields"));
        };
        // `127.0.0.1:30001@40001` in 6.2, with `,hostname` appended since 7.0.
        let addr = addr.split(',').next().unwrap_or_default();
        let (client, bus) = addr.split_once('@').unwrap_or((addr, ""));
        let mut entry = Self {
            id: (*id).to_owned(),
            addr: client.parse().ok(),
            bus_port: bus.parse().ok(),
            flags: flags.split(',').map(str::to_owned).collect(),
            master_id: (*master != "-").then(|| (*master).to_owned()),
            slots: Vec::new(),
            open_slots: false,
        };
        for slot in slots {
            if slot.starts_with('[') {
                entry.open_slots = true;
                continue;
            }
            let (first, last) = slot.split_once('-').unwrap_or((slot, slot));
            let parse = |s: &str| {
                s.parse::<u16>()
                    .ok()
                    .filter(|&n| n < SLOT_COUNT)
                    .ok_or_else(|| format!("bad slot {slot:?} in CLUSTER NODES line {line:?}"))
            };
            entry.slots.push((parse(first)?, parse(last)?));
        }
        Ok(entry)
    }

    pub(crate) fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    pub(crate) fn is_master(&self) -> bool {
        self.has_flag("master")
    }

    pub(crate) fn is_replica(&self) -> bool {
        self.has_flag("slave")
    }

    pub(crate) fn owns(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(first, last)| (first..=last).contains(&slot))
    }
}

/// One node's `CLUSTER NODES`: every node it knows, itself included.
#[derive(Debug, Clone)]
pub(crate) struct View {
    pub(crate) entries: Vec<Entry>,
}

impl View {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let entries = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(Entry::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { entries })
    }

    /// The line of the node that answered.
    pub(crate) fn myself(&self) -> Option<&Entry> {
        self.entries.iter().find(|e| e.has_flag("myself"))
    }

    pub(crate) fn entry(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Every node known, with the master it replicates from (`None` for a master).
    pub(crate) fn roles(&self) -> BTreeSet<(&str, Option<&str>)> {
        self.entries
            .iter()
            .map(|e| (e.id.as_str(), e.master_id.as_deref()))
            .collect()
    }

    /// Every slot range with its master, in slot order.
    pub(crate) fn slot_map(&self) -> Vec<Owned<'_>> {
        let mut map: Vec<Owned<'_>> = self
            .entries
            .iter()
            .filter(|e| e.is_master())
            .flat_map(|e| e.slots.iter().map(|&(first, last)| (first, last, &*e.id)))
            .collect();
        map.sort_unstable();
        // Adjacent ranges of one master read the same however a node splits them.
        let mut merged: Vec<Owned<'_>> = Vec::with_capacity(map.len());
        for (first, last, id) in map {
            match merged.last_mut() {
                Some((_, end, owner))
                    if *owner == id && u32::from(*end) + 1 == u32::from(first) =>
                {
                    *end = last;
                }
                _ => merged.push((first, last, id)),
            }
        }
        merged
    }

    /// The master serving `slot`.
    pub(crate) fn owner(&self, slot: u16) -> Option<&Entry> {
        self.entries.iter().find(|e| e.is_master() && e.owns(slot))
    }

    pub(crate) fn has_open_slots(&self) -> bool {
        self.entries.iter().any(|e| e.open_slots)
    }
}

/// The first range of slots no master serves in a map from [`View::slot_map`].
pub(crate) fn first_gap(map: &[Owned<'_>]) -> Option<(u16, u16)> {
    let mut next = 0u16;
    for &(first, last, _) in map {
        if first > next {
            return Some((next, first - 1));
        }
        next = next.max(last.saturating_add(1));
    }
    (next < SLOT_COUNT).then_some((next, SLOT_COUNT - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_the_xmodem_variant() {
        // The check value of CRC-16/XMODEM, and the example of the cluster spec.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn slots_match_the_servers_keyslot() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("bar"), 5061);
        assert_eq!(slot_of("hello"), 866);
        assert_eq!(slot_of(""), 0);
    }

    #[test]
    fn hash_tags_select_what_is_hashed() {
        assert_eq!(
            slot_of("{user1000}.following"),
            slot_of("{user1000}.followers")
        );
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        // The first `{` and the first `}` after it; an empty tag hashes the whole key.
        assert_eq!(slot_of("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOT_COUNT);
        assert_eq!(slot_of("foo{{bar}}zap"), slot_of("{bar"));
        assert_eq!(slot_of("foo{bar}{zap}"), slot_of("bar"));
        assert_eq!(slot_of("no}tag{"), crc16(b"no}tag{") % SLOT_COUNT);
    }

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-a slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383 [93-<-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
6ec23923021cf3ffec47632106199cb7f496ce01 :0@0 master,fail,noaddr - 1426238316232 0 5 disconnected
";

    #[test]
    fn cluster_nodes_lines_are_parsed() {
        let view = View::parse(NODES).unwrap();
        let me = view.myself().unwrap();
        assert_eq!(me.addr, Some("127.0.0.1:30001".parse().unwrap()));
        assert_eq!(me.bus_port, Some(31001));
        assert!(me.is_master() && me.owns(0) && me.owns(5460) && !me.owns(5461));
        let replica = &view.entries[0];
        assert!(replica.is_replica());
        assert_eq!(replica.master_id.as_deref(), Some(me.id.as_str()));
        assert_eq!(replica.addr, Some("127.0.0.1:30004".parse().unwrap()));
        assert!(view.has_open_slots());
        assert_eq!(view.entries[4].addr, None);
        assert!(view.entries[4].has_flag("fail"));
        assert_eq!(view.owner(12000).unwrap().id, view.entries[2].id);
        let roles = view.roles();
        assert_eq!(roles.len(), 5);
        assert!(roles.contains(&(replica.id.as_str(), Some(me.id.as_str()))));
        assert!(roles.contains(&(me.id.as_str(), None)));
        assert!(View::parse("abc 127.0.0.1:1@2 master").is_err());
        assert!(View::parse(&NODES.replace("5461-10922", "5461-16384")).is_err());
    }

    #[test]
    fn slot_maps_are_merged_and_gaps_found() {
        let view = View::parse(NODES).unwrap();
        let map = view.slot_map();
        assert_eq!(map.len(), 3);
        assert_eq!((map[0].0, map[0].1), (0, 5460));
        assert_eq!(first_gap(&map), None);
        let split = View::parse(&NODES.replace("0-5460", "0-99 100-5460")).unwrap();
        assert_eq!(split.slot_map(), map);
        let holed = View::parse(&NODES.replace("0-5460", "0-99 200-5460")).unwrap();
        assert_eq!(first_gap(&holed.slot_map()), Some((100, 199)));
        let short = View::parse(&NODES.replace("10923-16383", "10923-16000")).unwrap();
        assert_eq!(first_gap(&short.slot_map()), Some((16001, 16383)));
        assert_eq!(first_gap(&[]), Some((0, 16383)));
    }
}
