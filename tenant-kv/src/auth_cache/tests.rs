//! The cache's bookkeeping without Redis: when it serves, and which reads
//! it stores.

use super::*;

fn fields(value: &str) -> Fields {
    Arc::new(HashMap::from([("tenant".to_owned(), value.to_owned())]))
}

fn tracking(generation: u64) -> Option<Tracking> {
    Some(Tracking {
        generation,
        valid_until: Instant::now() + LEASE,
    })
}

/// A cache tracking generation 1, holding `user:a`.
fn serving() -> AuthCacheState {
    let state = AuthCacheState::new(3);
    state.reset(tracking(1));
    let ticket = state.lookup("user:a", Some(1)).unwrap_err().unwrap();
    state.store(ticket, "user:a", &fields("t"), Some(1));
    state
}

#[test]
fn serves_only_while_tracking_is_on_for_the_current_master() {
    let state = AuthCacheState::new(10);
    assert!(matches!(state.lookup("user:a", Some(1)), Err(None)));
    let state = serving();
    assert_eq!(state.lookup("user:a", Some(1)).ok(), Some(fields("t")));
    // A new master, before the tracking task has heard of it.
    assert!(matches!(state.lookup("user:a", Some(2)), Err(None)));
    assert!(matches!(state.lookup("user:a", None), Err(None)));
    state.reset(None);
    assert!(matches!(state.lookup("user:a", Some(1)), Err(None)));
    assert_eq!(state.stats_now(Some(1)).entries, 0);
}

#[test]
fn a_lapsed_lease_stops_serving_until_renewed() {
    let state = serving();
    state.lock().tracking.as_mut().unwrap().valid_until = Instant::now();
    assert!(matches!(state.lookup("user:a", Some(1)), Err(None)));
    state.renew(2, Instant::now());
    assert!(matches!(state.lookup("user:a", Some(1)), Err(None)));
    state.renew(1, Instant::now());
    assert!(state.lookup("user:a", Some(1)).is_ok());
}

#[test]
fn a_read_that_raced_with_an_invalidation_is_not_stored() {
    let state = serving();
    let ticket = state.lookup("user:b", Some(1)).unwrap_err().unwrap();
    // Any invalidation meanwhile, of this key or another.
    state.invalidate(["user:zzz"]);
    state.store(ticket, "user:b", &fields("old"), Some(1));
    assert!(state.lookup("user:b", Some(1)).is_err());
    assert!(state.lookup("user:a", Some(1)).is_ok());
    state.invalidate(["user:a"]);
    assert!(matches!(state.lookup("user:a", Some(1)), Err(Some(_))));
}

#[test]
fn a_read_begun_before_tracking_or_on_another_master_is_not_stored() {
    let state = serving();
    let ticket = state.lookup("user:b", Some(1)).unwrap_err().unwrap();
    state.reset(tracking(2));
    state.store(ticket, "user:b", &fields("old"), Some(2));
    assert!(state.lookup("user:b", Some(2)).is_err());
    // Served by a master installed while it was read.
    let ticket = state.lookup("user:b", Some(2)).unwrap_err().unwrap();
    state.store(ticket, "user:b", &fields("new"), Some(3));
    assert!(state.lookup("user:b", Some(2)).is_err());
}

#[test]
fn absent_records_are_not_stored_and_the_size_is_bounded() {
    let state = serving();
    let ticket = state.lookup("user:none", Some(1)).unwrap_err().unwrap();
    state.store(ticket, "user:none", &Arc::new(HashMap::new()), Some(1));
    assert!(state.lookup("user:none", Some(1)).is_err());
    for name in ["user:b", "user:c", "user:d", "user:e"] {
        let ticket = state.lookup(name, Some(1)).unwrap_err().unwrap();
        state.store(ticket, name, &fields(name), Some(1));
        assert!(state.lookup(name, Some(1)).is_ok());
    }
    assert_eq!(state.stats_now(Some(1)).entries, 3);
}

#[test]
fn a_flush_drops_everything_and_keeps_serving() {
    let state = serving();
    state.flush();
    assert!(matches!(state.lookup("user:a", Some(1)), Err(Some(_))));
    let stats = state.stats_now(Some(1));
    assert!(stats.serving);
    assert_eq!((stats.drops, stats.hits), (1, 0));
}
