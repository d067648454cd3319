//! The service through faults: a kill -9 of the Redis master during a
//! request loop, Redis gone for longer than the retry budget, and a
//! graceful shutdown with a request in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::Http;
use hyper::StatusCode;
use serde_json::json;
use server::dev::DevSystem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);

async fn start() -> (DevSystem, Http) {
    e2e_tests::start(|_| {}).await
}

async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_no_request_and_readyz_reflects_only_a_longer_outage() {
    let (system, http) = start().await;
    let user1 = http.login("user1", &system.password).await;
    for task in 0..4 {
        let reply = user1
            .json("POST", &format!("/data?key=k{task}"), &json!({"value": 0}))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for task in 0..4 {
        let (user1, stop, answered) = (user1.clone(), stop.clone(), answered.clone());
        loops.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut last_written = 0;
            for n in 1.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let target = format!("/data/k{task}");
                let put = user1.json("PUT", &target, &json!({"value": n})).await;
                if put.status != StatusCode::OK {
                    failures.push(format!("PUT {n}: {put:?}"));
                    continue;
                }
                last_written = n;
                let get = user1.get(&target).await;
                if get.status != StatusCode::OK || get.json()["value"] != n {
                    failures.push(format!("GET after PUT {n}: {get:?}"));
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            (failures, last_written)
        }));
    }
    let readiness = {
        let (http, stop) = (http.clone(), stop.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(http.get("/readyz").await.status);
            }
            statuses
        })
    };

    let count = || answered.load(Ordering::Relaxed);
    wait_for("requests before the kill", || count() >= 40).await;
    let old = system.topology.initial_master();
    system.topology.kill(old).unwrap();
    let new = system
        .topology
        .wait_for_new_master(old, DEADLINE)
        .await
        .unwrap();
    let after = count();
    wait_for("requests after the failover", || count() >= after + 40).await;
    stop.store(true, Ordering::Relaxed);

    for (task, handle) in loops.into_iter().enumerate() {
        let (failures, last_written) = handle.await.unwrap();
        assert!(failures.is_empty(), "task {task}: {failures:?}");
        let stored = user1.get(&format!("/data/k{task}")).await;
        assert_eq!(stored.json()["value"], last_written, "task {task}");
    }
    let statuses = readiness.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "readyz during a failover within the budget: {statuses:?}"
    );
    assert_eq!(
        system.client.master().map(|master| master.node),
        Some(system.topology.addr(new).into()),
        "the server follows the new master"
    );

    // Every data node gone: past the retry budget, requests get 503 and
    // readiness says so.
    for node in system.topology.data_nodes() {
        if system.topology.is_running(node) {
            system.topology.kill(node).unwrap();
        }
    }
    let started = Instant::now();
    let ready = http.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{ready:?}");
    assert_eq!(ready.error_code(), "unavailable");
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "unready after {:?}, before the 8 s budget",
        started.elapsed()
    );
    let read = user1.get("/data/k0").await;
    assert_eq!(read.status, StatusCode::SERVICE_UNAVAILABLE, "{read:?}");
    assert!(read.header("retry-after").is_some());
}

async fn metric(http: &Http, name: &str) -> i64 {
    let text = String::from_utf8(http.get("/metrics").await.body.to_vec()).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drains_the_request_in_flight() {
    let (system, http) = start().await;
    let admin = Http::new(system.admin_addr().expect("an admin listener"));
    let token = http.token("user1", &system.password).await;
    let addr = system.local_addr();

    // A request whose body is half sent: it is in flight until the rest comes.
    let body = br#"{"value": "sent across a shutdown"}"#;
    let (first, rest) = body.split_at(10);
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /data?key=slow HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(first).await.unwrap();
    // The /metrics request counts itself.
    let started = Instant::now();
    while metric(&admin, "http_requests_in_flight").await < 2 {
        assert!(
            started.elapsed() < DEADLINE,
            "the slow request never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let shutdown = tokio::spawn(system.shutdown());
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(started.elapsed() < DEADLINE, "still accepting connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slow.write_all(rest).await.unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(answer.contains("sent across a shutdown"), "{answer}");
    let report = shutdown.await.unwrap();
    assert!(report.drained, "the in-flight request was not drained");
}
