//! Waiting on a topology: the polling loop every wait uses, the waits of
//! start-up (a node answering, replication streaming, each sentinel's
//! view), and the waits for a new master and for a replica to follow.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::Role;

use crate::error::{Error, Result};
use crate::node::{Exit, NodeId, NodeKind};
use crate::topology::{Topology, info_field};

/// How often waits look again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Why one attempt of a wait did not reach its goal.
pub(crate) enum Attempt {
    /// Not yet; `node` is the one to blame (its log goes into a timeout error).
    Pending { node: NodeId, reason: String },
    /// Give up at once.
    Fatal(Error),
}

pub(crate) fn pending(node: NodeId, reason: impl Into<String>) -> Attempt {
    Attempt::Pending {
        node,
        reason: reason.into(),
    }
}

/// Turns a command error into "not yet", keeping the whole cause chain.
pub(crate) fn pending_on(node: NodeId) -> impl Fn(Error) -> Attempt {
    move |error| {
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        pending(node, reason)
    }
}

impl Topology {
    /// Repeats `attempt` every [`POLL_INTERVAL`] until it succeeds, fails
    /// fatally, or `timeout` has passed. An attempt still running at the
    /// deadline is cut short and blamed on `blame`.
    pub(crate) async fn poll<T, F>(
        &self,
        what: &str,
        blame: NodeId,
        timeout: Duration,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T>
    where
        F: Future<Output = Result<T, Attempt>>,
    {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + timeout);
        let mut previous: Option<(NodeId, String)> = None;
        loop {
            let outcome = tokio::time::timeout_at(deadline, attempt())
                .await
                .unwrap_or_else(|_| {
                    // Cut short: the previous attempt's reason says more.
                    let (node, reason) = previous.take().unwrap_or((blame, String::new()));
                    Err(pending(
                        node,
                        format!("{reason} (next attempt still running at the deadline)"),
                    ))
                });
            match outcome {
                Ok(value) => return Ok(value),
                Err(Attempt::Fatal(error)) => return Err(error),
                Err(Attempt::Pending { node, reason }) if started.elapsed() >= timeout => {
                    let (log, log_tail) = self.log_of(node);
                    return Err(Error::Timeout {
                        what: what.to_owned(),
                        waited: started.elapsed(),
                        node,
                        reason,
                        log,
                        log_tail,
                    });
                }
                Err(Attempt::Pending { node, reason }) => {
                    previous = Some((node, reason));
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
        }
    }

    /// Waits until a master other than `old` is known: with sentinels, until
    /// every running sentinel names the same new master and that node's
    /// `ROLE` confirms it; without, until exactly one running data node other
    /// than `old` says it is master. Returns the new master.
    pub async fn wait_for_new_master(&self, old: NodeId, timeout: Duration) -> Result<NodeId> {
        let old_addr = self.addr(old);
        let what = format!("a master other than {old}");
        self.poll(&what, old, timeout, || async move {
            let sentinels = self.reachable(self.sentinels());
            let candidate = if sentinels.is_empty() && self.settings.sentinels == 0 {
                match self.masters().await.map_err(pending_on(old))?.as_slice() {
                    [only] if *only != old => *only,
                    masters => return Err(pending(old, format!("masters are {}", names(masters)))),
                }
            } else {
                let mut agreed = None;
                for &sentinel in &sentinels {
                    let addr = self
                        .sentinel_master_addr(sentinel)
                        .await
                        .map_err(pending_on(sentinel))?;
                    match (addr, agreed) {
                        (Some(addr), _) if addr == old_addr => {
                            return Err(pending(sentinel, format!("still names {old}")));
                        }
                        (Some(addr), None) => agreed = Some(addr),
                        (Some(addr), Some(first)) if addr == first => {}
                        (addr, _) => {
                            return Err(pending(
                                sentinel,
                                format!("names {addr:?}, others {agreed:?}"),
                            ));
                        }
                    }
                }
                let addr =
                    agreed.ok_or_else(|| pending(NodeId::sentinel(0), "no sentinel is running"))?;
                self.node_at(addr).ok_or_else(|| {
                    pending(
                        old,
                        format!("sentinels name {addr}, which is no node of this topology"),
                    )
                })?
            };
            match self.role(candidate).await.map_err(pending_on(candidate))? {
                Role::Primary { .. } => Ok(candidate),
                role => Err(pending(
                    candidate,
                    format!("named master, but ROLE says {role:?}"),
                )),
            }
        })
        .await
    }

    /// Waits until `replica` replicates from `master`: its `ROLE` names
    /// `master` with the link connected, and `master`'s `INFO replication`
    /// lists it as online.
    pub async fn wait_for_replica_of(
        &self,
        replica: NodeId,
        master: NodeId,
        timeout: Duration,
    ) -> Result<()> {
        Self::require_kind(replica, NodeKind::Data, "only a data node replicates")?;
        Self::require_kind(master, NodeKind::Data, "only a data node can be a master")?;
        let master_port = self.addr(master).port();
        let replica_port = self.addr(replica).port();
        let what = format!("{replica} to replicate from {master}");
        self.poll(&what, replica, timeout, || async move {
            match self.role(replica).await.map_err(pending_on(replica))? {
                Role::Replica {
                    primary_port,
                    replication_state,
                    ..
                } if primary_port == master_port && replication_state == "connected" => {}
                role => return Err(pending(replica, format!("ROLE says {role:?}"))),
            }
            let info: String = self
                .query(master, redis::cmd("INFO").arg("replication"))
                .await
                .map_err(pending_on(master))?;
            if online_replica_ports(&info).contains(&replica_port) {
                Ok(())
            } else {
                Err(pending(
                    master,
                    format!("does not list {replica} as online"),
                ))
            }
        })
        .await
    }

    /// Waits until a just-started node answers PING, and checks the answer
    /// comes from our process, not from another that holds the port.
    /// `Ok(false)` means the node exited because its port was taken.
    pub(crate) async fn wait_until_answering(&self, id: NodeId) -> Result<bool> {
        let what = "the node to answer PING";
        self.poll(what, id, self.settings.start_timeout, || async move {
            let (exit, pid) = {
                let mut nodes = self.lock();
                let process = nodes.get(id);
                (process.check_exit(), process.pid())
            };
            match exit {
                Some(Exit::PortTaken) => return Ok(false),
                Some(Exit::Failed(error)) => return Err(Attempt::Fatal(error)),
                None => {}
            }
            let info: String = self
                .query(id, redis::cmd("INFO").arg("server"))
                .await
                .map_err(pending_on(id))?;
            let answering = info_field(&info, "process_id").and_then(|p| p.parse::<u32>().ok());
            if answering == pid {
                Ok(true)
            } else {
                Err(pending(
                    id,
                    format!("port answered by process {answering:?}, not {pid:?}"),
                ))
            }
        })
        .await
    }

    /// Waits until every replica applies what `master` streams to it: a
    /// replica listed online after a full sync gets the stream only once it
    /// acknowledges the snapshot, up to a second later. A `PUBLISH` is
    /// propagated without touching any key, and `WAIT` counts the replicas
    /// that applied it.
    pub(crate) async fn wait_for_replication_stream(&self, master: NodeId) -> Result<()> {
        let replicas = self.settings.replicas;
        if replicas == 0 {
            return Ok(());
        }
        let what = "every replica to apply the replication stream";
        self.poll(what, master, self.settings.start_timeout, || async move {
            let mut connection = self.connection(master).await.map_err(pending_on(master))?;
            let (acked,): (usize,) = redis::pipe()
                .cmd("PUBLISH")
                .arg("redis-topology:replication-check")
                .arg("1")
                .ignore()
                .cmd("WAIT")
                .arg(replicas)
                .arg(100)
                .query_async(&mut connection)
                .await
                .map_err(|e| pending(master, e.to_string()))?;
            if acked >= replicas {
                Ok(())
            } else {
                Err(pending(
                    master,
                    format!("{acked} of {replicas} replicas applied the stream"),
                ))
            }
        })
        .await
    }

    /// Waits until `sentinel` reports `master` as a healthy master with every
    /// replica linked and every other sentinel known.
    pub(crate) async fn wait_for_sentinel_view(
        &self,
        sentinel: NodeId,
        master: NodeId,
    ) -> Result<()> {
        let name = &self.settings.master_name;
        let master_port = &self.addr(master).port().to_string();
        let replicas = self.settings.replicas;
        let other_sentinels = self.settings.sentinels - 1;
        let what = &format!(
            "{sentinel} to see the master, {replicas} replicas and {other_sentinels} other sentinels"
        );
        self.poll(what, sentinel, self.settings.start_timeout, || async move {
            let state: HashMap<String, String> = self
                .query(sentinel, redis::cmd("SENTINEL").arg("MASTER").arg(name))
                .await
                .map_err(pending_on(sentinel))?;
            let field = |key: &str| state.get(key).map(String::as_str).unwrap_or("");
            if field("port") != master_port || field("flags") != "master" {
                return Err(pending(
                    sentinel,
                    format!(
                        "master is {}:{} with flags {}",
                        field("ip"),
                        field("port"),
                        field("flags")
                    ),
                ));
            }
            if field("num-other-sentinels") != other_sentinels.to_string() {
                return Err(pending(
                    sentinel,
                    format!("knows {} other sentinels", field("num-other-sentinels")),
                ));
            }
            let known: Vec<HashMap<String, String>> = self
                .query(sentinel, redis::cmd("SENTINEL").arg("REPLICAS").arg(name))
                .await
                .map_err(pending_on(sentinel))?;
            let healthy = known
                .iter()
                .filter(|r| {
                    r.get("flags").is_some_and(|f| f == "slave")
                        && r.get("master-link-status").is_some_and(|s| s == "ok")
                })
                .count();
            if healthy != replicas {
                return Err(pending(
                    sentinel,
                    format!("sees {healthy} healthy replicas"),
                ));
            }
            Ok(())
        })
        .await
    }
}

/// `[redis-0, redis-2]`.
fn names(nodes: &[NodeId]) -> String {
    let names: Vec<String> = nodes.iter().map(NodeId::to_string).collect();
    format!("[{}]", names.join(", "))
}

/// The ports of the replicas `INFO replication` lists with `state=online`.
fn online_replica_ports(info: &str) -> Vec<u16> {
    info.lines()
        .filter(|line| {
            line.strip_prefix("slave")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .filter_map(|line| {
            let fields = line.split_once(':')?.1;
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            };
            (field("state")? == "online").then(|| field("port")?.parse().ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_replicas_are_read_from_info_replication() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=127.0.0.1,port=20001,state=online,offset=42,lag=0\r\n\
            slave1:ip=127.0.0.1,port=20002,state=wait_bgsave,offset=0,lag=0\r\n\
            master_failover_state:no-failover\r\n";
        assert_eq!(online_replica_ports(info), vec![20001]);
    }
}
