//! `SCAN` over every master's keys: one master's keys are not the whole
//! key space of a cluster, so callers that look for keys by pattern
//! (layout checks, stream discovery) walk each master in turn.

use redis::Cmd;

use crate::addr::NodeAddr;
use crate::client::FailoverClient;
use crate::error::Result;

/// A walk with `SCAN` over the keys matching a pattern on every master,
/// from [`FailoverClient::scan_keys`]; read it with
/// [`next_batch`](Self::next_batch).
///
/// On a cluster it walks the masters of the slot map as it was when the
/// walk reached its first master: a slot that moves meanwhile may have its
/// keys seen twice or not at all, so callers that must not miss a key walk
/// again later (as any `SCAN` caller must for keys written meanwhile).
#[derive(Debug)]
#[must_use]
pub struct KeyScan {
    client: FailoverClient,
    pattern: String,
    key_type: Option<String>,
    count: u64,
    /// The masters left to walk, the current one last; `None` until the
    /// walk starts (and for the one master of the other modes: the client
    /// routes a keyless `SCAN` to it).
    nodes: Option<Vec<Option<NodeAddr>>>,
    cursor: u64,
}

impl FailoverClient {
    /// A walk over the keys matching `pattern` (`SCAN MATCH`) on every
    /// master: the one master, or each master of a cluster's slot map
    /// through [`query_on`](Self::query_on).
    pub fn scan_keys(&self, pattern: &str) -> KeyScan {
        KeyScan {
            client: self.clone(),
            pattern: pattern.to_owned(),
            key_type: None,
            count: 1000,
            nodes: None,
            cursor: 0,
        }
    }
}

impl KeyScan {
    /// Only keys of this type (`SCAN ... TYPE`, e.g. `stream`).
    pub fn of_type(mut self, key_type: &str) -> Self {
        self.key_type = Some(key_type.to_owned());
        self
    }

    /// How many keys each `SCAN` looks at (`COUNT`); 1000 by default.
    pub fn count(mut self, count: u64) -> Self {
        self.count = count.max(1);
        self
    }

    /// The keys of the next `SCAN` step (possibly none), or `None` once
    /// every master was walked. A failure leaves the walk where it was:
    /// calling again retries the same step.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<String>>> {
        if self.nodes.is_none() {
            self.nodes = Some(self.masters().await?);
        }
        let nodes = self.nodes.as_mut().expect("set above");
        let Some(node) = nodes.last() else {
            return Ok(None);
        };
        let mut command = Cmd::new();
        command
            .arg("SCAN")
            .arg(self.cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(self.count);
        if let Some(key_type) = &self.key_type {
            command.arg("TYPE").arg(key_type);
        }
        let (next, keys): (u64, Vec<String>) = match node {
            Some(node) => self.client.query_on(node, &command).await?,
            None => self.client.query_idempotent(&command).await?,
        };
        self.cursor = next;
        if next == 0 {
            nodes.pop();
        }
        Ok(Some(keys))
    }

    /// Every key the rest of the walk finds.
    pub async fn collect(mut self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        while let Some(keys) = self.next_batch().await? {
            found.extend(keys);
        }
        Ok(found)
    }

    /// The masters to walk, in the order [`next_batch`](Self::next_batch)
    /// takes them from the end.
    async fn masters(&self) -> Result<Vec<Option<NodeAddr>>> {
        if !self.client.is_cluster() {
            return Ok(vec![None]);
        }
        let mut masters = self.client.masters();
        if masters.is_empty() {
            // No slot map yet: a keyless request waits for one.
            let _: String = self.client.query_idempotent(&redis::cmd("PING")).await?;
            masters = self.client.masters();
        }
        Ok(masters.into_iter().rev().map(Some).collect())
    }
}
