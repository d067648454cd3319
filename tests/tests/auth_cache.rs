//! Two server instances on one topology, each with its authentication
//! cache: a user disabled, or an API key revoked, through instance A is
//! refused by instance B, which had it cached, within the master's
//! invalidation push. The delays are printed (`--nocapture`).

use std::time::{Duration, Instant};

use e2e_tests::{Http, start};
use hyper::StatusCode;
use serde_json::json;
use server::System;
use server::dev::{DevSystem, topology_settings};
use tenant_kv::Actor;

const DEADLINE: Duration = Duration::from_secs(30);
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

/// Instance B: a second server on A's topology, sharing its JWT secret.
async fn second_instance(a: &DevSystem) -> System {
    let mut settings = topology_settings(&a.topology, []).unwrap();
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings.admin_listen = None;
    settings.log_buffer = false;
    settings.jwt.secret = Some(SECRET.to_vec());
    System::builder(settings).start().await.unwrap()
}

/// Sends `GET target` through `http` until the answer is `status` (with no
/// sleep: each request is what is timed); returns how long that took.
async fn time_until(http: &Http, target: &str, status: StatusCode) -> Duration {
    let started = Instant::now();
    loop {
        if http.get(target).await.status == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{target} never answered {status}"
        );
    }
}

/// Sends `GET target` until instance B answers it from its cache.
async fn until_cached(b: &System, http: &Http, target: &str) {
    let hits = b.store().auth_cache_stats().hits;
    let started = Instant::now();
    while b.store().auth_cache_stats().hits == hits {
        assert_eq!(http.get(target).await.status, StatusCode::OK);
        assert!(started.elapsed() < DEADLINE, "B never cached {target}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_instance_is_refused_by_the_other() {
    let (a, http_a) = start(|options| options.jwt_secret = Some(SECRET.to_vec())).await;
    let b = second_instance(&a).await;
    let http_b = Http::new(b.local_addr());

    // A token from A, used on B.
    let token = http_a.token("user1", &a.password).await;
    let user1_b = http_b.bearer(&token);
    until_cached(&b, &user1_b, "/users/me").await;
    a.store
        .users()
        .set_disabled("user1", true, &Actor::system())
        .await
        .unwrap();
    let disabled = time_until(&user1_b, "/users/me", StatusCode::UNAUTHORIZED).await;

    // A key made through A, used on B, revoked through A.
    let user2_a = http_a.login("user2", &a.password).await;
    let made = user2_a
        .json(
            "POST",
            "/api-keys",
            &json!({"name": "k", "scopes": ["read", "list"]}),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{made:?}");
    let (key, id) = (
        made.json()["api_key"].clone(),
        made.json()["key_id"].clone(),
    );
    let key_b = http_b.with_header("x-api-key", key.as_str().unwrap());
    assert_eq!(key_b.get("/data?prefix=").await.status, StatusCode::OK);
    until_cached(&b, &key_b, "/data?prefix=").await;
    let revoked = user2_a
        .delete(&format!("/api-keys/{}", id.as_str().unwrap()))
        .await;
    assert!(revoked.status.is_success(), "{revoked:?}");
    let refused = time_until(&key_b, "/data?prefix=", StatusCode::UNAUTHORIZED).await;

    let server = a.topology.server();
    println!(
        "{:?} {:?}, two instances over HTTP: user disabled on A refused by B after {disabled:?}; key revoked on A refused by B after {refused:?}; B's cache {:?}",
        server.kind(),
        server.version(),
        b.store().auth_cache_stats()
    );
    b.shutdown().await;
    a.shutdown().await;
}
