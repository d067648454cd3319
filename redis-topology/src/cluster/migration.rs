//! Moving slots, keys included, between masters: one slot, or the many of
//! a rebalance.
//!
//! The protocol is the one `redis-cli --cluster reshard` follows, with the
//! `CLUSTER SETSLOT` commands of many slots pipelined over several
//! connections: `valkey-cli` 8.0 moves one slot after the other, 5-10 ms
//! each, so its rebalance of a fourth shard (4096 slots) took 35 s on an
//! idle 2-core machine.

use redis::aio::MultiplexedConnection;

use super::Cluster;
use super::view::{Entry, SLOT_COUNT, View};
use crate::error::{Error, Result};
use crate::node::NodeId;

/// How many keys one `MIGRATE` moves.
const MIGRATE_BATCH: usize = 100;
/// How long one `MIGRATE` may wait for the target, in milliseconds.
const MIGRATE_TIMEOUT_MS: u64 = 1500;
/// How many `CLUSTER SETSLOT`s one pipeline carries.
const SETSLOTS_PER_PIPELINE: usize = 64;
/// Over how many connections to a master the pipelines are spread.
const PARALLEL_SETSLOTS: usize = 16;
/// How many slots are moved together: set importing, migrating, then
/// owned by the target.
const SETSLOT_BATCH: usize = SETSLOTS_PER_PIPELINE * PARALLEL_SETSLOTS;

/// A group of slots to move from one master to another.
#[derive(Debug, PartialEq, Eq)]
struct Move {
    from: usize,
    to: usize,
    slots: Vec<u16>,
}

impl Cluster {
    /// Moves `slot`, keys included, to the master `to`, as `redis-cli
    /// --cluster reshard` does: `CLUSTER SETSLOT IMPORTING` on `to` and
    /// `MIGRATING` on the slot's master, `MIGRATE` of its keys in batches,
    /// then `CLUSTER SETSLOT NODE` on `to`, the old master and every other
    /// master. Returns once the cluster is stable again.
    ///
    /// Meanwhile clients get `ASK` for keys already moved (and new keys),
    /// and `MOVED` afterwards: no key is lost. Moving a slot to the master
    /// already serving it does nothing.
    ///
    /// # Panics
    ///
    /// If `slot` is not below [`SLOT_COUNT`].
    pub async fn move_slot(&self, slot: u16, to: NodeId) -> Result<()> {
        assert!(slot < SLOT_COUNT, "slot {slot} does not exist");
        let view = self.view(to).await?;
        let target = view
            .myself()
            .filter(|me| me.is_master())
            .ok_or(Error::WrongKind {
                node: to,
                reason: "only a master can serve slots",
            })?;
        let source = view.owner(slot).ok_or_else(|| Error::ClusterState {
            node: to,
            reason: format!("no master serves slot {slot}"),
        })?;
        if source.id == target.id {
            return Ok(());
        }
        self.move_slots(to, &view, (source, target), &[slot])
            .await?;
        self.wait_stable(self.settings.wait_timeout).await
    }

    /// Spreads the slots evenly over every master, those serving none
    /// included (as `redis-cli --cluster rebalance
    /// --cluster-use-empty-masters` does), moving keys with them as
    /// [`move_slot`](Self::move_slot) does, and waits until the cluster is
    /// stable. Every master serving slots must be running.
    pub async fn rebalance(&self) -> Result<()> {
        let (seen_by, view) = self.any_view().await?;
        let masters: Vec<&Entry> = view
            .entries
            .iter()
            .filter(|e| e.is_master() && !e.has_flag("fail"))
            .collect();
        let owned: Vec<Vec<u16>> = masters
            .iter()
            .map(|m| m.slots.iter().flat_map(|&(a, b)| a..=b).collect())
            .collect();
        for Move { from, to, slots } in plan(&owned) {
            self.move_slots(seen_by, &view, (masters[from], masters[to]), &slots)
                .await?;
        }
        self.wait_stable(self.settings.wait_timeout).await
    }

    /// Moves `slots`, all served by `source`, with their keys to `target`
    /// (`view` is `seen_by`'s), `SETSLOT_BATCH` slots at a time.
    async fn move_slots(
        &self,
        seen_by: NodeId,
        view: &View,
        (source, target): (&Entry, &Entry),
        slots: &[u16],
    ) -> Result<()> {
        let (from, to) = (
            self.node_of(seen_by, source)?,
            self.node_of(seen_by, target)?,
        );
        let mut others = Vec::new();
        for master in view.entries.iter().filter(|e| e.is_master()) {
            // A failed master may have no address any more; it learns the
            // new owner from the others when it comes back.
            let Ok(node) = self.node_of(seen_by, master) else {
                continue;
            };
            if ![from, to].contains(&node) && self.topology.reachable(vec![node]) == [node] {
                others.push(node);
            }
        }
        // One connection per master for one slot, up to 16 for a rebalance.
        let parallel = slots
            .len()
            .div_ceil(SETSLOTS_PER_PIPELINE)
            .clamp(1, PARALLEL_SETSLOTS);
        let source_links = Links::open(self, from, parallel).await?;
        let target_links = Links::open(self, to, parallel).await?;
        let mut other_links = Vec::with_capacity(others.len());
        for &other in &others {
            other_links.push(Links::open(self, other, parallel).await?);
        }
        let mut source_connection = source_links.connections[0].clone();
        for batch in slots.chunks(SETSLOT_BATCH) {
            target_links.setslot(batch, "IMPORTING", &source.id).await?;
            source_links.setslot(batch, "MIGRATING", &target.id).await?;
            self.migrate_keys(from, &mut source_connection, to, batch)
                .await?;
            // The new owner first: it takes a new epoch, which wins everywhere else.
            target_links.setslot(batch, "NODE", &target.id).await?;
            source_links.setslot(batch, "NODE", &target.id).await?;
            for links in &other_links {
                links.setslot(batch, "NODE", &target.id).await?;
            }
        }
        Ok(())
    }

    /// Moves every key of `slots` from `from` to `to`, `MIGRATE_BATCH` at a
    /// time. The slots are migrating: no new key can appear in them on
    /// `from`, so emptying each once is enough.
    async fn migrate_keys(
        &self,
        from: NodeId,
        connection: &mut MultiplexedConnection,
        to: NodeId,
        slots: &[u16],
    ) -> Result<()> {
        let addr = self.addr(to);
        let redis_error = |source| Error::Redis { node: from, source };
        for &slot in slots {
            loop {
                let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(MIGRATE_BATCH)
                    .query_async(connection)
                    .await
                    .map_err(redis_error)?;
                if keys.is_empty() {
                    break;
                }
                redis::cmd("MIGRATE")
                    .arg(addr.ip().to_string())
                    .arg(addr.port())
                    .arg("")
                    .arg(0)
                    .arg(MIGRATE_TIMEOUT_MS)
                    .arg("KEYS")
                    .arg(keys)
                    .query_async::<()>(connection)
                    .await
                    .map_err(redis_error)?;
            }
        }
        Ok(())
    }
}

/// Connections to one master, over which the `CLUSTER SETSLOT`s of a batch
/// are spread. Valkey answers a `SETSLOT` only once the master's replicas
/// have applied it: one connection waits for each in turn (about 2 ms on an
/// idle machine, 4096 slots taking half a minute), several wait together.
///
/// A pipeline's reply may thus take many replica round trips (64 of 30 ms
/// each on a loaded machine exceed 2 s), so these connections wait up to the
/// cluster's `wait_timeout`, the bound of the whole change; Valkey bounds
/// each `SETSLOT`'s wait for replicas itself.
struct Links {
    node: NodeId,
    connections: Vec<MultiplexedConnection>,
}

impl Links {
    async fn open(cluster: &Cluster, node: NodeId, count: usize) -> Result<Self> {
        let mut connections = Vec::with_capacity(count);
        for _ in 0..count {
            let waiting = cluster.settings.wait_timeout;
            connections.push(cluster.topology.connection_waiting(node, waiting).await?);
        }
        Ok(Self { node, connections })
    }

    /// `CLUSTER SETSLOT <slot> <state> <id>` for each slot, pipelined,
    /// spread over the connections.
    async fn setslot(&self, slots: &[u16], state: &str, id: &str) -> Result<()> {
        let per_connection = slots.len().div_ceil(self.connections.len()).max(1);
        let mut tasks = tokio::task::JoinSet::new();
        for (part, connection) in slots.chunks(per_connection).zip(&self.connections) {
            let mut pipe = redis::pipe();
            for &slot in part {
                pipe.cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg(state)
                    .arg(id)
                    .ignore();
            }
            let mut connection = connection.clone();
            tasks.spawn(async move { pipe.query_async::<()>(&mut connection).await });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a SETSLOT task neither panics nor is cancelled")
                .map_err(|source| Error::Redis {
                    node: self.node,
                    source,
                })?;
        }
        Ok(())
    }
}

/// The moves that leave every master (`owned[i]` are the slots master `i`
/// serves) with an even share: 16384 / n slots, one more for the
/// 16384 % n masters serving the most. Masters above their share give
/// their highest slots.
fn plan(owned: &[Vec<u16>]) -> Vec<Move> {
    let n = owned.len();
    if n == 0 {
        return Vec::new();
    }
    let (share, extra) = (usize::from(SLOT_COUNT) / n, usize::from(SLOT_COUNT) % n);
    let mut by_size: Vec<usize> = (0..n).collect();
    by_size.sort_by_key(|&i| std::cmp::Reverse(owned[i].len()));
    let mut target = vec![share; n];
    for &i in &by_size[..extra] {
        target[i] += 1;
    }
    // Slots given up, by giver; and how many each taker lacks.
    let mut given: Vec<(usize, Vec<u16>)> = (0..n)
        .filter(|&i| owned[i].len() > target[i])
        .map(|i| {
            let mut slots = owned[i].clone();
            slots.sort_unstable();
            (i, slots.split_off(target[i]))
        })
        .collect();
    let mut moves = Vec::new();
    for taker in (0..n).filter(|&i| owned[i].len() < target[i]) {
        let mut lacking = target[taker] - owned[taker].len();
        for (giver, slots) in &mut given {
            if lacking == 0 {
                break;
            }
            let count = lacking.min(slots.len());
            if count > 0 {
                let slots = slots.split_off(slots.len() - count);
                lacking -= count;
                moves.push(Move {
                    from: *giver,
                    to: taker,
                    slots,
                });
            }
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts_after(owned: &[Vec<u16>], moves: &[Move]) -> Vec<usize> {
        let mut counts: Vec<usize> = owned.iter().map(Vec::len).collect();
        for m in moves {
            counts[m.from] -= m.slots.len();
            counts[m.to] += m.slots.len();
            assert!(m.slots.iter().all(|s| owned[m.from].contains(s)));
        }
        counts
    }

    #[test]
    fn an_empty_fourth_master_gets_a_quarter_of_the_slots() {
        let owned = vec![
            (0..=5460).collect(),
            (5461..=10922).collect(),
            (10923..=16383).collect(),
            Vec::new(),
        ];
        let moves = plan(&owned);
        assert_eq!(moves.len(), 3);
        assert!(moves.iter().all(|m| m.to == 3));
        assert_eq!(counts_after(&owned, &moves), vec![4096; 4]);
        // The givers keep their lowest slots.
        assert_eq!(moves[0].slots.first(), Some(&4096));
    }

    #[test]
    fn uneven_masters_are_evened_out_and_even_ones_left_alone() {
        let owned: Vec<Vec<u16>> = vec![(0..10000).collect(), (10000..16384).collect()];
        let moves = plan(&owned);
        assert_eq!(counts_after(&owned, &moves), vec![8192, 8192]);
        assert_eq!(moves.len(), 1);
        let owned: Vec<Vec<u16>> = vec![
            (0..5462).collect(),
            (5462..10923).collect(),
            (10923..16384).collect(),
        ];
        assert_eq!(plan(&owned), Vec::new());
        assert_eq!(plan(&[]), Vec::new());
    }
}
