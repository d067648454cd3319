//! The service over real HTTP against a real topology (master, 2 replicas,
//! 3 sentinels): every endpoint's success and error paths, tenant
//! isolation, ETags, limits, and the OpenAPI document (API keys: `api_keys.rs`).

use std::collections::BTreeSet;

use e2e_tests::{Http, assert_error, wait_for_audit};
use hyper::StatusCode;
use serde_json::{Value, json};
use server::dev::DevSystem;

async fn start() -> (DevSystem, Http) {
    e2e_tests::start(|options| options.limits.max_body_bytes = 64 * 1024).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_users_and_service_endpoints() {
    let (system, http) = start().await;
    let password = system.password.clone();

    // Form and JSON logins; failures are 401 and audited.
    let user1 = http.login("user1", &password).await;
    let json_login = http
        .json(
            "POST",
            "/token",
            &json!({"username": "user2", "password": password}),
        )
        .await;
    assert_eq!(json_login.status, StatusCode::OK);
    assert_eq!(json_login.json()["token_type"], "bearer");
    assert_eq!(json_login.json()["expires_in"], 1800);
    let wrong = http
        .json(
            "POST",
            "/token",
            &json!({"username": "user1", "password": "nope"}),
        )
        .await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
    let unknown = http
        .json(
            "POST",
            "/token",
            &json!({"username": "ghost", "password": "nope"}),
        )
        .await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED, "unauthorized");
    let missing = http
        .json("POST", "/token", &json!({"username": "user1"}))
        .await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "invalid_json");
    let form_missing = http
        .send(
            "POST",
            "/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            "username=user1",
        )
        .await
        .unwrap();
    assert_error(&form_missing, StatusCode::BAD_REQUEST, "bad_request");
    let text = http
        .send("POST", "/token", &[("content-type", "text/plain")], "user1")
        .await
        .unwrap();
    assert_error(
        &text,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    wait_for_audit(&system, "tenant1", &["login_success", "login_failed"]).await;

    let me = user1.get("/users/me").await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json()["username"], "user1");
    assert_eq!(me.json()["tenant_id"], "tenant1");
    assert_error(
        &http.get("/users/me").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_eq!(
        http.get("/users/me").await.header("www-authenticate"),
        Some("Bearer")
    );

    // Service endpoints need no credential; metrics, which name tenants,
    // are on the admin listener only.
    assert_eq!(http.get("/healthz").await.status, StatusCode::OK);
    let ready = http.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
    assert_error(
        &http.get("/metrics").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let admin = Http::new(system.admin_addr().expect("an admin listener"));
    assert_eq!(admin.get("/readyz").await.status, StatusCode::OK);
    assert_error(
        &admin.get("/data/k").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let metrics = admin.get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    for name in [
        "http_requests_total{route=\"issue_token\",status=\"200\"}",
        "http_request_duration_seconds_bucket",
        "redis_failover_master_changes_total",
        "log_buffer_records_total{outcome=\"queued\"}",
        "log_offloader_sent_lines_total",
    ] {
        assert!(text.contains(name), "{name} missing from {text}");
    }

    // Routing and request hygiene.
    assert_error(
        &http.get("/nowhere").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let patch = user1.send("PATCH", "/data/k", &[], "").await.unwrap();
    assert_error(&patch, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(patch.header("allow"), Some("GET, HEAD, PUT, DELETE"));
    let long = format!("/data/{}", "k".repeat(9000));
    assert_error(
        &user1.get(&long).await,
        StatusCode::URI_TOO_LONG,
        "uri_too_long",
    );
    let id = http
        .send("GET", "/healthz", &[("x-request-id", "trace-42")], "")
        .await
        .unwrap();
    assert_eq!(id.header("x-request-id"), Some("trace-42"));
    assert!(http.get("/healthz").await.header("x-request-id").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_etags_listing_and_batches() {
    let (system, http) = start().await;
    let user1 = http.login("user1", &system.password).await;

    // Create: 201 with ETag and Location; 409 on a second create.
    let body = json!({"value": {"n": 1}, "metadata": {"owner": "ops"}, "ttl": 3600});
    let created = user1.json("POST", "/data?key=a%2Fb%20c", &body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    assert_eq!(created.header("etag"), Some("\"1\""));
    assert_eq!(created.header("location"), Some("/data/a%2Fb%20c"));
    assert_eq!(created.json()["key"], "a/b c");
    assert!(created.json()["expires_at"].is_string());
    assert_error(
        &user1.json("POST", "/data?key=a%2Fb%20c", &body).await,
        StatusCode::CONFLICT,
        "conflict",
    );
    assert_error(
        &user1.json("POST", "/data", &body).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &user1.json("POST", "/data?key=", &body).await,
        StatusCode::BAD_REQUEST,
        "invalid_key",
    );
    let no_value = user1.json("POST", "/data?key=x", &json!({"ttl": 5})).await;
    assert_error(&no_value, StatusCode::BAD_REQUEST, "invalid_json");
    let extra = user1
        .json("POST", "/data?key=x", &json!({"value": 1, "tll": 5}))
        .await;
    assert_error(&extra, StatusCode::BAD_REQUEST, "invalid_json");
    let zero_ttl = user1
        .json("POST", "/data?key=x", &json!({"value": 1, "ttl": 0}))
        .await;
    assert_error(&zero_ttl, StatusCode::BAD_REQUEST, "bad_request");
    let malformed = user1
        .send(
            "POST",
            "/data?key=x",
            &[("content-type", "application/json")],
            "{\"value\":",
        )
        .await
        .unwrap();
    assert_error(&malformed, StatusCode::BAD_REQUEST, "invalid_json");
    let not_json = user1
        .send(
            "POST",
            "/data?key=x",
            &[("content-type", "text/plain")],
            "1",
        )
        .await
        .unwrap();
    assert_error(
        &not_json,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let huge = json!({"value": "x".repeat(70 * 1024)});
    assert_error(
        &user1.json("POST", "/data?key=big", &huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    assert_error(
        &user1.get("/data/big").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // Read with ETag and conditional GET.
    let read = user1.get("/data/a%2Fb%20c").await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.json()["value"], json!({"n": 1}));
    assert_eq!(read.json()["metadata"], json!({"owner": "ops"}));
    let cached = user1
        .send("GET", "/data/a%2Fb%20c", &[("if-none-match", "\"1\"")], "")
        .await
        .unwrap();
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert_eq!(cached.header("etag"), Some("\"1\""));
    assert_error(
        &user1.get("/data/missing").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // PUT: 404 without the item, If-Match compare-and-set, If-None-Match: * create.
    let put = |key: &str, headers: Vec<(&'static str, &'static str)>, value: Value| {
        let user1 = user1.clone();
        let target = format!("/data/{key}");
        async move {
            let mut all = vec![("content-type", "application/json")];
            all.extend(headers);
            user1
                .send(
                    "PUT",
                    &target,
                    &all,
                    serde_json::to_vec(&json!({"value": value})).unwrap(),
                )
                .await
                .unwrap()
        }
    };
    assert_error(
        &put("missing", vec![], json!(1)).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &put("a%2Fb%20c", vec![("if-match", "\"7\"")], json!(2)).await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    // Weak or foreign tags never match; `*` needs the item; lists are refused.
    for tag in ["seven", "W/\"1\""] {
        assert_error(
            &put("a%2Fb%20c", vec![("if-match", tag)], json!(2)).await,
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
        );
    }
    assert_error(
        &put("missing", vec![("if-match", "*")], json!(2)).await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    assert_error(
        &put("a%2Fb%20c", vec![("if-match", "\"1\", \"2\"")], json!(2)).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    let forever = user1
        .json("POST", "/data?key=x", &json!({"value": 1, "ttl": u64::MAX}))
        .await;
    assert_error(&forever, StatusCode::BAD_REQUEST, "invalid_item");
    assert_error(
        &user1.get("/data/x").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let replaced = put("a%2Fb%20c", vec![("if-match", "\"1\"")], json!(2)).await;
    assert_eq!(replaced.status, StatusCode::OK, "{replaced:?}");
    let version = replaced.json()["version"].as_u64().unwrap();
    assert!(version > 1);
    assert_eq!(
        replaced.header("etag"),
        Some(format!("\"{version}\"").as_str())
    );
    assert_error(
        &put("a%2Fb%20c", vec![("if-none-match", "*")], json!(3)).await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    let fresh = put("fresh", vec![("if-none-match", "*")], json!(3)).await;
    assert_eq!(fresh.status, StatusCode::OK, "{fresh:?}");
    assert_eq!(user1.get("/data/fresh").await.json()["value"], 3);
    assert_eq!(put("fresh", vec![], json!(4)).await.status, StatusCode::OK);
    // If-Match and If-None-Match: * never both hold (RFC 9110): 412;
    // empty ones are as good as none; an invalid key is a bad request
    // whatever the preconditions.
    assert_error(
        &put(
            "fresh",
            vec![("if-match", "*"), ("if-none-match", "*")],
            json!(5),
        )
        .await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    let blank = put(
        "fresh",
        vec![("if-match", ""), ("if-none-match", "")],
        json!(5),
    )
    .await;
    assert_eq!(blank.status, StatusCode::OK, "{blank:?}");
    assert_error(
        &put("%01", vec![("if-match", "W/\"1\"")], json!(5)).await,
        StatusCode::BAD_REQUEST,
        "invalid_key",
    );
    // JSON Schema's integers include `60.0`; an array is no object.
    let whole = user1
        .json(
            "POST",
            "/data?key=whole",
            &json!({"value": 1.5, "ttl": 60.0}),
        )
        .await;
    assert_eq!(whole.status, StatusCode::CREATED, "{whole:?}");
    let array = user1
        .send(
            "PUT",
            "/data/whole",
            &[("content-type", "application/json")],
            "[1, null]",
        )
        .await
        .unwrap();
    assert_error(&array, StatusCode::BAD_REQUEST, "invalid_json");

    // Listing: pages, limits, cursors.
    for i in 0..5 {
        let reply = user1
            .json("POST", &format!("/data?key=list/{i}"), &json!({"value": i}))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    let first = user1.get("/data?prefix=list/&limit=3").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["keys"], json!(["list/0", "list/1", "list/2"]));
    let cursor = first.json()["cursor"].as_str().unwrap().to_owned();
    let encoded =
        percent_encoding::utf8_percent_encode(&cursor, percent_encoding::NON_ALPHANUMERIC);
    let second = user1
        .get(&format!("/data?prefix=list/&limit=3&cursor={encoded}"))
        .await;
    assert_eq!(second.json()["keys"], json!(["list/3", "list/4"]));
    assert!(second.json()["cursor"].is_null());
    assert_error(
        &user1.get("/data?limit=0").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &user1.get("/data?limit=abc").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &user1.get("/data?prefix=other&cursor=forged").await,
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    );
    assert_error(
        &user1
            .get(&format!("/data?prefix=other&cursor={encoded}"))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    );

    // Batches: all or nothing.
    let batch = json!({"operations": [
        {"op": "create", "key": "b1", "value": 1},
        {"op": "put", "key": "fresh", "value": 5},
        {"op": "delete", "key": "list/0"},
    ]});
    let done = user1.json("POST", "/data/batch", &batch).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.json()["results"][2]["deleted"], true);
    let failing = json!({"operations": [
        {"op": "create", "key": "b2", "value": 1},
        {"op": "delete", "key": "nothing-here"},
    ]});
    let failed = user1.json("POST", "/data/batch", &failing).await;
    assert_error(&failed, StatusCode::NOT_FOUND, "not_found");
    assert!(
        failed.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("operation 1")
    );
    assert_error(
        &user1.get("/data/b2").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let empty = user1
        .json("POST", "/data/batch", &json!({"operations": []}))
        .await;
    assert_error(&empty, StatusCode::BAD_REQUEST, "bad_request");
    let unknown_op = user1
        .json(
            "POST",
            "/data/batch",
            &json!({"operations": [{"op": "merge", "key": "k"}]}),
        )
        .await;
    assert_error(&unknown_op, StatusCode::BAD_REQUEST, "invalid_json");

    // Delete: If-Match, then 404.
    let star = user1
        .send("DELETE", "/data/missing", &[("if-match", "*")], "")
        .await
        .unwrap();
    assert_error(
        &star,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    let wrong = user1
        .send("DELETE", "/data/b1", &[("if-match", "\"999\"")], "")
        .await
        .unwrap();
    assert_error(
        &wrong,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    let deleted = user1.delete("/data/b1").await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(deleted.json()["deleted"], true);
    assert_error(
        &user1.delete("/data/b1").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    wait_for_audit(
        &system,
        "tenant1",
        &["create_key", "update_key", "delete_key"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_touch_each_others_items() {
    let (system, http) = start().await;
    let user1 = http.login("user1", &system.password).await;
    let user2 = http.login("user2", &system.password).await;
    let keys = [
        "plain",
        "a/b",
        "../plain",
        "tenant:{tenant1}:data:plain",
        "{tenant1}:data:plain",
        "tenant1:data:plain",
        "*",
        "pl?in",
        "[p]lain",
        "%2F",
        "ключ",
        " spaced ",
        "x:y:z",
    ];
    let encode = |key: &str| {
        percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    for key in keys {
        let reply = user1
            .json(
                "POST",
                &format!("/data?key={}", encode(key)),
                &json!({"value": "secret"}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{key:?}: {reply:?}");
    }
    for key in keys {
        let target = format!("/data/{}", encode(key));
        assert_error(
            &user2.get(&target).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
        let overwrite = user2
            .send(
                "PUT",
                &target,
                &[("content-type", "application/json")],
                r#"{"value":"mine"}"#,
            )
            .await
            .unwrap();
        assert_error(&overwrite, StatusCode::NOT_FOUND, "not_found");
        let conditional = user2
            .send(
                "PUT",
                &target,
                &[("content-type", "application/json"), ("if-match", "\"1\"")],
                r#"{"value":"mine"}"#,
            )
            .await
            .unwrap();
        assert_eq!(
            conditional.status,
            StatusCode::PRECONDITION_FAILED,
            "{key:?}"
        );
        assert_error(
            &user2.delete(&target).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }
    for prefix in [
        "",
        "tenant",
        "tenant:{tenant1}",
        "{tenant1}",
        "*",
        "a",
        "tenant1",
    ] {
        let listed = user2
            .get(&format!("/data?prefix={}&limit=1000", encode(prefix)))
            .await;
        assert_eq!(listed.json()["keys"], json!([]), "prefix {prefix:?}");
    }
    // Its own items under the same keys are its own.
    for key in keys {
        let own = user2
            .json(
                "POST",
                &format!("/data?key={}", encode(key)),
                &json!({"value": "mine"}),
            )
            .await;
        assert_eq!(own.status, StatusCode::CREATED, "{key:?}");
    }
    let batch = json!({"operations": [{"op": "delete", "key": "plain"}, {"op": "put", "key": "a/b", "value": "batch"}]});
    assert_eq!(
        user2.json("POST", "/data/batch", &batch).await.status,
        StatusCode::OK
    );
    // Tenant 1 still has every item, untouched.
    for key in keys {
        let reply = user1.get(&format!("/data/{}", encode(key))).await;
        assert_eq!(reply.status, StatusCode::OK, "{key:?}");
        assert_eq!(reply.json()["value"], "secret", "{key:?}");
        assert_eq!(
            reply.json()["version"].as_u64(),
            reply
                .header("etag")
                .and_then(|e| e.trim_matches('"').parse().ok())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let (_system, http) = start().await;
    let document = http.get("/openapi.json").await.json();
    assert_eq!(document["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, methods) in document["paths"].as_object().unwrap() {
        for method in methods.as_object().unwrap().keys() {
            documented.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = server::routes()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    assert_eq!(documented, routed);
    // Each documented operation is served: never "no route" nor 405.
    for (method, path) in &documented {
        let target = path
            .replace("{key}", "some-key")
            .replace("{key_id}", "some-id");
        let reply = http.send(method, &target, &[], "").await.unwrap();
        assert_ne!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            !message.starts_with("no route"),
            "{method} {path}: {message}"
        );
    }
}
