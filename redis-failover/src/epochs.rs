//! What sentinels answer: the votes for a master, and the newest config
//! epoch any of them reported with the nodes named in it, so that no
//! master an older epoch replaced is used again.

use std::collections::HashMap;

use crate::addr::NodeAddr;
use crate::error::NodeFailure;

/// A master as one sentinel, or enough of them, named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Named {
    pub(crate) node: NodeAddr,
    /// The epoch of the failover that made it master (0 if none yet).
    pub(crate) config_epoch: u64,
}

/// The sentinels' answers to one question: for each node named, by how
/// many, and the lowest epoch it was named in.
#[derive(Debug, Default)]
pub(crate) struct Votes {
    votes: HashMap<NodeAddr, (usize, u64)>,
}

impl Votes {
    pub(crate) fn add(&mut self, named: &Named) {
        // The lowest epoch among those naming a node is the one it became
        // master in: a leader finishing a failover names the old master
        // with the new epoch.
        let vote = self
            .votes
            .entry(named.node.clone())
            .or_insert((0, u64::MAX));
        vote.0 += 1;
        vote.1 = vote.1.min(named.config_epoch);
    }

    /// The master, once `required` sentinels name it and the `undecided`
    /// ones left could not outvote them.
    pub(crate) fn decided(&self, required: usize, undecided: usize) -> Option<Named> {
        let mut ranked: Vec<(&NodeAddr, usize, u64)> =
            self.votes.iter().map(|(m, (c, e))| (m, *c, *e)).collect();
        ranked.sort_by_key(|(_, count, _)| std::cmp::Reverse(*count));
        let [(leader, count, config_epoch), rest @ ..] = ranked.as_slice() else {
            return None;
        };
        let runner_up = rest.first().map_or(0, |(_, c, _)| *c);
        (*count >= required && *count > runner_up + undecided).then(|| Named {
            node: (*leader).clone(),
            config_epoch: *config_epoch,
        })
    }

    /// Whether more than one node was named.
    pub(crate) fn split(&self) -> bool {
        self.votes.len() > 1
    }

    /// Why no node won, node by node.
    pub(crate) fn undecided(self, required: usize) -> impl Iterator<Item = NodeFailure> {
        self.votes
            .into_iter()
            .map(move |(node, (count, _))| NodeFailure {
                node,
                reason: format!(
                    "named by {count} sentinels, {required} must agree and outvote the rest"
                ),
            })
    }
}

/// The newest config epoch any sentinel reported, and every node named in
/// it. (While the leader finishes a failover, it reports the new epoch with
/// the old address; the others soon report it with the new one.)
#[derive(Clone, Debug, Default)]
pub(crate) struct Newest {
    config_epoch: u64,
    nodes: Vec<NodeAddr>,
}

impl Newest {
    pub(crate) fn record(&mut self, named: &Named) {
        if named.config_epoch > self.config_epoch {
            self.config_epoch = named.config_epoch;
            self.nodes.clear();
        }
        if named.config_epoch == self.config_epoch && !self.nodes.contains(&named.node) {
            self.nodes.push(named.node.clone());
        }
    }

    /// `named`, unless a node other than it was named in a newer epoch:
    /// sentinels still naming it have not caught up.
    pub(crate) fn current(&self, named: Named) -> Result<Named, Vec<NodeFailure>> {
        match self.supersedes(&named.node, named.config_epoch) {
            Some(newer) => Err(vec![NodeFailure {
                node: named.node.clone(),
                reason: format!(
                    "named in epoch {}, but {newer} was named in epoch {}",
                    named.config_epoch, self.config_epoch
                ),
            }]),
            None => Ok(named),
        }
    }

    /// A node other than `node` named in a newer epoch than `config_epoch`:
    /// a failover decided since `node` was named.
    pub(crate) fn supersedes(&self, node: &NodeAddr, config_epoch: u64) -> Option<&NodeAddr> {
        if self.config_epoch <= config_epoch {
            return None;
        }
        self.nodes.iter().find(|n| *n != node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(port: u16, config_epoch: u64) -> Named {
        Named {
            node: NodeAddr::new("10.0.0.1", port).unwrap(),
            config_epoch,
        }
    }

    #[test]
    fn a_master_is_superseded_by_another_node_named_in_a_newer_epoch() {
        let (old, new) = (named(1, 0), named(2, 1));
        let mut newest = Newest::default();
        newest.record(&old);
        assert_eq!(newest.supersedes(&old.node, 0), None);
        // The leader finishing the failover: new epoch, old address.
        newest.record(&named(1, 1));
        newest.record(&new);
        assert_eq!(newest.supersedes(&old.node, 0), Some(&new.node));
        assert_eq!(newest.supersedes(&new.node, 1), None);
        // An answer from a sentinel that has not caught up changes nothing.
        newest.record(&old);
        assert_eq!(newest.supersedes(&old.node, 0), Some(&new.node));
    }

    #[test]
    fn a_master_is_decided_once_enough_agree_and_the_rest_cannot_outvote_them() {
        let mut votes = Votes::default();
        votes.add(&named(1, 3));
        assert_eq!(votes.decided(2, 2), None);
        votes.add(&named(2, 4));
        assert_eq!(votes.decided(2, 1), None);
        votes.add(&named(1, 5));
        // Two for port 1, one for port 2, none left: decided, in epoch 3.
        assert_eq!(votes.decided(2, 0), Some(named(1, 3)));
        assert!(votes.split());
        // With a fourth answer to come, it could still tie.
        assert_eq!(votes.decided(2, 1), None);
        let reasons: Vec<String> = votes.undecided(3).map(|f| f.reason).collect();
        assert_eq!(reasons.len(), 2);
    }
}
