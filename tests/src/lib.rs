//! End-to-end tests of the workspace: the crates composed as the service
//! composes them, run against real Redis master/replica/Sentinel processes
//! started by `redis-topology`, with faults injected while traffic flows.
//!
//! The tests live in this crate's `tests/` directory; each starts its own
//! topology on free loopback ports, so they run in parallel. This library
//! holds what they share: a dev system on free ports ([`start`]), a small
//! HTTP/1.1 client, checks of answers and shipped audit records, and the
//! chaos run ([`chaos`]) that the harness's `chaos` scenario drives for
//! longer.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chaos;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use server::dev::{DevOptions, DevSystem};

/// A dev system listening on a free loopback port, with the options
/// `configure` sets, and a client of it.
pub async fn start(configure: impl FnOnce(&mut DevOptions)) -> (DevSystem, Http) {
    let mut options = DevOptions {
        listen: "127.0.0.1:0".parse().expect("an address"),
        ..DevOptions::default()
    };
    configure(&mut options);
    let system = DevSystem::start(options).await.expect("dev system");
    let http = Http::new(system.local_addr());
    (system, http)
}

/// Asserts that `reply` is the error `code` with `status`, and a message.
pub fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(reply.error_code(), code, "{reply:?}");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!message.is_empty(), "{reply:?}");
}

/// Waits until the shipped log file holds an audit record of each action
/// for `tenant` (the offloader ships and then deletes the audit stream).
pub async fn wait_for_audit(system: &DevSystem, tenant: &str, actions: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&system.logs_to).unwrap_or_default();
        let shipped: BTreeSet<String> = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["labels"]["tenant_id"] == tenant)
            .filter_map(|line| line["labels"]["action"].as_str().map(str::to_owned))
            .collect();
        let missing: Vec<&&str> = actions.iter().filter(|a| !shipped.contains(**a)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "audit actions {missing:?} of {tenant} never shipped; shipped: {shipped:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client of one server; each request opens its own connection.
#[derive(Clone, Debug)]
pub struct Http {
    addr: SocketAddr,
    /// Headers sent with every request (credentials).
    headers: Vec<(String, String)>,
}

/// An answer.
#[derive(Debug)]
pub struct Reply {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The error code of a JSON error answer.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Http {
    /// A client of the server at `addr`, without credentials.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            headers: Vec::new(),
        }
    }

    /// The same client sending `name: value` with every request.
    pub fn with_header(&self, name: &str, value: &str) -> Self {
        let mut client = self.clone();
        client.headers.push((name.to_owned(), value.to_owned()));
        client
    }

    /// The same client sending `Authorization: Bearer <token>`.
    pub fn bearer(&self, token: &str) -> Self {
        self.with_header("authorization", &format!("Bearer {token}"))
    }

    /// Sends a request; `Err` only if the connection failed.
    pub async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(target)
            .header("host", self.addr.to_string());
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = sender
            .send_request(request.body(Full::new(body.into()))?)
            .await?;
        let (parts, body) = response.into_parts();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await?.to_bytes(),
        })
    }

    /// `GET target`, panicking if the connection fails.
    pub async fn get(&self, target: &str) -> Reply {
        self.send("GET", target, &[], Bytes::new())
            .await
            .expect("connection")
    }

    /// `DELETE target`, panicking if the connection fails.
    pub async fn delete(&self, target: &str) -> Reply {
        self.send("DELETE", target, &[], Bytes::new())
            .await
            .expect("connection")
    }

    /// A request with a JSON body, panicking if the connection fails.
    pub async fn json(&self, method: &str, target: &str, body: &Value) -> Reply {
        self.send(
            method,
            target,
            &[("content-type", "application/json")],
            serde_json::to_vec(body).expect("JSON"),
        )
        .await
        .expect("connection")
    }

    /// Logs in with `POST /token` (form) and returns the token.
    pub async fn token(&self, username: &str, password: &str) -> String {
        let form = format!("username={username}&password={password}");
        let reply = self
            .send(
                "POST",
                "/token",
                &[("content-type", "application/x-www-form-urlencoded")],
                form,
            )
            .await
            .expect("connection");
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "login of {username}: {reply:?}"
        );
        reply.json()["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// Logs in and returns a client sending the token.
    pub async fn login(&self, username: &str, password: &str) -> Self {
        self.bearer(&self.token(username, password).await)
    }
}
