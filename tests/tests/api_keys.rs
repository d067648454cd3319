//! API keys over real HTTP against a real topology: scopes, prefixes,
//! rotation with a grace period, revocation, who may manage which key,
//! and their audit records.

use e2e_tests::{assert_error, start, wait_for_audit};
use hyper::StatusCode;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_scopes_rotation_and_revocation() {
    let (system, http) = start(|options| options.limits.max_body_bytes = 64 * 1024).await;
    let user1 = http.login("user1", &system.password).await;
    assert_eq!(
        user1
            .json("POST", "/data?key=pub/a", &json!({"value": 1}))
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        user1
            .json("POST", "/data?key=priv", &json!({"value": 2}))
            .await
            .status,
        StatusCode::CREATED
    );

    let create = |body: Value| {
        let user1 = user1.clone();
        async move { user1.json("POST", "/api-keys", &body).await }
    };
    let reader = create(json!({"name": "reader", "scopes": ["read"]})).await;
    assert_eq!(reader.status, StatusCode::CREATED, "{reader:?}");
    assert_eq!(reader.json()["scopes"], json!(["read"]));
    let reader_key = reader.json()["api_key"].as_str().unwrap().to_owned();
    let reader_id = reader.json()["key_id"].as_str().unwrap().to_owned();
    let reader = http.with_header("x-api-key", &reader_key);
    assert_eq!(reader.get("/data/priv").await.status, StatusCode::OK);
    assert_error(
        &reader.json("PUT", "/data/priv", &json!({"value": 3})).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &reader
            .json("POST", "/data?key=new", &json!({"value": 3}))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &reader.delete("/data/priv").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &reader.get("/data").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &reader.get("/api-keys").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &reader.get("/users/me").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let batch = json!({"operations": [{"op": "delete", "key": "priv"}]});
    assert_error(
        &reader.json("POST", "/data/batch", &batch).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    // A key limited to a prefix.
    let scoped =
        create(json!({"name": "pub", "scopes": ["read", "list", "write"], "key_prefix": "pub/"}))
            .await;
    let scoped = http.with_header("x-api-key", scoped.json()["api_key"].as_str().unwrap());
    assert_eq!(scoped.get("/data/pub%2Fa").await.status, StatusCode::OK);
    assert_error(
        &scoped.get("/data/priv").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(
        scoped.get("/data?prefix=pub/").await.json()["keys"],
        json!(["pub/a"])
    );
    assert_error(
        &scoped.get("/data").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    // An admin key manages keys, but grants no more than it has.
    let admin = create(json!({"name": "admin", "scopes": ["admin", "read"]})).await;
    let admin = http.with_header("x-api-key", admin.json()["api_key"].as_str().unwrap());
    assert_eq!(
        admin.get("/api-keys").await.json()["api_keys"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_error(
        &admin
            .json(
                "POST",
                "/api-keys",
                &json!({"name": "x", "scopes": ["write"]}),
            )
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(
        admin
            .json(
                "POST",
                "/api-keys",
                &json!({"name": "x", "scopes": ["read"]})
            )
            .await
            .status,
        StatusCode::CREATED
    );
    // Nor may it take over a key that can do more, by rotating or revoking it.
    let keys = admin.get("/api-keys").await.json()["api_keys"].clone();
    let scoped_id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["name"] == "pub")
        .unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let takeover = admin
        .send("POST", &format!("/api-keys/{scoped_id}/rotate"), &[], "")
        .await
        .unwrap();
    assert_error(&takeover, StatusCode::FORBIDDEN, "forbidden");
    assert_error(
        &admin.delete(&format!("/api-keys/{scoped_id}")).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let untyped = user1
        .send(
            "POST",
            &format!("/api-keys/{scoped_id}/rotate"),
            &[],
            r#"{"grace_seconds": 3600}"#,
        )
        .await
        .unwrap();
    assert_error(
        &untyped,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    // An unknown scope is a body that does not fit its schema, as an
    // unknown field is.
    assert_error(
        &create(json!({"name": "bad", "scopes": ["root"]})).await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_error(
        &create(json!({"name": "bad", "scopes": []})).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // Rotation without grace (no body, or `null`): the old secret stops
    // working at once.
    let rotated = user1
        .send(
            "POST",
            &format!("/api-keys/{reader_id}/rotate"),
            &[("content-type", "application/json")],
            "null",
        )
        .await
        .unwrap();
    assert_eq!(rotated.status, StatusCode::OK, "{rotated:?}");
    let new_key = rotated.json()["api_key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, reader_key);
    assert_error(
        &reader.get("/data/priv").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let renewed = http.with_header("x-api-key", &new_key);
    assert_eq!(renewed.get("/data/priv").await.status, StatusCode::OK);
    // With grace, both work.
    let graceful = user1
        .json(
            "POST",
            &format!("/api-keys/{reader_id}/rotate"),
            &json!({"grace_seconds": 60}),
        )
        .await;
    let newest = http.with_header("x-api-key", graceful.json()["api_key"].as_str().unwrap());
    assert_eq!(renewed.get("/data/priv").await.status, StatusCode::OK);
    assert_eq!(newest.get("/data/priv").await.status, StatusCode::OK);

    // Revocation is immediate; unknown ids are 404; other tenants cannot revoke.
    let user2 = http.login("user2", &system.password).await;
    assert_error(
        &user2.delete(&format!("/api-keys/{reader_id}")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let revoked = user1.delete(&format!("/api-keys/{reader_id}")).await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert_error(
        &newest.get("/data/priv").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &user1.delete(&format!("/api-keys/{reader_id}")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &http
            .with_header("x-api-key", "tkv_garbage")
            .get("/data/priv")
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );

    wait_for_audit(
        &system,
        "tenant1",
        &["create_api_key", "rotate_api_key", "delete_api_key"],
    )
    .await;
}
