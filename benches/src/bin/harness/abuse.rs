//! The `abuse` scenario: a quiet tenant's GETs over 64 keep-alive
//! connections, measured alone and while, in turn and then together,
//! (a) 512 clients guess passwords, (b) 200 clients pipeline requests and
//! never read the answers, (c) a noisy tenant sends ten times its request
//! rate. The server runs as its own process (`server serve`, the release
//! binary next to this one) so that its resident memory is its own.
//! Attackers connect from other loopback addresses than the quiet tenant,
//! as they would from other hosts.

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use redis_failover::{FailoverClient, NodeAddr};
use redis_topology::Topology;
use serde_json::{Value, json};
use tenant_kv::{Actor, NewUser, Quota, TenantId, TenantKv};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

const QUIET_CONNECTIONS: usize = 64;
const LOGIN_GUESSERS: usize = 512;
const SLOW_READERS: usize = 200;
/// The noisy tenant's request rate limit; it sends ten times as much.
const NOISY_LIMIT: u32 = 200;
const PASSWORD: &str = "correct horse battery";
const SECRET: &str = "a secret of at least thirty-two bytes for the bench";

/// The server process, killed when dropped.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    fn start(topology: &Topology) -> Result<Self, Box<dyn Error>> {
        let binary = std::env::current_exe()?.with_file_name("server");
        if !binary.exists() {
            return Err(format!(
                "{} not found: build it first (cargo build --release -p server)",
                binary.display()
            )
            .into());
        }
        let sentinels: Vec<String> = topology
            .sentinel_addrs()
            .iter()
            .map(SocketAddr::to_string)
            .collect();
        let mut child = Command::new(&binary)
            .arg("serve")
            .env_remove("SERVER_CONFIG")
            .env("SERVER_REDIS_SENTINELS", sentinels.join(","))
            .env("SERVER_REDIS_MASTER_NAME", topology.master_name())
            .env("SERVER_JWT_SECRET", SECRET)
            .env("SERVER_LISTEN", "127.0.0.1:0")
            .env("SERVER_ADMIN_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn,server=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (found, addr) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once("local_addr=") {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let _ = found.send(addr.parse::<SocketAddr>());
                }
            }
        });
        let addr = addr.recv_timeout(Duration::from_secs(30))??;
        Ok(Self { child, addr })
    }

    /// Resident memory now, and at most so far, in MiB.
    fn memory(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(0.0, |kib| kib / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A keep-alive HTTP/1.1 connection from `from`, reopened after an error.
struct Client {
    from: IpAddr,
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    fn new(from: &str, addr: SocketAddr) -> Self {
        Self {
            from: from.parse().expect("an IP address"),
            addr,
            sender: None,
        }
    }

    /// Sends a request; its status and body, or `Err` if the connection failed.
    async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<(u16, Bytes), String> {
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            let stream = connect_from(self.from, self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        let outcome = async {
            sender.ready().await.map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok((status, body.to_bytes()))
        }
        .await;
        if outcome.is_err() {
            self.sender = None;
        }
        outcome
    }
}

fn get(path: &str, token: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "bench")
        .header("authorization", token)
        .body(Full::new(Bytes::new()))
        .expect("a valid request")
}

fn login(username: &str, password: &str) -> Request<Full<Bytes>> {
    Request::post("/token")
        .header("host", "bench")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(format!(
            "username={username}&password={password}"
        ))))
        .expect("a valid request")
}

async fn token(addr: SocketAddr, username: &str) -> Result<String, Box<dyn Error>> {
    let (status, body) = Client::new("127.0.0.1", addr)
        .send(login(username, PASSWORD))
        .await?;
    let reply: Value = serde_json::from_slice(&body)?;
    let token = reply["access_token"]
        .as_str()
        .ok_or_else(|| format!("login of {username}: {status} {reply}"))?;
    Ok(format!("Bearer {token}"))
}

/// What the quiet tenant measured in one window.
#[derive(Default)]
struct Window {
    ok: u64,
    server_errors: u64,
    other: u64,
    latencies_us: Vec<u32>,
    seconds: f64,
    /// Cores the server used meanwhile, on average.
    server_cores: f64,
}

impl Window {
    fn per_second(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    fn p99(&self) -> Duration {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let rank = ((sorted.len().max(1) - 1) as f64 * 0.99).round() as usize;
        Duration::from_micros(u64::from(sorted.get(rank).copied().unwrap_or(0)))
    }
}

/// The quiet tenant's GETs from 64 connections for `duration`.
async fn quiet(addr: SocketAddr, token: &str, duration: Duration) -> Window {
    let deadline = Instant::now() + duration;
    let mut tasks = JoinSet::new();
    for task in 0..QUIET_CONNECTIONS {
        let token = token.to_owned();
        tasks.spawn(async move {
            let mut client = Client::new("127.0.0.1", addr);
            let mut window = Window::default();
            let path = format!("/data/k{task}");
            while Instant::now() < deadline {
                let sent = Instant::now();
                match client.send(get(&path, &token)).await {
                    Ok((200, _)) => {
                        window.ok += 1;
                        window
                            .latencies_us
                            .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Ok((status, _)) if status >= 500 => window.server_errors += 1,
                    _ => window.other += 1,
                }
            }
            window
        });
    }
    let mut total = Window {
        seconds: duration.as_secs_f64(),
        ..Window::default()
    };
    for window in tasks.join_all().await {
        total.ok += window.ok;
        total.server_errors += window.server_errors;
        total.other += window.other;
        total.latencies_us.extend(window.latencies_us);
    }
    total
}

/// The pause of an attacker whose connection was refused or closed
/// before it tries again: attackers keep up their pressure without
/// turning into a flood of connections.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// (a) Clients guessing passwords of unknown users as fast as they are
/// answered, from four addresses (128 each: as many connections as one
/// address may hold).
fn guess_passwords(addr: SocketAddr, stop: &Arc<AtomicBool>, tasks: &mut JoinSet<u64>) {
    for guesser in 0..LOGIN_GUESSERS {
        let stop = Arc::clone(stop);
        tasks.spawn(async move {
            let mut client = Client::new(&format!("127.0.1.{}", 1 + guesser % 4), addr);
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                let guess = login(&format!("nobody{guesser}"), "guess");
                if client.send(guess).await.is_err() {
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
            sent
        });
    }
}

/// (b) Clients that pipeline requests and never read an answer, from two
/// addresses, opening a new connection when the server closes theirs.
fn read_nothing(addr: SocketAddr, stop: &Arc<AtomicBool>, tasks: &mut JoinSet<u64>) {
    let pipelined = Bytes::from(b"GET /openapi.json HTTP/1.1\r\nhost: bench\r\n\r\n".repeat(500));
    for reader in 0..SLOW_READERS {
        let (stop, pipelined) = (Arc::clone(stop), pipelined.clone());
        let from: IpAddr = format!("127.0.2.{}", 1 + reader % 2)
            .parse()
            .expect("an address");
        tasks.spawn(async move {
            let mut connections = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut stream) = connect_from(from, addr).await {
                    connections += 1;
                    // Writes block once the server stops reading; a failed
                    // one means the server closed the connection.
                    while !stop.load(Ordering::Relaxed) {
                        let write = stream.write_all(&pipelined);
                        match tokio::time::timeout(Duration::from_millis(500), write).await {
                            Ok(Ok(())) | Err(_) => {}
                            Ok(Err(_)) => break,
                        }
                    }
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
            connections
        });
    }
}

/// (c) A noisy tenant sending ten times its request rate, paced.
fn noisy(addr: SocketAddr, token: &str, stop: &Arc<AtomicBool>, tasks: &mut JoinSet<u64>) {
    const SENDERS: u32 = 16;
    let interval = Duration::from_secs(1) / (10 * NOISY_LIMIT / SENDERS);
    for _ in 0..SENDERS {
        let (stop, token) = (Arc::clone(stop), token.to_owned());
        tasks.spawn(async move {
            let mut client = Client::new("127.0.3.1", addr);
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut limited = 0;
            while !stop.load(Ordering::Relaxed) {
                ticks.tick().await;
                if let Ok((429, _)) = client.send(get("/data/k0", &token)).await {
                    limited += 1;
                }
            }
            limited
        });
    }
}

/// Which attacks run during a window.
#[derive(Clone, Copy)]
struct Attacks {
    name: &'static str,
    logins: bool,
    readers: bool,
    noisy: bool,
}

const PHASES: [Attacks; 5] = [
    Attacks {
        name: "quiet alone",
        logins: false,
        readers: false,
        noisy: false,
    },
    Attacks {
        name: "(a) 512 password guessers",
        logins: true,
        readers: false,
        noisy: false,
    },
    Attacks {
        name: "(b) 200 clients reading nothing",
        logins: false,
        readers: true,
        noisy: false,
    },
    Attacks {
        name: "(c) a tenant at 10x its rate",
        logins: false,
        readers: false,
        noisy: true,
    },
    Attacks {
        name: "(a)+(b)+(c) together",
        logins: true,
        readers: true,
        noisy: true,
    },
];

pub(crate) async fn abuse() -> Result<Value, Box<dyn Error>> {
    let settings = benches::Settings::from_env();
    println!("abuse: starting a master, 2 replicas, 3 sentinels and `server serve`");
    let topology = Topology::builder().replicas(2).sentinels(3).start().await?;
    let sentinels: Vec<NodeAddr> = topology
        .sentinel_addrs()
        .into_iter()
        .map(NodeAddr::from)
        .collect();
    let client = FailoverClient::sentinel(topology.master_name(), sentinels).build()?;
    client.wait_for_master(Duration::from_secs(10)).await?;
    let store = TenantKv::builder(client).build()?;
    for tenant in ["quiet", "noisy"] {
        let user = NewUser {
            username: format!("{tenant}-user"),
            tenant: TenantId::new(tenant)?,
            email: None,
            full_name: None,
            admin: false,
        };
        store
            .users()
            .create(user, PASSWORD, &Actor::system())
            .await?;
    }
    let noisy_id = TenantId::new("noisy")?;
    for quota in [Quota::RequestsPerSecond, Quota::RequestBurst] {
        store
            .set_quota(
                &noisy_id,
                quota,
                Some(u64::from(NOISY_LIMIT)),
                &Actor::system(),
            )
            .await?;
    }
    let server = ServerProcess::start(&topology)?;
    let addr = server.addr;
    let (quiet_token, noisy_token) = (
        token(addr, "quiet-user").await?,
        token(addr, "noisy-user").await?,
    );
    for (tenant, token) in [("quiet", &quiet_token), ("noisy", &noisy_token)] {
        let mut client = Client::new("127.0.0.1", addr);
        let tasks = if tenant == "quiet" {
            QUIET_CONNECTIONS
        } else {
            1
        };
        for task in 0..tasks {
            let request = Request::put(format!("/data/k{task}"))
                .header("host", "bench")
                .header("authorization", token.as_str())
                .header("content-type", "application/json")
                .header("if-none-match", "*")
                .body(Full::new(Bytes::from(
                    r#"{"value": {"text": "quiet data"}}"#,
                )))?;
            client.send(request).await?;
        }
    }
    let (idle_rss, _) = server.memory();
    println!(
        "abuse: {} rounds of {:?} per phase; quiet tenant: {QUIET_CONNECTIONS} connections; server idle at {idle_rss:.1} MiB",
        settings.rounds, settings.duration
    );

    let mut results: Vec<(Attacks, Vec<Window>, f64)> = PHASES
        .iter()
        .map(|phase| (*phase, Vec::new(), 0.0))
        .collect();
    for round in 0..settings.rounds {
        for (phase, windows, peak) in &mut results {
            let stop = Arc::new(AtomicBool::new(false));
            let mut attackers = JoinSet::new();
            if phase.logins {
                guess_passwords(addr, &stop, &mut attackers);
            }
            if phase.readers {
                read_nothing(addr, &stop, &mut attackers);
            }
            if phase.noisy {
                noisy(addr, &noisy_token, &stop, &mut attackers);
            }
            // Let the attack reach its steady state before measuring.
            if !attackers.is_empty() {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let sampled = Arc::new(AtomicU64::new(0));
            let sampler = {
                let (sampled, stop, pid) =
                    (Arc::clone(&sampled), Arc::clone(&stop), server.child.id());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let rss = rss_kib(pid);
                        sampled.fetch_max(rss, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
            };
            let cpu_before = cpu_seconds(server.child.id());
            let mut window = quiet(addr, &quiet_token, settings.duration).await;
            window.server_cores =
                (cpu_seconds(server.child.id()) - cpu_before) / settings.duration.as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let _ = sampler.await;
            attackers.abort_all();
            while attackers.join_next().await.is_some() {}
            *peak = peak.max(sampled.load(Ordering::Relaxed) as f64 / 1024.0);
            println!(
                "  round {}: {:<34} {:>9.0} GET/s  p99 {:>8.2?}  5xx {}  server {:.2} cores  peak {:.1} MiB",
                round + 1,
                phase.name,
                window.per_second(),
                window.p99(),
                window.server_errors,
                window.server_cores,
                sampled.load(Ordering::Relaxed) as f64 / 1024.0
            );
            windows.push(window);
            // Attack connections the server still holds end before the next phase.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    report(&results, &server, idle_rss)
}

/// The CPU time a process has used, in seconds (0 where `/proc` cannot
/// tell).
fn cpu_seconds(pid: u32) -> f64 {
    benches::process_cpu_time(pid).map_or(0.0, |time| time.as_secs_f64())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn report(
    results: &[(Attacks, Vec<Window>, f64)],
    server: &ServerProcess,
    idle_rss: f64,
) -> Result<Value, Box<dyn Error>> {
    let baseline = median(results[0].1.iter().map(Window::per_second).collect());
    let baseline_p99 = median(results[0].1.iter().map(|w| w.p99().as_secs_f64()).collect());
    println!(
        "\n{:<34} {:>10} {:>7} {:>10} {:>8} {:>6} {:>8} {:>10}",
        "phase", "GET/s", "ratio", "p99", "p99 x", "5xx", "cores", "peak MiB"
    );
    let mut rows = Vec::new();
    for (phase, windows, peak) in results {
        let per_second = median(windows.iter().map(Window::per_second).collect());
        let p99 = median(windows.iter().map(|w| w.p99().as_secs_f64()).collect());
        let server_errors: u64 = windows.iter().map(|w| w.server_errors).sum();
        let other: u64 = windows.iter().map(|w| w.other).sum();
        let cores = median(windows.iter().map(|w| w.server_cores).collect());
        println!(
            "{:<34} {per_second:>10.0} {:>7.2} {:>10.2?} {:>8.2} {server_errors:>6} {cores:>8.2} {peak:>10.1}",
            phase.name,
            per_second / baseline,
            Duration::from_secs_f64(p99),
            p99 / baseline_p99,
        );
        rows.push(json!({
            "phase": phase.name, "gets_per_second": per_second, "ratio": per_second / baseline,
            "p99_seconds": p99, "p99_ratio": p99 / baseline_p99,
            "server_errors": server_errors, "other_failures": other, "peak_rss_mib": peak,
            "server_cores": cores,
        }));
    }
    let (_, high_water) = server.memory();
    println!("server resident memory: idle {idle_rss:.1} MiB, highest {high_water:.1} MiB");
    println!("targets: ratio >= 0.80, p99 x <= 2, no 5xx, peak <= 256 MiB");
    Ok(
        json!({"scenario": "abuse", "results": rows, "idle_rss_mib": idle_rss, "peak_rss_mib": high_water}),
    )
}
