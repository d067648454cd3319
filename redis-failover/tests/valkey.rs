//! What Valkey adds: `-REDIRECT` from a demoted master. Skipped (with a
//! message) where `valkey-server` is not installed.

use std::time::Duration;

use redis_failover::{Event, FailoverClient, Trigger};

mod common;
use common::{DEADLINE, pod_names, valkey};

/// A write that reaches the demoted master learns the new one from its
/// `-REDIRECT` and lands there, with no error for the caller and no
/// discovery round over the candidates; a script, which Valkey does not
/// redirect, still gets `READONLY` and is resent after a discovery.
#[tokio::test]
async fn a_redirected_write_lands_on_the_new_master_without_a_discovery() {
    let Some(builder) = valkey() else { return };
    let topology = builder.replicas(2).sentinels(0).start().await.unwrap();
    assert!(topology.server().has_redirect());
    let (resolver, names) = pod_names(&topology);
    // Re-checks so rare that only the write's refusal can reveal the change.
    let client = FailoverClient::candidates(names.clone())
        .resolver(resolver)
        .recheck_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    assert_eq!(
        client.wait_for_master(DEADLINE).await.unwrap().node,
        names[0]
    );
    client.set("k", "on the first master").await.unwrap();
    let before = client.metrics();
    let mut events = client.events();

    let promoted = topology.data_nodes()[2];
    topology.promote(promoted).await.unwrap();
    // Not idempotent: resent only because the REDIRECT proves it never ran.
    let value: i64 = client
        .query(redis::cmd("INCR").arg("counter"))
        .await
        .unwrap();
    assert_eq!(value, 1);
    let on_promoted: Option<i64> = topology
        .query(promoted, redis::cmd("GET").arg("counter"))
        .await
        .unwrap();
    assert_eq!(on_promoted, Some(1));
    // Installed under its candidate name, not the IP the redirect gave.
    assert_eq!(client.master().unwrap().node, names[2]);
    let after = client.metrics();
    assert_eq!(after.redirect_replies, before.redirect_replies + 1);
    assert_eq!(after.redirects_followed, before.redirects_followed + 1);
    assert_eq!(after.discoveries, before.discoveries, "no discovery round");
    assert_eq!(after.readonly_replies, before.readonly_replies);
    assert_eq!(switch_trigger(&mut events), Trigger::Redirect);

    // Back to the first: a script's write is refused with READONLY.
    topology.promote(topology.data_nodes()[0]).await.unwrap();
    let script = redis::cmd("EVAL")
        .arg("return redis.call('INCR', KEYS[1])")
        .arg(1)
        .arg("counter")
        .to_owned();
    // The first master replicated the INCR above before it was promoted
    // back only if it synced in time: the value is 1 or 2, on it alone.
    let value: i64 = client.query(&script).await.unwrap();
    assert!(value >= 1, "{value}");
    assert_eq!(client.master().unwrap().node, names[0]);
    let last = client.metrics();
    assert_eq!(last.readonly_replies, after.readonly_replies + 1);
    assert_eq!(last.redirects_followed, after.redirects_followed);
    assert_eq!(switch_trigger(&mut events), Trigger::ReadOnly);
}

/// The trigger of the next master switch among the events received.
fn switch_trigger(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Trigger {
    loop {
        match events.try_recv() {
            Ok(Event::MasterChanged { trigger, .. }) => return trigger,
            Ok(_) => {}
            Err(error) => panic!("no master switch: {error}"),
        }
    }
}
