//! Pub/sub on real local Redis Clusters (3 masters, 1 replica each): a
//! subscription on one master hears what any node publishes, one on each
//! master hears every shard's keyspace notifications, and both follow a
//! master killed and failed over, with a gap naming where they went.

mod common;

use common::{addr_of, cluster, cluster_seeds, key_in};
use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use redis_failover::{Delivery, FailoverClient, NodeAddr, Subscription};
use redis_topology::Cluster;

/// A failover after a kill takes about twice the 2 s node timeout; this
/// leaves room for a loaded 2-core machine.
const FAILOVER_BUDGET: Duration = Duration::from_secs(20);
/// How long a delivery may take: an expiry is seen by the server's active
/// expiry cycle (10 times a second), a new master once the slot map has it.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(10);
const EXPIRED: &str = "__keyevent@0__:expired";

fn client(cluster: &Cluster) -> FailoverClient {
    FailoverClient::cluster(cluster_seeds(cluster))
        .retry_budget(FAILOVER_BUDGET)
        .build()
        .unwrap()
}

fn notify_expired() -> redis::Cmd {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Ex")
        .clone()
}

/// Sets `key` to expire 100 ms from now.
async fn set_expiring(client: &FailoverClient, key: &str) {
    let set = redis::cmd("SET").arg(key).arg(1).arg("PX").arg(100).clone();
    client.query::<()>(&set).await.unwrap();
}

/// The next delivery, within the deadline.
async fn next_delivery(subscription: &mut Subscription) -> Delivery {
    tokio::time::timeout(DELIVERY_DEADLINE, subscription.next())
        .await
        .expect("nothing delivered in time")
        .expect("the subscription ended")
}

/// Skips deliveries until a message whose payload is `payload`.
async fn message(subscription: &mut Subscription, payload: &str) {
    loop {
        if let Delivery::Message(message) = next_delivery(subscription).await
            && message.get_payload::<String>().unwrap() == payload
        {
            return;
        }
    }
}

/// Skips deliveries until a gap naming `node`.
async fn gap_on(subscription: &mut Subscription, node: &NodeAddr) {
    loop {
        if let Delivery::Gap(gap) = next_delivery(subscription).await
            && &gap.node == node
        {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscription_hears_every_node_and_each_master_its_expiries() {
    let cluster = cluster().await;
    let client = client(&cluster);
    let mut news = client
        .subscribe(["news"], Vec::<String>::new())
        .await
        .unwrap();
    // PUBLISH on any node, replicas too, reaches every node of a cluster.
    for node in cluster.nodes() {
        let payload = format!("from {node}");
        let publish = redis::cmd("PUBLISH").arg("news").arg(&payload).clone();
        let _: u64 = cluster.query(node, &publish).await.unwrap();
        message(&mut news, &payload).await;
    }

    let masters = client.masters();
    assert_eq!(masters.len(), 3);
    for master in &masters {
        client
            .query_on::<()>(master, &notify_expired())
            .await
            .unwrap();
    }
    let mut expired = client
        .subscribe_each_master([EXPIRED], Vec::<String>::new())
        .await
        .unwrap();
    let mut waiting = HashSet::new();
    for (i, shard) in cluster.shards().await.unwrap().iter().enumerate() {
        let key = key_in(shard, &format!("expiring-{i}"));
        set_expiring(&client, &key).await;
        waiting.insert(key);
    }
    // Each master tells only its own subscribers of its own keys.
    while !waiting.is_empty() {
        match next_delivery(&mut expired).await {
            Delivery::Message(message) => {
                waiting.remove(&message.get_payload::<String>().unwrap());
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_follow_a_killed_master_to_its_successor() {
    let cluster = cluster().await;
    // Replicas do not inherit a CONFIG SET: the successor needs its own.
    for node in cluster.nodes() {
        cluster.query::<()>(node, &notify_expired()).await.unwrap();
    }
    let client = client(&cluster);
    let mut news = client
        .subscribe(["news"], Vec::<String>::new())
        .await
        .unwrap();
    let mut expired = client
        .subscribe_each_master([EXPIRED], Vec::<String>::new())
        .await
        .unwrap();
    // The master `news` is on: both subscriptions lose a node.
    let shards = cluster.shards().await.unwrap();
    let victim = shards
        .iter()
        .find(|s| &addr_of(&cluster, s.master) == news.first_node())
        .unwrap()
        .clone();

    cluster.kill(victim.master).unwrap();
    let new = cluster
        .wait_for_failover(victim.master, FAILOVER_BUDGET)
        .await
        .unwrap();
    let new = addr_of(&cluster, new);
    // The successor may have expired keys before it was subscribed.
    gap_on(&mut expired, &new).await;
    let key = key_in(&victim, "after-failover");
    set_expiring(&client, &key).await;
    message(&mut expired, &key).await;

    // `news` moved to another master, which hears what any node publishes.
    let Delivery::Gap(gap) = next_delivery(&mut news).await else {
        panic!("no gap after the subscription's master was killed");
    };
    assert_ne!(&gap.node, &addr_of(&cluster, victim.master), "{gap:?}");
    let publish = redis::cmd("PUBLISH").arg("news").arg("after").clone();
    let _: u64 = cluster.query(victim.replicas[0], &publish).await.unwrap();
    message(&mut news, "after").await;
}
