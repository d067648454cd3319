//! Forged, altered, expired and otherwise wrong tokens are all refused with
//! 401 over real HTTP; a disabled user's valid token too, at once.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use e2e_tests::Http;
use hmac::{Hmac, Mac};
use hyper::StatusCode;
use serde_json::{Value, json};
use server::dev::{DevOptions, DevSystem};
use sha2::{Sha256, Sha512};
use tenant_kv::Actor;

const SECRET: &[u8] = b"an e2e secret that is long enough for HS256";

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

fn hs256(signing_input: &str, secret: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(signing_input.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// A token with this header and these claims, signed with HMAC-SHA256.
fn token(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let signature = hs256(&input, secret);
    format!("{input}.{signature}")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(user: &str, tenant: &str) -> Value {
    json!({"sub": user, "tenant_id": tenant, "iat": now(), "nbf": now(), "exp": now() + 600})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused() {
    let system = DevSystem::start(DevOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: Some(SECRET.to_vec()),
        ..DevOptions::default()
    })
    .await
    .expect("dev system");
    let http = Http::new(system.local_addr());
    let hs = json!({"alg": "HS256", "typ": "JWT"});
    let good = claims("user1", "tenant1");

    // The forged token of a well-behaved issuer works: the cases below differ in one thing.
    let valid = token(&hs, &good, SECRET);
    assert_eq!(
        http.bearer(&valid).get("/users/me").await.status,
        StatusCode::OK
    );

    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good)
    );
    let hs512 = {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": "HS512", "typ": "JWT"})),
            b64(&good)
        );
        let mut mac = Hmac::<Sha512>::new_from_slice(SECRET).unwrap();
        mac.update(input.as_bytes());
        format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    };
    let tampered_signature = {
        let mut bytes = valid.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let tampered_claims = {
        let parts: Vec<&str> = valid.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            b64(&with(good.clone(), "tenant_id", json!("tenant2"))),
            parts[2]
        )
    };
    let cases: Vec<(&str, String)> = vec![
        ("alg none", none),
        // Signed with the HMAC secret but claiming RS256: the key-confusion attack.
        (
            "RS256 header, HMAC signature",
            token(&json!({"alg": "RS256", "typ": "JWT"}), &good, SECRET),
        ),
        ("HS512, not the pinned HS256", hs512),
        (
            "wrong secret",
            token(&hs, &good, b"another secret that is long enough for HS256"),
        ),
        ("tampered signature", tampered_signature),
        ("tampered claims", tampered_claims),
        (
            "expired",
            token(&hs, &with(good.clone(), "exp", json!(now() - 60)), SECRET),
        ),
        (
            "not yet valid",
            token(&hs, &with(good.clone(), "nbf", json!(now() + 600)), SECRET),
        ),
        (
            "string exp",
            token(
                &hs,
                &with(good.clone(), "exp", json!((now() + 600).to_string())),
                SECRET,
            ),
        ),
        ("no exp", token(&hs, &without(good.clone(), "exp"), SECRET)),
        ("no sub", token(&hs, &without(good.clone(), "sub"), SECRET)),
        (
            "no tenant_id",
            token(&hs, &without(good.clone(), "tenant_id"), SECRET),
        ),
        (
            "invalid tenant_id",
            token(
                &hs,
                &with(good.clone(), "tenant_id", json!("tenant1:x")),
                SECRET,
            ),
        ),
        (
            "another tenant",
            token(&hs, &claims("user1", "tenant2"), SECRET),
        ),
        (
            "unknown user",
            token(&hs, &claims("ghost", "tenant1"), SECRET),
        ),
        ("not a JWT", "abc".to_owned()),
        ("empty", String::new()),
    ];
    for (case, bad) in &cases {
        let reply = http.bearer(bad).get("/users/me").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{case}: {reply:?}");
        assert_eq!(reply.error_code(), "unauthorized", "{case}");
        // Data too, not only /users/me.
        let reply = http.bearer(bad).get("/data?prefix=").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{case}: {reply:?}");
    }
    for scheme in ["Basic dXNlcjE6cHc=", "Bearer", "Token abc"] {
        let reply = http
            .with_header("authorization", scheme)
            .get("/users/me")
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{scheme}");
    }

    // A disabled user's token is refused at once, and so are its logins.
    let issued = http.login("user1", &system.password).await;
    assert_eq!(issued.get("/users/me").await.status, StatusCode::OK);
    let users = system.store.users();
    users
        .set_disabled("user1", true, &Actor::system())
        .await
        .unwrap();
    assert_eq!(
        issued.get("/users/me").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        http.bearer(&valid).get("/data?prefix=").await.status,
        StatusCode::UNAUTHORIZED
    );
    let login = http
        .json(
            "POST",
            "/token",
            &json!({"username": "user1", "password": system.password}),
        )
        .await;
    assert_eq!(login.status, StatusCode::UNAUTHORIZED);
    users
        .set_disabled("user1", false, &Actor::system())
        .await
        .unwrap();
    assert_eq!(issued.get("/users/me").await.status, StatusCode::OK);
}
