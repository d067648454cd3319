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

/// Makes an RSA key pair with the `openssl` command: (private, public) PEM.
fn rsa_keys(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let (private, public) = (dir.join("key.pem"), dir.join("pub.pem"));
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("the openssl command");
        assert!(status.success(), "openssl {args:?}");
    };
    let (private_path, public_path) = (private.to_str().unwrap(), public.to_str().unwrap());
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        private_path,
    ]);
    run(&["pkey", "-in", private_path, "-pubout", "-out", public_path]);
    (
        std::fs::read(private).unwrap(),
        std::fs::read(public).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rs256_server_refuses_hmac_tokens_keyed_with_its_public_key_and_requires_iss_and_aud() {
    let system = DevSystem::start(DevOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..DevOptions::default()
    })
    .await
    .expect("dev system");
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = rsa_keys(dir.path());
    let settings = server::JwtSettings {
        algorithm: jsonwebtoken::Algorithm::RS256,
        secret: None,
        private_key: Some(private.clone()),
        public_key: Some(public.clone()),
        issuer: Some("https://issuer.test".to_owned()),
        audience: Some("kv".to_owned()),
        ttl: std::time::Duration::from_secs(600),
        leeway: std::time::Duration::from_secs(5),
    };
    let jwt = server::JwtConfig::from_settings(&settings).unwrap();
    let rs256 = server::Server::builder(system.store.clone(), system.client.clone(), jwt)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let http = Http::new(rs256.local_addr());

    // Its own tokens carry iss and aud, and work.
    let user1 = http.login("user1", &system.password).await;
    assert_eq!(user1.get("/users/me").await.status, StatusCode::OK);

    let full = with(
        with(
            claims("user1", "tenant1"),
            "iss",
            json!("https://issuer.test"),
        ),
        "aud",
        json!("kv"),
    );
    let signer = jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap();
    let rs = |claims: &Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            claims,
            &signer,
        )
        .unwrap()
    };
    assert_eq!(
        http.bearer(&rs(&full)).get("/users/me").await.status,
        StatusCode::OK
    );
    let cases = [
        (
            "HS256 keyed with the public key",
            token(&json!({"alg": "HS256", "typ": "JWT"}), &full, &public),
        ),
        ("no iss", rs(&without(full.clone(), "iss"))),
        ("no aud", rs(&without(full.clone(), "aud"))),
        (
            "another iss",
            rs(&with(full.clone(), "iss", json!("https://evil.test"))),
        ),
        (
            "another aud",
            rs(&with(full.clone(), "aud", json!("other"))),
        ),
    ];
    for (case, bad) in &cases {
        let reply = http.bearer(bad).get("/users/me").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{case}: {reply:?}");
    }
    rs256.shutdown().await;
}
